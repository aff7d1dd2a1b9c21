"""The field types of the run configuration, and the checks they imply (megatron_jp.config uses them).

A field's annotation says everything a value must satisfy on its own: `Literal[...]` lists its
choices, `Annotated[int | float, Range(...)]` its bounds (the aliases below), `Stages` and `RampUp`
are curricula parsed from their "STEP:VALUE,..." / "START INCREMENT STEPS" text. `coerce` turns a YAML
or command-line value into the type and checks it, naming the key. Imports nothing of megatron_jp.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Literal


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what to do."""


def require(ok: bool, message: str):
    """Raise ConfigError(message) unless `ok`: the form of every check that fields make together."""
    if not ok:
        raise ConfigError(message)


# ----------------------------------------------------------------------------- field types


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field: low <= value <= high, or strict where `open` says so. Floats must
    also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""  # the reason for the bound, shown with it

    def contains(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        why = f" ({self.why})" if self.why else ""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}{why}"
        high = f"{self.high:,}" if isinstance(self.high, int) else f"{self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {high}{')' if self.high_open else ']'}{why}"


INT_LIMIT = 2**53  # integers above it lose precision in float arithmetic and in JSON readers
_BIG = "beyond 2**53 integers lose precision in float arithmetic and JSON; no count of a run comes near it"
Positive = Annotated[int, Range(1, INT_LIMIT, why=_BIG)]
NonNegative = Annotated[int, Range(0, INT_LIMIT, why=_BIG)]
SeqLength = Annotated[int, Range(8, 1 << 20, why="a million tokens per row: far beyond any encoder's context")]
Seed = Annotated[int, Range(0, 2**63 - 2**32, why="torch and numpy take 64-bit seeds; per-rank offsets are added")]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Probability = Annotated[float, Range(0, 1)]
OpenUnit = Annotated[float, Range(0, 1, low_open=True, high_open=True)]
DropoutRate = Annotated[float, Range(0, 1, high_open=True)]
Beta = Annotated[float, Range(0, 1, high_open=True)]

GluActivation = Literal["swiglu", "geglu", "geglu_tanh"]
Activation = Literal["gelu", GluActivation]
GLU_ACTIVATIONS: tuple[str, ...] = typing.get_args(GluActivation)


@dataclass(frozen=True)
class Stages:
    """A curriculum "STEP:VALUE,..." (e.g. "0:128,31000:256"), parsed: steps start at 0 and increase.
    Empty: no curriculum."""

    points: tuple[tuple[int, float], ...] = ()

    @classmethod
    def parse(cls, text: str, key: str) -> "Stages":
        points = []
        for item in filter(None, (part.strip() for part in str(text).split(","))):
            try:
                step, value = item.split(":")
                number = float(value)
                points.append((int(step), int(number) if number.is_integer() and "." not in value else number))
            except ValueError:
                raise ConfigError(f"{key}: cannot read {item!r}; write STEP:VALUE pairs like "
                                  f"\"0:128,1000:256\"") from None
        if points and (points[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(points, points[1:]))):
            raise ConfigError(f"{key}: stages must start at step 0 and have increasing steps, got {text!r}")
        return cls(tuple(points))

    def values(self) -> list:
        return [value for _, value in self.points]

    def __bool__(self) -> bool:
        return bool(self.points)

    def __str__(self) -> str:
        return ",".join(f"{step}:{value}" for step, value in self.points)


