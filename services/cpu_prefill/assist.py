"""The engine side of CPU-assisted prefill: the node's host adapter cache, the cpu_prefill worker pool, and the
LoRA backend that routes prefill deltas to the workers.

`CpuAssist` is built by LLMEngine when `cpu_assist` is on. Every adapter the engine loads is also laid out in the
host cache (shared memory, readable by the workers without copies); the model's LoRA backend is wrapped in a
CpuAssistLoRABackend whose prefill ranges go to the workers, decode tokens to the inner (torch or triton) backend.

Modes (EngineConfig.cpu_assist):
  off     every LoRA delta on the engine's device (on a GPU: wait for the adapter to load, the S-LoRA baseline).
  always  every prefill range of an adapter held in the host cache is computed by the workers (tests and
          benchmarks on machines without a GPU; on a GPU it measures the handoff under load).
  auto    the paper's mechanism, on a GPU: when a step needs an adapter that is not in a device slot, its slot is
          filled by a pipelined load (services/gpu_worker/lora/pipelined_load.py: layer groups on a side stream)
          and the step runs at once: the prefill delta of every layer whose group has not landed comes from the
          workers, the landed layers use the device kernels. A slot's decode tokens (and a range whose worker
          failed) wait for its whole load, on the device stream (the host does not block). Once loaded, the
          adapter is an ordinary resident one. Without a live worker a cold adapter loads as with off. The loads
          copy from the host cache itself, page-locked in place on a GPU (`_LoadSource`). A range goes to the
          workers only if they are expected to finish it before its layer's group lands (their measured speed
          against the loads' measured bandwidth; before anything is measured, it does); otherwise the device waits
          for that group's event and computes it: on a GPU with fast copies, waiting can beat the CPU.

Workers: `num_workers` processes spawned by the engine, plus any `caraserve serve cpu_prefill` process of the node
that joins through the engine's socket in <data dir>/run/cpu_prefill/ (services/cpu_prefill/rendezvous.py); they
may join and leave while the engine serves. With num_workers 0 only joiners do the work; while no worker is there,
prefills take the device path. A worker that dies or stalls makes the backend fall back to the device path for
that range (after the pool's timeout); the request completes either way.
"""
from __future__ import annotations

import logging
import time

import torch

from services.cpu_prefill.backend import CpuAssistLoRABackend
from services.cpu_prefill.host_cache import HostAdapter, HostAdapterCache, HostCacheError, attach
from services.cpu_prefill.pinning import PinnedRange, pin_host_memory
from services.cpu_prefill.pool import CpuPrefillPool
from services.cpu_prefill.rendezvous import RendezvousError, run_dir
from services.gpu_worker.lora.pipelined_load import LayerGroupLoad, LoadError, PipelinedLoader, layer_groups
from services.gpu_worker.lora.slot_weights import PROJECTION_GROUPS
from shared.adapters import LoRAAdapter, LoRAModuleWeights

log = logging.getLogger(__name__)


