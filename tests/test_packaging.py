"""What `pip install .` installs, as the Docker image installs it: from the files the Dockerfile copies, without the
repository around it. Every module of services/ and shared/ imports from the installed copy, the files the code
reads at run time are in it (the demo adapters, the simulator's default performance model), and the installed
`caraserve` answers --help. (The image itself needs a Docker daemon; this checks its Python content.)"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project installed (no dependencies: the test's own environment has them) from what the Dockerfile
    copies, into a folder of its own; returns that folder."""
    root = tmp_path_factory.mktemp("packaging")
    src, site = root / "src", root / "site"
    src.mkdir()
    for line in re.findall(r"^COPY (.+) \S+$", (REPO / "Dockerfile").read_text(), re.M):
        for name in shlex.split(line):
            if (REPO / name).is_dir():
                shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(REPO / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-compile", "--target", str(site), str(src)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return site


def run_installed(site: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """`code` in a Python that sees the installed copy and the environment's dependencies, not the repository: no
    site processing (so not the checkout's editable install), run from elsewhere."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}
    env.pop("PYTHONSTARTUP", None)
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def test_every_module_imports_from_the_installed_copy(installed, tmp_path):
    code = """
import importlib, json, pkgutil, sys
import services, shared
names = []
for package in (services, shared):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
        names.append(info.name)
origins = {m.__name__: m.__file__ for m in map(sys.modules.get, ["services", "shared", *names]) if m is not None}
print(json.dumps(origins))
"""
    done = run_installed(installed, code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    origins = json.loads(done.stdout.strip().splitlines()[-1])
    in_repo = sorted(n for n, f in origins.items() if not Path(f).resolve().is_relative_to(installed.resolve()))
    assert not in_repo, f"imported from outside the installed copy: {in_repo[:5]}"
    expected = {p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
                for top in ("services", "shared") for p in (REPO / top).rglob("*.py")}
    assert expected <= set(origins), f"modules missing from the installed copy: {sorted(expected - set(origins))[:5]}"


def test_files_read_at_run_time_are_installed(installed, tmp_path):
    code = """
import json
from shared.demo_adapters import DEMO_ADAPTERS, demo_adapter_path
from services.scheduler.simulate_command import DEFAULT_PERF_MODEL
from services.scheduler.perf_model import PerfModel
PerfModel.load(DEFAULT_PERF_MODEL)
files = [str(demo_adapter_path(n) / f) for n in DEMO_ADAPTERS
         for f in ("adapter_config.json", "adapter_model.safetensors")]
print(json.dumps([str(DEFAULT_PERF_MODEL), *files]))
"""
    done = run_installed(installed, code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    files = [Path(f) for f in json.loads(done.stdout.strip().splitlines()[-1])]
    assert len(files) >= 3 and all(f.is_file() and f.resolve().is_relative_to(installed.resolve()) for f in files)


def test_installed_cli_answers_help(installed, tmp_path):
    code = """
import sys
from services.cli import main
for argv in (["--help"], ["serve", "gateway", "--help"], ["simulate", "--help"], ["up", "--help"]):
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    assert code in (0, None), (argv, code)
print("ok")
"""
    done = run_installed(installed, code, tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
