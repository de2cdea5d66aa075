"""The engine side of CPU-assisted prefill: the node's host adapter cache, the cpu_prefill worker pool, and the
LoRA backend that routes prefill deltas to the workers.

`CpuAssist` is built by LLMEngine when `cpu_assist` is on. Every adapter the engine loads is also laid out in the
host cache (shared memory, readable by the workers without copies); the model's LoRA backend is wrapped in a
CpuAssistLoRABackend whose prefill ranges go to the workers, decode tokens to the inner (torch or triton) backend.

Modes (EngineConfig.cpu_assist):
  off     every LoRA delta on the engine's device (on a GPU: wait for the adapter to load, the S-LoRA baseline).
  always  every prefill range of an adapter held in the host cache is computed by the workers (tests and
          benchmarks on machines without a GPU; on a GPU it measures the handoff under load).
The GPU mode the paper describes (only cold adapters, only until their layers have landed on the device) needs the
pipelined GPU loader and comes with it.

Workers: `num_workers` processes spawned by the engine, plus any `caraserve serve cpu_prefill` process of the node
that joins through the engine's socket in <data dir>/run/cpu_prefill/ (services/cpu_prefill/rendezvous.py); they
may join and leave while the engine serves. With num_workers 0 only joiners do the work; while no worker is there,
prefills take the device path. A worker that dies or stalls makes the backend fall back to the device path for
that range (after the pool's timeout); the request completes either way.
"""
from __future__ import annotations

import logging

from services.cpu_prefill.backend import CpuAssistLoRABackend
from services.cpu_prefill.host_cache import HostAdapter, HostAdapterCache, HostCacheError
from services.cpu_prefill.pool import CpuPrefillPool
from services.cpu_prefill.rendezvous import RendezvousError, run_dir
from shared.adapters import LoRAAdapter

log = logging.getLogger(__name__)


class CpuAssist:
    def __init__(self, model, adapters, num_layers: int, part_widths: dict[str, int], *, num_workers: int,
                 max_tokens: int, host_cache_bytes: int, timeout_s: float = 5.0, data_dir: str | None = None,
                 accept_joiners: bool = True) -> None:
        self.adapters = adapters  # the engine's AdapterCache: which adapter is in which slot
        self.num_layers = num_layers
        self.part_widths = part_widths
        widths = model.lora_part_widths()
        max_in = max(model.config.hidden_size, model.config.intermediate_size, model.q_width)
        max_out = max(widths["q_proj"] + 2 * widths["k_proj"], 2 * widths["gate_proj"], model.config.hidden_size)
        self.host = HostAdapterCache(host_cache_bytes)
        try:
            self.pool = CpuPrefillPool(num_workers, max_tokens, max_in, max_out, timeout_s=timeout_s,
                                       rendezvous_dir=run_dir(data_dir) if accept_joiners else None)
        except RendezvousError as exc:  # only raised with no spawned worker: nothing could ever assist
            self.host.close()
            from services.gpu_worker.engine.config import ConfigError

            raise ConfigError(f"cpu_workers 0 and cpu_prefill processes cannot join: {exc}") from None
        except BaseException:
            self.host.close()
            raise
        self._held: dict[str, HostAdapter] = {}  # adapters registered with the engine and in the host cache
        self.backend = CpuAssistLoRABackend(model.lora_backend, self.pool, self.host_adapter_of)
        model.lora_backend = self.backend
        log.info("CPU-assisted prefill: %d cpu_prefill workers spawned, %s, host adapter cache %.0f MiB",
                 num_workers, f"others join at {self.pool.socket_path}" if self.pool.socket_path else "no joiners",
                 host_cache_bytes / 2**20)

    def add(self, adapter: LoRAAdapter) -> None:
        """Lay a newly registered adapter out in the host cache (held until `remove`); if it does not fit, its
        prefills stay on the device."""
        self.remove(adapter.name)
        try:
            self.host.put(adapter, self.num_layers, self.part_widths)
            self._held[adapter.name] = self.host.acquire(adapter.name)
        except HostCacheError as exc:
            log.warning("adapter %s not CPU-assisted: %s", adapter.name, exc)

    def remove(self, name: str) -> None:
        host = self._held.pop(name, None)
        if host is not None:
            self.host.release(name)
            self.pool.forget(host)
            self.host.evict(name)

    def host_adapter_of(self, slot: int) -> HostAdapter | None:
        name = self.adapters.name_in_slot(slot)
        return self._held.get(name) if name is not None else None

    @property
    def fallbacks(self) -> int:
        return self.backend.fallbacks

    def close(self) -> None:
        """Stop the workers (joined ones leave), remove the socket, unlink every shared-memory segment (idempotent)."""
        self.pool.close()
        self.host.close()