class CpuAssist:
    def __init__(self, model, adapters, num_layers: int, part_widths: dict[str, int], *, num_workers: int,
                 max_tokens: int, host_cache_bytes: int, timeout_s: float = 5.0, data_dir: str | None = None,
                 accept_joiners: bool = True, mode: str = "always", reserve_slot=None,
                 loader: PipelinedLoader | None = None, load_groups: int | None = None) -> None:
        """`mode` always or auto. auto needs `reserve_slot(adapter) -> (slot content, write(layers))` (the
        engine's device tier: the content goes in the slot at once, `write` fills it layer group by group),
        `loader` (a side stream on CUDA) and `load_groups`, how many groups an adapter's layers load in."""
        if mode not in ("always", "auto"):
            raise ValueError(f"CpuAssist mode must be always or auto, got {mode!r}")
        if mode == "auto" and (reserve_slot is None or loader is None or load_groups is None):
            raise ValueError("CpuAssist auto needs reserve_slot, loader and load_groups")
        self.mode = mode
        self.adapters = adapters  # the engine's AdapterCache: which adapter is in which slot
        self.num_layers = num_layers
        self.part_widths = part_widths
        widths = model.lora_part_widths()
        max_in = max(model.config.hidden_size, model.config.intermediate_size, model.q_width)
        max_out = max(widths["q_proj"] + 2 * widths["k_proj"], 2 * widths["gate_proj"], model.config.hidden_size)
        # the host cache and the channels hold the engine's dtype (half the bytes of float32 for a load or an
        # activation on a half-precision GPU engine, and nothing converted on the way)
        self.host = HostAdapterCache(host_cache_bytes, dtype=model.dtype)
        try:
            # on a GPU the activations go out and the deltas come back by async copies on the stream (handoff.py)
            self.pool = CpuPrefillPool(num_workers, max_tokens, max_in, max_out, timeout_s=timeout_s,
                                       rendezvous_dir=run_dir(data_dir) if accept_joiners else None,
                                       device=model.device if model.device.type == "cuda" else None,
                                       dtype=model.dtype)
        except RendezvousError as exc:  # only raised with no spawned worker: nothing could ever assist
            self.host.close()
            from services.gpu_worker.engine.config import ConfigError

            raise ConfigError(f"cpu_workers 0 and cpu_prefill processes cannot join: {exc}") from None
        except BaseException:
            self.host.close()
            raise
        self._held: dict[str, HostAdapter] = {}  # adapters registered with the engine and in the host cache
        self.pipelined_loads = 0  # cold adapters loaded pipelined (auto), for tests and stats
        # auto: host seconds the engine's thread spent starting those loads (reserving their slots, starting their
        # threads), before it launches the step's forward pass; and the seconds their own threads spent enqueueing
        # the copies (summed over the loads measured so far)
        self.load_enqueue_s = 0.0
        self.load_thread_s = 0.0
        self.device_waits = 0  # auto: ranges of a loading layer left to the device, its group expected sooner
        self.load_bytes_per_s: float | None = None  # auto: measured pipelined load bandwidth (EWMA)
        self._unmeasured: list[tuple[LayerGroupLoad, int]] = []  # auto: loads out of _loads, not yet timed
        self._loads: dict[str, tuple[LayerGroupLoad, object, object]] = {}  # auto: name -> (load, content, write)
        self._sources: dict[str, _LoadSource] = {}  # auto: held adapter -> its weights in the host cache
        hooks = {}
        if mode == "auto":
            self._reserve_slot, self.loader = reserve_slot, loader
            self._groups = layer_groups(num_layers, load_groups)
            self._build_resident, self._free_resident = adapters.build_slot, adapters.free_slot
            adapters.build_slot, adapters.free_slot = self._build_slot, self._free_slot
            hooks = dict(on_cpu=self._on_cpu, on_fallback=self._finish_load, on_device=self._finish_load,
                         on_layer_device=self._wait_layer)
        out_widths = {g: sum(part_widths[n] for n in names) for g, names in PROJECTION_GROUPS.items()}
        self.backend = CpuAssistLoRABackend(model.lora_backend, self.pool, self.host_adapter_of,
                                            out_widths=out_widths, **hooks)
        model.lora_backend = self.backend
        log.info("CPU-assisted prefill: %d cpu_prefill workers spawned, %s, host adapter cache %.0f MiB",
                 num_workers, f"others join at {self.pool.socket_path}" if self.pool.socket_path else "no joiners",
                 host_cache_bytes / 2**20)

    def add(self, adapter: LoRAAdapter) -> None:
        """Lay a newly registered adapter out in the host cache (held until `remove`); if it does not fit, its
        prefills stay on the device. With auto, its pipelined loads read from there too (`_LoadSource`)."""
        self.remove(adapter.name)
        try:
            self.host.put(adapter, self.num_layers, self.part_widths)
            self._held[adapter.name] = host = self.host.acquire(adapter.name)
        except HostCacheError as exc:
            log.warning("adapter %s not CPU-assisted: %s", adapter.name, exc)
            return
        if self.mode == "auto":
            try:
                self._sources[adapter.name] = _LoadSource(adapter, host, self.part_widths, self.loader.device)
            except (OSError, ValueError) as exc:  # its segment cannot be mapped here: it loads whole, as with off
                log.warning("adapter %s loads without pipelining: %s", adapter.name, exc)

    def remove(self, name: str) -> None:
        entry = self._loads.pop(name, None)
        if entry is not None:  # its copies read the host cache's pages: they finish before those go
            try:
                entry[0].wait()
            except LoadError:
                pass
        source = self._sources.pop(name, None)
        if source is not None:
            source.close()
        host = self._held.pop(name, None)
        if host is not None:
            self.host.release(name)
            self.pool.forget(host)
            self.host.evict(name)

    def host_adapter_of(self, slot: int) -> HostAdapter | None:
        """The host copy the workers compute `slot`'s prefill from this step, or None (the device computes it):
        always: every held adapter; auto: only an adapter whose load is still under way."""
        name = self.adapters.name_in_slot(slot)
        if name is None:
            return None
        if self.mode == "auto":
            if self._unmeasured:
                self._measure_loads()
            entry = self._loads.get(name)
            if entry is None:
                return None
            if entry[0].done():
                self._pop_load(name)  # landed: an ordinary resident adapter from now on
                return None
        return self._held.get(name)

    # ---- auto: pipelined loads ----
    def _build_slot(self, adapter: LoRAAdapter):
        """AdapterCache's slot filler in auto mode: a cold adapter the workers can cover loads pipelined."""
        source = self._sources.get(adapter.name)
        if source is None or not self.pool.alive():
            return self._build_resident(adapter)
        started = time.perf_counter()
        content, write = self._reserve_slot(source.adapter)
        self._loads[adapter.name] = (self.loader.start(self._groups, write), content, write)
        self.pipelined_loads += 1
        self.load_enqueue_s += time.perf_counter() - started
        return content

    def _free_slot(self, content) -> None:
        """A slot is emptied: a load still writing into it finishes first (its rows or tensors are reused)."""
        for name, (load, loaded, _) in list(self._loads.items()):
            if loaded is content:
                self._pop_load(name)
                try:
                    load.wait()
                except LoadError:
                    pass  # nothing will read it
        if self._free_resident is not None:
            self._free_resident(content)

    def _on_cpu(self, slot: int, layer: int, group: str, tokens: int) -> bool:
        """Whether the workers compute this range: its layer has not landed, and they are expected to be done
        before it lands (from the workers' measured speed and the loads' measured bandwidth; before either is
        measured, they are). Otherwise the device computes it once its group has landed (`_wait_layer`): on a
        GPU whose copies are fast, waiting for a group can beat the CPU."""
        name = self.adapters.name_in_slot(slot)
        entry = self._loads.get(name) if name is not None else None
        if entry is None or entry[0].landed(layer):
            return False
        host = self._held.get(name)
        cpu_s = self.pool.estimate_s(host, layer, group, tokens) if host is not None else None
        land_s = self._lands_in(entry[0], layer, host)
        if cpu_s is None or land_s is None or cpu_s <= land_s:
            return True
        self.device_waits += 1
        return False

    def _lands_in(self, load: LayerGroupLoad, layer: int, host: HostAdapter | None) -> float | None:
        """Seconds until `layer`'s group should have landed, at the loads' measured bandwidth (None: unknown)."""
        if self.load_bytes_per_s is None or host is None:
            return None
        through = load.groups[load.group_of(layer)][-1] + 1  # layers written once that group is
        return load.started + host.nbytes * through / self.num_layers / self.load_bytes_per_s - time.monotonic()

    def _wait_layer(self, slot: int, layer: int) -> None:
        """The device computes a range of `slot` at `layer`: make it wait for that layer's group if still loading."""
        name = self.adapters.name_in_slot(slot)
        entry = self._loads.get(name) if name is not None else None
        if entry is None or entry[0].landed(layer):
            return
        try:
            entry[0].wait_layer_on_device(layer)
        except LoadError:
            self._finish_load(slot)  # writes it again at once

    def _pop_load(self, name: str):
        """Remove `name`'s load entry (returned); its time is measured once it is complete (`_measure_loads`)."""
        entry = self._loads.pop(name, None)
        host = self._held.get(name)
        if entry is not None and host is not None:
            self._unmeasured.append((entry[0], host.nbytes))
        return entry

    def _measure_loads(self) -> None:
        """Fold the loads completed since into the bandwidth estimate (EWMA)."""
        pending = []
        for load, nbytes in self._unmeasured:
            if load.error is not None:
                continue
            seconds = load.seconds()
            if seconds is None:
                pending.append((load, nbytes))
            elif seconds > 0:
                self.load_thread_s += load.enqueue_s or 0.0
                rate = nbytes / seconds
                self.load_bytes_per_s = rate if self.load_bytes_per_s is None else \
                    0.8 * self.load_bytes_per_s + 0.2 * rate
        self._unmeasured = pending[-8:]

    def _finish_load(self, slot: int) -> None:
        """The device computes `slot`'s ranges: make its load complete first (decode, a worker that failed)."""
        name = self.adapters.name_in_slot(slot)
        entry = self._pop_load(name) if name is not None else None
        if entry is None:
            return
        load, content, write = entry
        try:
            load.wait_on_device()
        except LoadError as exc:
            log.warning("pipelined load of adapter %s failed (%s); loading it again at once", name, exc)
            write(range(self.num_layers))

    def wait_for_loads(self) -> None:
        """Block until every load under way is complete (before pool rows move, and at close)."""
        for load, _, _ in list(self._loads.values()):
            try:
                load.wait()
            except LoadError:
                pass  # _finish_load writes it again if the adapter is still needed

    @property
    def loading(self) -> list[str]:
        """Adapters whose pipelined load is under way (not yet seen complete)."""
        return sorted(self._loads)

    @property
    def fallbacks(self) -> int:
        return self.backend.fallbacks

    def close(self) -> None:
        """Stop the workers (joined ones leave), remove the socket, unlink every shared-memory segment (idempotent)."""
        self.wait_for_loads()
        for source in self._sources.values():
            source.close()
        self._sources.clear()
        self.pool.close()
        self.host.close()


