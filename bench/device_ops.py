"""Counting the device work a step issues, on any machine: the torch ops that launch a kernel and the launches of
the engine's Triton kernels (kernel_warmup.KERNELS). On a GPU each costs host time to launch; a decode step of a
large model is short enough that their number decides whether the host keeps up.

    with DeviceOps() as ops:             # kernels run (compiled, or in the interpreter)
        engine.step()
    with DeviceOps(run_kernels=False):   # kernels stubbed: nothing launched (the host cost of the rest)
"""
from __future__ import annotations

import importlib
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

from services.gpu_worker.kernel_warmup import KERNELS

# aten ops that launch nothing on a device: views, metadata, allocations without a fill
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "alias", "detach", "lift_fresh", "t",
    "transpose", "permute", "expand", "squeeze", "unsqueeze", "select", "slice", "split", "split_with_sizes",
    "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided",
})


class DeviceOps(TorchDispatchMode):
    """Within: `torch_ops` counts the torch ops that launch a kernel (by name), `triton` the Triton launches (by
    kernel), each kernel of KERNELS wrapped for the time. What the Triton interpreter does inside a launch is not
    counted. count_torch=False leaves torch ops alone (no dispatch mode: their cost as it is)."""

    def __init__(self, run_kernels: bool = True, count_torch: bool = True) -> None:
        super().__init__()
        self.torch_ops: Counter[str] = Counter()
        self.triton: Counter[str] = Counter()
        self.run_kernels, self.count_torch = run_kernels, count_torch
        self._in_launch = False
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self):
        for module_name, names in KERNELS.items():
            module = importlib.import_module(module_name)
            for name in names:
                kernel = getattr(module, name)
                self._saved.append((module, name, kernel))
                setattr(module, name, _Counted(kernel, name, self))
        return super().__enter__() if self.count_torch else self

    def __exit__(self, *exc):
        try:
            if self.count_torch:
                super().__exit__(*exc)
        finally:
            for module, name, kernel in reversed(self._saved):
                setattr(module, name, kernel)
            self._saved.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._in_launch and name not in NO_KERNEL:
            self.torch_ops[name] += 1
        return func(*args, **(kwargs or {}))


class _Counted:
    def __init__(self, kernel, name: str, ops: DeviceOps) -> None:
        self.kernel, self.name, self.ops = kernel, name, ops

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.ops.triton[self.name] += 1
            if not self.ops.run_kernels:
                return None
            self.ops._in_launch = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.ops._in_launch = False
        return launch
