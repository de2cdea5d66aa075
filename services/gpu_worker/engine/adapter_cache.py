"""Adapters known to the engine (host tier) and the resident slots the model computes with (device tier).

A slot holds one adapter laid out for the fused projections (SlotWeights for the torch backend; for the Triton
backend a PoolHandle into the device pool, which `free` gives back when the slot is emptied). Slots are LRU and
reference-counted by the running sequences that use them (`acquire`/`release`): an adapter in use is never evicted.
Requests are counted too, from admission to finish (`pin`/`unpin`), so that a request accepted for an adapter runs
to its end on the weights it was accepted with. Unregistering an adapter refuses new requests for it at once; while
accepted requests still need it, it is retired (re-registering it is refused), and its slot is freed when the last
of them finishes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from shared.adapters import LoRAAdapter
from services.gpu_worker.lora.slot_weights import SlotWeights


class AdapterCache:
    def __init__(
        self,
        num_slots: int,
        build: Callable[[LoRAAdapter], SlotWeights],
        free: Callable[[SlotWeights], None] | None = None,
    ) -> None:
        self.num_slots = num_slots
        # lays an adapter out into slot weights on the device; CPU assist (auto) wraps both with pipelined loads
        self.build_slot = build
        self.free_slot = free  # told when a slot's content is dropped (a device pool then reuses its rows)
        self.registered: dict[str, LoRAAdapter] = {}
        self.slots: list[SlotWeights | None] = [None] * num_slots
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # resident adapter -> slot, least recent first
        self._refs: dict[str, int] = {}  # adapter -> running sequences holding its slot
        self._pins: dict[str, int] = {}  # adapter -> unfinished requests (waiting or running) that will use it
        self._retired: dict[str, LoRAAdapter] = {}  # unregistered while requests need it: dropped after the last
        self.loads = 0  # slot fills, for tests and stats

    def register(self, adapter: LoRAAdapter) -> None:
        """Add `adapter`, or replace the weights of an idle one of the same name."""
        name = adapter.name
        if name in self._retired:
            raise ValueError(f"adapter {name!r} is being removed; retry when its requests have finished")
        if self._pins.get(name) or self._refs.get(name):
            # replacing weights under a running request would mix two adapters in one generation
            raise ValueError(f"adapter {name!r} is in use; retry when its requests have finished")
        self.evict_if_idle(name)  # re-registration replaces the weights
        self.registered[name] = adapter

    def unregister(self, name: str) -> None:
        if name not in self.registered:
            raise KeyError(name)
        adapter = self.registered.pop(name)
        if self._pins.get(name) or self._refs.get(name):
            self._retired[name] = adapter
        else:
            self.evict_if_idle(name)

    def is_available(self, name: str) -> bool:
        """Whether new requests may use `name`."""
        return name in self.registered

    def pin(self, name: str) -> None:
        """A request for `name` was accepted; KeyError if `name` is not registered (or is being removed)."""
        if name not in self.registered:
            raise KeyError(name)
        self._pins[name] = self._pins.get(name, 0) + 1

    def unpin(self, name: str) -> None:
        """A request pinned with `pin` finished (or was aborted)."""
        self._pins[name] -= 1
        if self._pins[name] == 0:
            del self._pins[name]
            self._drop_if_retired(name)

    def acquire(self, name: str) -> int | None:
        """The slot holding `name`, loading it (evicting the least recently used idle adapter) if needed.

        None when every slot is held by adapters in use; the caller retries later. KeyError when `name` is not
        registered, unless it was retired while pinned requests still need it.
        """
        if name not in self.registered and not (name in self._retired and self._pins.get(name)):
            raise KeyError(name)
        slot = self._slot_of.get(name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self.slots[slot] = self.build_slot(self.registered.get(name) or self._retired[name])
            self._slot_of[name] = slot
            self.loads += 1
        self._slot_of.move_to_end(name)
        self._refs[name] = self._refs.get(name, 0) + 1
        return slot

    def release(self, name: str) -> None:
        self._refs[name] -= 1
        if self._refs[name] == 0:
            del self._refs[name]
            self._drop_if_retired(name)

    def _drop_if_retired(self, name: str) -> None:
        if name in self._retired and not self._refs.get(name) and not self._pins.get(name):
            del self._retired[name]
            self.evict_if_idle(name)

    def evict_if_idle(self, name: str) -> None:
        if self._refs.get(name):
            return
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            self._empty(slot)

    def _free_slot(self) -> int | None:
        for slot, weights in enumerate(self.slots):
            if weights is None:
                return slot
        for name in list(self._slot_of):  # least recently used first
            if not self._refs.get(name):
                slot = self._slot_of.pop(name)
                self._empty(slot)  # empty, so the slot stays reusable if the caller's build fails
                return slot
        return None

    def _empty(self, slot: int) -> None:
        weights, self.slots[slot] = self.slots[slot], None
        if weights is not None and self.free_slot is not None:
            self.free_slot(weights)

    @property
    def in_use(self) -> dict[str, int]:
        """Adapter -> running sequences holding its slot."""
        return dict(self._refs)

    @property
    def pinned(self) -> dict[str, int]:
        """Adapter -> unfinished requests that will use it."""
        return dict(self._pins)

    def name_in_slot(self, slot: int) -> str | None:
        """The adapter resident in `slot` (None if the slot is empty)."""
        for name, s in self._slot_of.items():
            if s == slot:
                return name
        return None

    @property
    def resident(self) -> list[str]:
        return list(self._slot_of)