class _LoadSource:
    """What a pipelined load copies to the device (auto): the adapter's tensors in its host cache segment, mapped
    once more here and page-locked in place on a GPU (cudaHostRegister), so the side stream's copies are async
    without a pinned copy of every module. `adapter` views them as modules: each part's rows of its group's
    stacked A, and its B already scaled (scale 1), which the slot writers read as they read a loaded adapter's
    (in the host cache's dtype, the engine's: the writers' casts to it are then no-ops)."""

    def __init__(self, adapter: LoRAAdapter, host: HostAdapter, part_widths: dict[str, int],
                 device: torch.device) -> None:
        self._shm, layers = attach(host)
        self._pinned: PinnedRange | None = None
        if device.type == "cuda":
            self._pinned = pin_host_memory(torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=host.nbytes))
        modules = []
        for layer, groups in enumerate(layers):
            for group, (a, parts) in groups.items():
                starts, offset = {}, 0
                for name in PROJECTION_GROUPS[group]:  # a part is named by where its columns start
                    starts[offset] = name
                    offset += part_widths[name]
                for out_start, _, rank_start, rank_end, b in parts:
                    modules.append(LoRAModuleWeights(layer, starts[out_start], a[rank_start:rank_end], b, 1.0))
        self.adapter = LoRAAdapter(adapter.name, adapter.path, adapter.config, modules)

    def close(self) -> None:
        if self._pinned is not None:  # before the mapping goes
            self._pinned.release()
            self._pinned = None
        if self._shm is not None:
            shm, self._shm = self._shm, None
            self.adapter = None
            try:
                shm.close()
            except BufferError:  # a view is still referenced somewhere: the mapping goes with it
                pass
