"""AdapterCache: resident LoRA slots, LRU over idle adapters, reference counts, retirement (CPU only, no model)."""
from __future__ import annotations

from pathlib import Path

import pytest

from shared.adapters import LoRAAdapter
from services.gpu_worker.engine.adapter_cache import AdapterCache


def adapter(name: str, version: int = 1) -> LoRAAdapter:
    return LoRAAdapter(name=name, path=Path(f"/fake/{name}/v{version}"), config={"version": version}, modules=[])


class Builds:
    """A cheap `build`: the slot 'weights' are (adapter name, version); every call is recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, a: LoRAAdapter):
        self.calls.append(a.name)
        return (a.name, a.config["version"])


def make_cache(num_slots: int, *names: str) -> tuple[AdapterCache, Builds]:
    builds = Builds()
    cache = AdapterCache(num_slots, builds)
    for n in names:
        cache.register(adapter(n))
    return cache, builds


def test_acquire_loads_once_and_reuses_the_resident_slot():
    cache, builds = make_cache(2, "a")
    s1 = cache.acquire("a")
    s2 = cache.acquire("a")
    assert s1 == s2 is not None
    assert cache.slots[s1] == ("a", 1)
    assert builds.calls == ["a"] and cache.loads == 1
    assert cache.in_use == {"a": 2}


def test_lru_evicts_the_least_recently_used_idle_adapter():
    cache, builds = make_cache(2, "a", "b", "c")
    sa = cache.acquire("a")
    cache.release("a")
    sb = cache.acquire("b")
    cache.release("b")
    assert cache.acquire("a") == sa  # a is now the most recently used
    cache.release("a")
    sc = cache.acquire("c")  # evicts b, the least recently used
    assert sc == sb
    assert sorted(cache.resident) == ["a", "c"]
    assert cache.slots[sc] == ("c", 1) and cache.slots[sa] == ("a", 1)
    cache.release("c")
    assert cache.acquire("b") == sa  # now a is the least recently used idle one
    assert builds.calls == ["a", "b", "c", "b"]


def test_an_adapter_in_use_is_never_evicted():
    cache, _ = make_cache(2, "a", "b", "c")
    sa = cache.acquire("a")
    sb = cache.acquire("b")
    cache.release("b")
    # c may only take b's slot: a is older (LRU) but held
    assert cache.acquire("c") == sb
    assert cache.slots[sa] == ("a", 1)
    assert "a" in cache.resident


def test_acquire_returns_none_when_every_slot_is_held():
    cache, builds = make_cache(2, "a", "b", "c")
    sa, sb = cache.acquire("a"), cache.acquire("b")
    assert cache.acquire("c") is None
    assert cache.acquire("c") is None
    assert builds.calls == ["a", "b"]  # nothing was built for c
    assert cache.slots[sa] == ("a", 1) and cache.slots[sb] == ("b", 1)
    assert "c" not in cache.in_use and "c" not in cache.resident
    # an adapter already resident can still be shared by more users
    assert cache.acquire("a") == sa
    assert cache.in_use == {"a": 2, "b": 1}


def test_release_then_reuse_the_freed_slot():
    cache, _ = make_cache(1, "a", "b")
    sa = cache.acquire("a")
    assert cache.acquire("b") is None
    cache.release("a")
    assert cache.in_use == {}
    assert cache.acquire("b") == sa
    assert cache.slots[sa] == ("b", 1)
    assert cache.resident == ["b"]


def test_refcount_needs_every_release():
    cache, _ = make_cache(1, "a", "b")
    cache.acquire("a")
    cache.acquire("a")
    cache.release("a")
    assert cache.acquire("b") is None  # a still has one user
    cache.release("a")
    assert cache.acquire("b") is not None


def test_unregister_idle_frees_its_slot_at_once():
    cache, _ = make_cache(2, "a")
    s = cache.acquire("a")
    cache.release("a")
    cache.unregister("a")
    assert not cache.is_available("a")
    assert cache.slots[s] is None and cache.resident == []
    with pytest.raises(KeyError):
        cache.acquire("a")
    with pytest.raises(KeyError):
        cache.unregister("a")


def test_unregister_while_in_use_keeps_the_slot_until_the_last_release():
    cache, _ = make_cache(2, "a")
    s = cache.acquire("a")
    cache.acquire("a")
    cache.unregister("a")
    assert not cache.is_available("a")
    assert cache.slots[s] == ("a", 1)  # the running users keep computing with it
    with pytest.raises(KeyError):
        cache.acquire("a")  # no new user
    with pytest.raises(ValueError, match="being removed"):
        cache.register(adapter("a", version=2))
    cache.release("a")
    assert cache.slots[s] == ("a", 1) and "a" in cache.resident
    cache.release("a")
    assert cache.slots[s] is None and cache.resident == [] and cache.in_use == {}
    cache.register(adapter("a", version=2))  # allowed again once it is gone
    assert cache.slots[cache.acquire("a")] == ("a", 2)


def test_retired_slot_is_not_given_to_others_while_held():
    cache, _ = make_cache(1, "a", "b")
    cache.acquire("a")
    cache.unregister("a")
    assert cache.acquire("b") is None
    cache.release("a")
    assert cache.acquire("b") == 0


def test_reregister_replaces_the_weights_of_an_idle_adapter():
    cache, builds = make_cache(2, "a")
    s = cache.acquire("a")
    assert cache.slots[s] == ("a", 1)
    cache.release("a")
    cache.register(adapter("a", version=2))
    assert cache.slots[s] is None  # the old weights left the slot
    s2 = cache.acquire("a")
    assert cache.slots[s2] == ("a", 2)
    assert builds.calls == ["a", "a"]
    assert cache.registered["a"].config["version"] == 2


def test_reregister_while_in_use_is_refused():
    cache, _ = make_cache(2, "a")
    s = cache.acquire("a")
    with pytest.raises(ValueError, match="in use"):
        cache.register(adapter("a", version=2))
    assert cache.slots[s] == ("a", 1) and cache.registered["a"].config["version"] == 1
    cache.release("a")
    cache.register(adapter("a", version=2))
    assert cache.slots[cache.acquire("a")] == ("a", 2)


def test_pinned_requests_keep_a_retired_adapter_loadable():
    """A request accepted before the unload (pinned) still gets the adapter, even after its slot was freed."""
    cache, builds = make_cache(1, "a", "b")
    cache.pin("a")  # accepted, waiting
    cache.unregister("a")
    assert not cache.is_available("a")
    with pytest.raises(KeyError):
        cache.pin("a")  # new requests are refused
    with pytest.raises(ValueError, match="being removed"):
        cache.register(adapter("a", version=2))
    s = cache.acquire("a")  # the accepted request is admitted with the old weights
    assert cache.slots[s] == ("a", 1)
    cache.release("a")  # e.g. preempted
    assert cache.acquire("b") == s  # an idle retired adapter can be evicted ...
    cache.release("b")
    s = cache.acquire("a")  # ... and reloaded for its pinned request
    assert cache.slots[s] == ("a", 1) and builds.calls == ["a", "b", "a"]
    cache.release("a")
    cache.unpin("a")  # the last request finished: everything about a is gone
    assert cache.pinned == {} and cache.in_use == {} and "a" not in cache.resident
    with pytest.raises(KeyError):
        cache.acquire("a")
    cache.register(adapter("a", version=2))


def test_a_failed_build_does_not_leak_the_slot():
    calls = []

    def build(a):
        calls.append(a.name)
        if a.name == "bad":
            raise RuntimeError("out of memory")
        return a.name

    cache = AdapterCache(1, build)
    for n in ("a", "bad", "b"):
        cache.register(adapter(n))
    cache.acquire("a")
    cache.release("a")
    with pytest.raises(RuntimeError):
        cache.acquire("bad")  # evicts a, then fails to build
    assert cache.in_use == {}
    assert cache.acquire("b") == 0  # the slot is still usable
    assert cache.slots == ["b"]
