"""Where CaraServe keeps its data (model caches, adapter caches)."""
from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "CARASERVE_DATA_DIR"


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The project's data directory: the override, else $CARASERVE_DATA_DIR, else ~/.cache/caraserve."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "caraserve"
