"""Which compiled variants of the engine's Triton kernels a run launches, on any machine.

Triton compiles a kernel anew for each specialization of its arguments: dtypes, constexprs, integers equal to 1 or
divisible by 16, pointers 16-byte aligned or not. `LaunchVariants.install` wraps every kernel of
kernel_warmup.KERNELS so that each launch, besides running (compiled, or in the interpreter), records that
specialization as Triton's own binder computes it for a CUDA launch (sm_90): the same key whether the kernels run
here interpreted or on a GPU."""
from __future__ import annotations

import importlib

from services.gpu_worker.kernel_warmup import KERNELS


class LaunchVariants:
    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def install(self, monkeypatch) -> "LaunchVariants":
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        backend = make_backend(GPUTarget("cuda", 90, 32))
        for module_name, names in KERNELS.items():
            module = importlib.import_module(module_name)
            for name in names:
                kernel = getattr(module, name)
                jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
                binder = create_function_from_signature(jit.signature, jit.params, backend)
                monkeypatch.setattr(module, name, _Recorded(kernel, name, binder, self.seen))
        return self


class _Recorded:
    def __init__(self, kernel, name: str, binder, seen: set) -> None:
        self.kernel, self.name, self.binder, self.seen = kernel, name, binder, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _, specialization, _ = self.binder(*args, **kwargs)
            self.seen.add((self.name, repr(specialization)))
            return self.kernel[grid](*args, **kwargs)
        return launch
