"""The Triton multi-LoRA backend: per step one `LoRALaunch` from LoRABatchInfo, per group two kernel launches.

`prepare(info, slots)` runs once per step (ModelRunner) and turns the adapters' token ranges into the kernels'
metadata — one host-to-device copy, no device-to-host read — and the grid sizes the step needs (each group's
largest resident rank among the step's adapters, known on the host from the pool). `apply` is called by the model
for each layer and fused group (qkv, o, gate_up, down): one shrink launch over all parts' stacked A, one expand
launch writing every part into its output columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from services.gpu_worker.lora.batch_info import LoRABatchInfo
from services.gpu_worker.lora.gpu_pool import LoRAGpuPool, PoolHandle
from services.gpu_worker.lora.triton_kernels import LoRALaunch, lora_expand, lora_shrink, round_up

# below this mean segment length (tokens per adapter range) one program per token beats 16-token tiles
PER_TOKEN_BELOW = 4


@dataclass
class TritonLoRAStep:
    """The backend's per-step context, kept on LoRABatchInfo.kernel_meta."""

    launch: LoRALaunch
    max_rank: dict[str, int]  # group -> largest stacked rank of the step's adapters (0: no launch)


class TritonLoRABackend:
    def __init__(self, pool: LoRAGpuPool, launch: str = "auto") -> None:
        if launch not in ("auto", "segment", "token"):
            raise ValueError(f"launch must be auto, segment or token, got {launch!r}")
        self.pool = pool
        self.launch = launch  # auto picks by mean segment length; the others force a shape (tests, benchmarks)
        self._checked: set[str] = set()  # groups whose first launch had its arguments checked (VALIDATE_NOTE)

    def prepare(self, info: LoRABatchInfo, slots: list[PoolHandle | None],
                prefill_ranges: list[tuple[int, int]] | None = None) -> None:
        """Build the step's kernel metadata into `info.kernel_meta` (once per step, before the forward)."""
        segs = [(slots[s].entry, start, end) for s, start, end in info.segments if slots[s] is not None and end > start]
        tokens = sum(end - start for _, start, end in segs)
        per_token = self.launch == "token" or (self.launch == "auto" and tokens < PER_TOKEN_BELOW * len(segs))
        if per_token:
            num_tokens = max((end for _, _, end in segs), default=0)
            entries = [-1] * num_tokens
            for e, start, end in segs:
                entries[start:end] = [e] * (end - start)
            host = torch.tensor(entries, dtype=torch.int32)
        else:  # [3, N rounded up to 4]: each row a contiguous device view, 16-byte aligned whatever N is (Triton
            # compiles a kernel anew for a pointer that is not)
            rows = [[e for e, _, _ in segs], [s for _, s, _ in segs], [end - s for _, s, end in segs]]
            host = torch.zeros(3, round_up(len(segs), 4), dtype=torch.int32)
            host[:, :len(segs)] = torch.tensor(rows, dtype=torch.int32).reshape(3, len(segs))
        dev = self._to_device(host)
        if per_token:
            launch = LoRALaunch(True, dev, None, None, 1)
        else:
            n = len(segs)
            launch = LoRALaunch(False, dev[0, :n], dev[1, :n], dev[2, :n],
                                max((end - s for _, s, end in segs), default=0))
        max_rank = {g: max((gp.max_rank[e] for e, _, _ in segs), default=0) for g, gp in self.pool.groups.items()}
        info.kernel_meta = TritonLoRAStep(launch, max_rank)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.pool.device.type == "cuda":
            return host.pin_memory().to(self.pool.device, non_blocking=True)
        return host.to(self.pool.device)

    def apply(
        self, y: torch.Tensor, x: torch.Tensor, slots: list, layer: int, group: str, info: LoRABatchInfo
    ) -> None:
        """y [T, out] += every adapter's LoRA delta for `group` of `layer`, given the group input x [T, in]."""
        step: TritonLoRAStep | None = info.kernel_meta
        if step is None:
            raise RuntimeError("TritonLoRABackend.prepare was not called for this step")
        max_rank = step.max_rank[group]
        if max_rank == 0:
            return
        g = self.pool.groups[group]
        validate = group not in self._checked
        t = lora_shrink(x, g.a[layer], g.row_off, g.rank[layer], step.launch, max_rank,
                        validate=validate)  # [T, max_rank] fp32
        lora_expand(y, t, g.b[layer], g.row_off, g.part_rank[layer], g.part_start[layer], g.part_out,
                    g.part_width, step.launch, g.max_width, max_rank, validate=validate)
        self._checked.add(group)
