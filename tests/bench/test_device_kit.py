"""The GPU-session kit (bench/device): the model package's parts cover it exactly and each fits its call, and
session.sh runs the test files that exist, explains itself and refuses what it cannot do in one line."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from bench.device.make_kit import split_points

REPO = Path(__file__).resolve().parents[2]
SESSION = REPO / "bench" / "device" / "session.sh"


@pytest.mark.parametrize("size, first, rest", [(100, 30, 40), (93_000_000, 24_000_000, 48_000_000), (10, 50, 50),
                                               (80, 40, 40)])
def test_parts_cover_the_file_and_fit(size, first, rest):
    cuts = split_points(size, first, rest)
    assert cuts[0][0] == 0 and cuts[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert cuts[0][1] - cuts[0][0] <= first and all(hi - lo <= rest for lo, hi in cuts[1:])
    assert all(hi > lo for lo, hi in cuts)


def test_no_room_is_an_error():
    with pytest.raises(ValueError):
        split_points(10, 0, 5)


def test_the_tests_stage_names_test_files_that_exist():
    """A renamed test file would otherwise drop out of the GPU run unnoticed."""
    paths = re.findall(r"\btests/[\w/.]+", SESSION.read_text())
    assert paths and "tests/gpu_worker/lora" in paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, missing


def run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SESSION), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "HOME": str(tmp_path)})


def test_help_lists_every_stage(tmp_path):
    out = run("--help", tmp_path=tmp_path)
    assert out.returncode == 0
    for stage in re.findall(r"^stage_(\w+)\(\)", SESSION.read_text(), re.M):
        assert f"  {stage} " in out.stdout, stage


def test_an_unknown_stage_fails_with_one_line(tmp_path):
    out = run("nonsense", tmp_path=tmp_path)
    assert out.returncode == 1
    assert "unknown stage 'nonsense'" in out.stderr
