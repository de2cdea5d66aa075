"""Adapters known to the engine (host tier) and the resident slots the model computes with (device tier).

A slot holds one adapter laid out for the fused projections. Slots are LRU and reference-counted by the running
sequences that use them: an adapter in use is never evicted. Unregistering an adapter in use refuses new requests
for it at once and frees its slot when the last one finishes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from shared.adapters import LoRAAdapter
from services.gpu_worker.lora.slot_weights import SlotWeights


class AdapterCache:
    def __init__(self, num_slots: int, build: Callable[[LoRAAdapter], SlotWeights]) -> None:
        self.num_slots = num_slots
        self._build = build  # lays an adapter out into slot weights on the device
        self.registered: dict[str, LoRAAdapter] = {}
        self.slots: list[SlotWeights | None] = [None] * num_slots
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # resident adapter -> slot, least recent first
        self._refs: dict[str, int] = {}  # adapter -> running sequences using it
        self._retired: set[str] = set()  # unregistered while in use: freed when the last user releases it
        self.loads = 0  # slot fills, for tests and stats

    def register(self, adapter: LoRAAdapter) -> None:
        if adapter.name in self._retired:
            raise ValueError(f"adapter {adapter.name!r} is being removed; retry when its requests have finished")
        self.evict_if_idle(adapter.name)  # re-registration replaces the weights
        self.registered[adapter.name] = adapter

    def unregister(self, name: str) -> None:
        if name not in self.registered:
            raise KeyError(name)
        del self.registered[name]
        if self._refs.get(name):
            self._retired.add(name)
        else:
            self.evict_if_idle(name)

    def is_available(self, name: str) -> bool:
        return name in self.registered

    def acquire(self, name: str) -> int | None:
        """The slot holding `name`, loading it (evicting the least recently used idle adapter) if needed.

        None when every slot is held by adapters in use; the caller retries later.
        """
        slot = self._slot_of.get(name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self.slots[slot] = self._build(self.registered[name])
            self._slot_of[name] = slot
            self.loads += 1
        self._slot_of.move_to_end(name)
        self._refs[name] = self._refs.get(name, 0) + 1
        return slot

    def release(self, name: str) -> None:
        self._refs[name] -= 1
        if self._refs[name] == 0:
            del self._refs[name]
            if name in self._retired:
                self._retired.discard(name)
                self.evict_if_idle(name)

    def evict_if_idle(self, name: str) -> None:
        if self._refs.get(name):
            return
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            self.slots[slot] = None

    def _free_slot(self) -> int | None:
        for slot, weights in enumerate(self.slots):
            if weights is None:
                return slot
        for name in list(self._slot_of):  # least recently used first
            if not self._refs.get(name):
                return self._slot_of.pop(name)
        return None

    @property
    def in_use(self) -> dict[str, int]:
        return dict(self._refs)

    @property
    def resident(self) -> list[str]:
        return list(self._slot_of)
