"""Polling for a condition another thread or process makes true."""
from __future__ import annotations

import time


def wait_for(predicate, timeout_s: float, what: str) -> None:
    """Return once predicate() holds; AssertionError naming `what` after timeout_s seconds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)
