"""Counting the device work a step issues, on any machine: the torch ops that launch a kernel and the launches of
the engine's Triton kernels (kernel_warmup.KERNELS). On a GPU each costs host time to launch; a decode step of a
large model is short enough that their number decides whether the host keeps up."""
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
    kernel). What the Triton interpreter does inside a launch is not counted."""

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        self.torch_ops: Counter[str] = Counter()
        self.triton: Counter[str] = Counter()
        self._in_launch = False
        for module_name, names in KERNELS.items():
            module = importlib.import_module(module_name)
            for name in names:
                monkeypatch.setattr(module, name, _Counted(getattr(module, name), name, self))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._in_launch and name not in NO_KERNEL:
            self.torch_ops[name] += 1
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        return sum(self.torch_ops.values()) + sum(self.triton.values())


class _Counted:
    def __init__(self, kernel, name: str, ops: DeviceOps) -> None:
        self.kernel, self.name, self.ops = kernel, name, ops

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.ops.triton[self.name] += 1
            self.ops._in_launch = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.ops._in_launch = False
        return launch
