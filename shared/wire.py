"""The wire codec for mesh messages: msgpack envelopes, checked against the message's typed schema on receipt.

A message class is a dataclass whose fields carry type hints (str, int, float, bool, bytes, `X | None`,
`list[X]`, `dict[str, X]`, `Any`, or another message dataclass). On the wire every message is a msgpack map
`{"v": PROTOCOL_VERSION, "t": <class name>, "b": {field: value, ...}}`. `decode` checks the version, the type,
that every field without a default is present and that every value has its declared type; anything else raises
ProtocolError (one line) so a service can log it and answer with an error instead of crashing.
Unknown fields are ignored, so a newer sender may add optional fields within one protocol version.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any, TypeVar

import msgpack

PROTOCOL_VERSION = 1

T = TypeVar("T")


class ProtocolError(ValueError):
    """A message that cannot be decoded or does not match its schema."""


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check(value: Any, hint: Any, where: str) -> Any:
    """`value` converted to `hint` (nested dataclasses are built); ProtocolError if it does not fit."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, where)
            except ProtocolError as exc:
                errors.append(str(exc))
        raise ProtocolError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(hint)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ProtocolError(f"{where}: expected a list of {len(items)} items")
        return tuple(_check(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, items)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {_check(k, key_hint, f"{where} key"): _check(v, value_hint, f"{where}[{k!r}]") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if hint is int and isinstance(value, bool):
        raise ProtocolError(f"{where}: expected an integer, got bool")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ProtocolError(f"{where}: expected {_type_name(hint)}, got {type(value).__name__}")
    return value


def from_dict(cls: type[T], data: Any, where: str | None = None) -> T:
    """Build message `cls` from a plain map, checking every field (ProtocolError on a mismatch)."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ProtocolError(f"{where}: expected a map, got {type(data).__name__}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _check(data[f.name], _hints(cls)[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{where}: missing field {f.name!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a message's own __post_init__ check
        raise ProtocolError(f"{where}: {exc}") from None


def to_dict(message: Any) -> dict[str, Any]:
    return dataclasses.asdict(message)


def encode(message: Any) -> bytes:
    """A message dataclass as msgpack bytes, in its versioned envelope."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "t": type(message).__name__, "b": to_dict(message)}, use_bin_type=True)


def decode(data: bytes, *expected: type) -> Any:
    """The message in `data`, which must be one of the `expected` classes; ProtocolError otherwise."""
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types on bad input
        raise ProtocolError(f"not a msgpack message ({type(exc).__name__})") from None
    if not isinstance(envelope, dict) or not {"v", "t", "b"} <= envelope.keys():
        raise ProtocolError("not a mesh message envelope (v, t, b)")
    if envelope["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {envelope['v']!r} is not supported (this side speaks {PROTOCOL_VERSION})")
    by_name = {cls.__name__: cls for cls in expected}
    cls = by_name.get(envelope["t"])
    if cls is None:
        raise ProtocolError(f"unexpected message type {envelope['t']!r} (expected {', '.join(by_name)})")
    return from_dict(cls, envelope["b"])