@dataclass(frozen=True)
class Blend:
    """A Megatron-style data blend, "prefix" or "w1 prefix1 w2 prefix2 ...", parsed once when the config
    is read: (weight, prefix) pairs with the weights normalised to sum 1. Empty: no data named."""

    sources: tuple[tuple[float, str], ...] = ()
    text: str = ""

    @classmethod
    def parse(cls, text: str, key: str) -> "Blend":
        items = str(text).split()
        if len(items) <= 1:
            return cls(tuple((1.0, item) for item in items), " ".join(items))
        if len(items) % 2:
            raise ConfigError(f"{key} = {text!r}: expected weight/prefix pairs, got an odd number of items")
        pairs = []
        for weight, prefix in zip(items[::2], items[1::2]):
            try:
                pairs.append((float(weight), prefix))
            except ValueError:
                raise ConfigError(f"{key} = {text!r}: {weight!r} is not a weight (format: 'w1 prefix1 w2 "
                                  f"prefix2')") from None
        if any(w < 0 or not math.isfinite(w) for w, _ in pairs) or sum(w for w, _ in pairs) <= 0:
            raise ConfigError(f"{key} = {text!r}: weights must be finite, >= 0 and not all 0")
        total = sum(w for w, _ in pairs)
        return cls(tuple((w / total, p) for w, p in pairs), " ".join(items))

    def __bool__(self) -> bool:
        return bool(self.sources)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class RampUp:
    """Megatron's batch-size ramp-up "START INCREMENT STEPS", parsed."""

    start: int
    increment: int
    steps: int

    @classmethod
    def parse(cls, text: str, key: str) -> "RampUp | None":
        if not str(text).strip():
            return None
        try:
            start, increment, steps = (int(v) for v in str(text).split())
        except ValueError:
            raise ConfigError(f"{key}: expected \"START INCREMENT STEPS\", got {text!r}") from None
        if min(start, increment, steps) < 1:
            raise ConfigError(f"{key}: START, INCREMENT and STEPS must be >= 1, got {text!r}")
        return cls(start, increment, steps)

    def __str__(self) -> str:
        return f"{self.start} {self.increment} {self.steps}"


# ----------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class FieldType:
    """What a field's annotation says: the Python type, the choices of a Literal, the Range."""

    base: type
    choices: tuple = ()
    range: Range | None = None
    optional: bool = False


def field_type(annotation) -> FieldType:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        inner = field_type(args[0])
        return dataclasses.replace(inner, range=next((a for a in args[1:] if isinstance(a, Range)), None))
    if origin is Literal:
        return FieldType(str, args)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return dataclasses.replace(field_type(inner), optional=True)
    return FieldType(annotation)


@functools.cache
def section_fields(cls) -> dict[str, FieldType]:
    return {name: field_type(hint) for name, hint in typing.get_type_hints(cls, include_extras=True).items()}


def coerce(value, ftype: FieldType, key: str):
    """Turn a YAML or command-line value into the field's type and check it, or say why it can't be."""
    if ftype.optional and (value is None or str(value).strip().lower() in ("", "auto", "none", "null")):
        return None
    typed = _convert(value, ftype.base, key)
    if typed is _INVALID:
        raise ConfigError(f"{key} = {value!r} is not a valid {ftype.base.__name__}")
    if ftype.choices and typed not in ftype.choices:
        raise ConfigError(f"{key} = {typed!r}; choose one of {', '.join(ftype.choices)}")
    if ftype.range is not None and not ftype.range.contains(typed):
        raise ConfigError(f"{key} = {typed!r} is out of range: it must be {ftype.range}")
    return typed


_INVALID = object()
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _convert(value, typ, key: str):
    if typ in (Stages, RampUp, Blend):
        return value if isinstance(value, typ) else typ.parse("" if value is None else value, key)
    if isinstance(value, bool):
        return value if typ is bool else _INVALID
    if typ is bool:
        text = str(value).lower()
        return True if text in _TRUE else False if text in _FALSE else _INVALID
    if typ is int:
        if isinstance(value, float):
            return int(value) if value.is_integer() else _INVALID
        return _parse(int, str(value).replace("_", "")) if isinstance(value, (int, str)) else _INVALID
    if typ is float:
        return _parse(float, value) if isinstance(value, (int, float, str)) else _INVALID
    return str(value) if isinstance(value, (str, int, float)) else _INVALID


def _parse(cast, value):
    try:
        return cast(value)
    except ValueError:
        return _INVALID


def check_fields(section, name: str):
    """Every field of one section (a dataclass) against its type, choices and range; `name` is the
    section's key prefix in messages."""
    for key, ftype in section_fields(type(section)).items():
        # object.__setattr__: frozen sections (ModelConfig) are checked while they are built
        object.__setattr__(section, key, coerce(getattr(section, key), ftype, f"{name}.{key}"))


class Checked:
    """Base of a configuration section: building one checks every field on its own (type, choices,
    range), so a config made in Python meets the same checks as a file or the command line."""

    SECTION = ""  # the section's key prefix in messages (no annotation: not a dataclass field)

    def __post_init__(self):
        check_fields(self, self.SECTION)
