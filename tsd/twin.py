"""Frozen, slotted records built and copied through a twin class with the same slots.

A frozen dataclass refuses plain attribute stores, so its own `__init__` sets each
field by name through `object.__setattr__`, and `dataclasses.replace` goes through
that `__init__` after a Python loop over the fields; calling each slot's descriptor
is not much cheaper. The functions made here fill a twin instead: a plain class
with the very same slots, hence the same memory layout, whose stores are the
interpreter's fast slot stores; the filled object then becomes a record of the
real class (CPython allows `__class__` to change between classes of one layout).

Three uses on the daemon's hot paths: `record_builder` decodes 100,000 rows at a
start (tsd.jobrows: half the time of the descriptors, which were a third of the
load); `record_copier` copies a `Job` at each of its state changes
(tsd.model.replace: four a job, about a tenth of the daemon's CPU at 16 slots
when they went through the descriptors, a quarter of that now); `record_maker`
makes each job's launch plan (tsd.jobplan), which its supervisor decodes with a
builder (tsd.spawner).

Pure: records in, records out.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from types import MemberDescriptorType

# typing stays unloaded: tsd.model imports this module, and some `ts` command lines
# import the model (tests/unit/test_cli_parse.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any, TypeVar

    R = TypeVar("R")


def _twin(cls: type[Any]) -> type[Any]:
    """A plain class with the slots of `cls`, a slotted dataclass without
    `__post_init__` whose only base is `object` (as the model's records are)."""
    slots = tuple(getattr(cls, "__slots__", ()))
    if (
        hasattr(cls, "__post_init__")
        or cls.__bases__ != (object,)
        or slots != tuple(f.name for f in fields(cls))
        or not all(isinstance(cls.__dict__.get(n), MemberDescriptorType) for n in slots)
    ):
        raise TypeError(f"{cls.__name__} is not a slotted dataclass without __post_init__")
    return type(f"_{cls.__name__}Twin", (), {"__slots__": slots})


def _filler(cls: type[R], given: Sequence[str] | None) -> Callable[..., R]:
    """A straight-line function that fills a twin and returns it as a `cls`: its
    parameters are the fields `given`, in that order (every other field at its
    default), or with `given` None every field, in field order, with its default.

    The function's own names start with two underscores: no field's can (a class
    body mangles such a name), so none shadows them."""
    twin = _twin(cls)
    ns: dict[str, Any] = {"__new": object.__new__, "__twin": twin, "__cls": cls}
    params = [] if given is None else list(given)
    body = []
    for i, f in enumerate(fields(cls)):  # type: ignore[arg-type]
        default = None  # the name its default goes by in the function, if it has one
        if f.default is not MISSING:
            default = f"__default{i}"
            ns[default] = f.default
        if given is None:
            if f.default_factory is not MISSING:
                raise TypeError(f"{cls.__name__}.{f.name} has a default factory")
            params.append(f.name if default is None else f"{f.name}={default}")
        elif f.name not in given:
            if default is None:
                raise ValueError(f"{cls.__name__}.{f.name} has no default and is not given")
            body.append(f"    __o.{f.name} = {default}\n")
            continue
        body.append(f"    __o.{f.name} = {f.name}\n")
    src = (
        f"def fill({', '.join(params)}):\n    __o = __new(__twin)\n{''.join(body)}"
        "    __o.__class__ = __cls\n    return __o\n"
    )
    exec(src, ns)  # as dataclasses builds __init__: one straight-line function per class
    fill: Callable[..., R] = ns["fill"]
    return fill


def record_builder(cls: type[R], names: Sequence[str]) -> Callable[..., R]:
    """A function of the fields `names` (positional, in that order) that returns the same
    record as `cls(**dict(zip(names, values)))`, every other field at its default."""
    unknown = set(names) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"{cls.__name__}: not its fields, or repeated: {sorted(unknown)}")
    return _filler(cls, names)


def record_maker(cls: type[R]) -> Callable[..., R]:
    """A function that takes the fields of `cls` as `cls(...)` does (positional, or by
    name, with the same defaults) and returns the same record. For hot constructions
    only: the caller keeps `cls` itself for mypy (`maker = cls if TYPE_CHECKING else
    record_maker(cls)`), as a maker's signature is not checked."""
    return _filler(cls, None)


def record_copier(cls: type[R]) -> Callable[[R, Mapping[str, Any]], R]:
    """A function (record, changes) that returns what `dataclasses.replace(record,
    **changes)` does for a record of exactly `cls`: a copy with those fields changed.
    A name that is not a field raises TypeError, as replace's `__init__` would."""
    twin = _twin(cls)
    names = frozenset(twin.__slots__)

    def refuse(changes: Mapping[str, Any]) -> None:
        bad = sorted(set(changes) - names)
        if bad:
            raise TypeError(f"{cls.__name__} has no field {bad[0]!r}")

    ns: dict[str, Any] = {"new": object.__new__, "twin": twin, "cls": cls, "refuse": refuse}
    body = "".join(f"    o.{name} = s.{name}\n" for name in twin.__slots__)
    src = (
        f"def copy(s, changes):\n    o = new(twin)\n{body}"
        "    try:\n"
        "        for name, value in changes.items():\n            setattr(o, name, value)\n"
        "    except AttributeError:\n        refuse(changes)\n        raise\n"
        "    o.__class__ = cls\n    return o\n"
    )
    exec(src, ns)
    copy: Callable[[R, Mapping[str, Any]], R] = ns["copy"]
    return copy
