"""The compression methods by name, each with its arguments declared once.

A method is one module that declares its arguments and registers a builder::

    @register("vidcom2", Argument("vidcom2_r", 0.25, "(0, 1]", "share of video tokens kept"),
              summary="VidCom2: frame-adaptive token selection before the LM", examples=({"vidcom2_r": 0.5},))
    def build(settings) -> Stages:
        return Stages(video=VidCom2(settings.vidcom2_r))

Everything else is generated from the declarations: the settings record and its validator (range errors name the
argument), the model attributes, the ``llava-video`` options, the lmms-eval model args and the parametrised tests
over every method (``tests/test_every_method.py``). The builder returns the method's :class:`Stages`: a video
compressor that runs on each video's pooled features before the language model, a decode-time compressor that runs
in its decoder layers, or both.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["ARGUMENTS", "METHODS", "Argument", "Method", "Stages", "check_setting", "register"]


@dataclass(frozen=True)
class Argument:
    """One argument of a method, under its public (prefixed) name.

    ``within`` is the allowed range: an interval of numbers (``"[0, 1)"``, ``"(0, 1]"``, ``"[1, inf)"``), ``"layer"``
    (an integer in [1, num_hidden_layers - 1]), or ``"flag"`` (True/False). ``integer`` asks for whole numbers;
    ``optional`` allows None (a value the input decides when left unset).
    """

    name: str
    default: Any
    within: str
    help: str
    integer: bool = False
    optional: bool = False
    option: bool = True  # has a ``llava-video`` option (False: a compatibility argument the input decides)

    @property
    def allowed(self) -> str:
        """The allowed values in words, for help texts."""
        if self.within == "layer":
            return "an integer in [1, layers-1]"
        if self.within == "flag":
            return "True or False"
        return f"{'an integer' if self.integer else 'a number'} in {self.within}"

    @property
    def kind(self) -> str:
        """``flag``, ``layer``, ``integer`` or ``number`` (what a command-line option parses)."""
        if self.within in ("flag", "layer"):
            return self.within
        return "integer" if self.integer else "number"

    def check(self, value: Any, num_layers: int | None = None) -> Any:
        """``value`` as this argument's typed value, or a ValueError naming it and what it allows."""
        name = self.name
        if isinstance(value, str):
            raise ValueError(f"{name}={value!r} must be a {'bool' if self.kind == 'flag' else 'number'}, not a string.")
        if self.kind == "flag":
            if isinstance(value, bool):
                return value
            if isinstance(value, numbers.Integral) and value in (0, 1):
                return bool(value)
            raise ValueError(f"{name}={value!r}; allowed: True or False.")
        if value is None and self.optional:
            return None
        number = _number(name, value)
        if self.kind in ("layer", "integer"):
            if number != int(number):
                raise ValueError(f"{name}={value!r} must be an integer.")
            number = int(number)
        if self.kind == "layer":
            top = num_layers - 1 if num_layers is not None else None
            if number < 1 or (top is not None and number > top):
                allowed = f"[1, {top}] for this {num_layers}-layer model" if top is not None else "[1, num_hidden_layers - 1]"
                raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}.")
            return number
        low, high, low_open, high_open = _interval(self.within)
        if number < low or number > high or (low_open and number == low) or (high_open and number == high):
            raise ValueError(f"{name}={value!r} is out of range; allowed: {self.within}.")
        return number


@dataclass(frozen=True)
class Stages:
    """What a method runs: before the language model on each video, and/or in its decoder layers."""

    video: Any = None  # a VideoTokenCompressor, or None
    decoder: Any = None  # a DecodeCompressor, or None


@dataclass(frozen=True)
class Method:
    """A registered method: its name, arguments and builder."""

    name: str
    arguments: tuple[Argument, ...]
    build: Callable[[Any], Stages]  # settings -> Stages
    summary: str  # "Label: what it does"
    examples: tuple[dict, ...] = ()  # settings worth testing (an easy and a hard one)
    aliases: dict[str, str] = field(default_factory=dict)  # other spellings of argument names

    @property
    def label(self) -> str:
        """The method's display name (``DyCoke``), from its summary."""
        return self.summary.split(":")[0]


METHODS: dict[str, Method] = {}
ARGUMENTS: dict[str, Argument] = {}  # every method's arguments, by public name
OWNER: dict[str, str] = {}  # argument name -> the method that declares it
ALIASES: dict[str, str] = {}


def register(name: str, *arguments: Argument, summary: str, examples: tuple[dict, ...] = (),
             aliases: dict[str, str] | None = None):
    """Register the decorated builder as method ``name`` (duplicates of a method or argument name are refused)."""

    def decorator(build: Callable[[Any], Stages]) -> Callable[[Any], Stages]:
        if name in METHODS:
            raise ValueError(f"compression method {name!r} is registered twice")
        taken = [argument.name for argument in arguments if argument.name in ARGUMENTS]
        if taken:
            raise ValueError(f"{name}: argument(s) {taken} already belong to {[OWNER[n] for n in taken]}")
        METHODS[name] = Method(name, tuple(arguments), build, summary, tuple(examples), dict(aliases or {}))
        for argument in arguments:
            ARGUMENTS[argument.name] = argument
            OWNER[argument.name] = name
        ALIASES.update(aliases or {})
        return build

    return decorator


def method_names() -> tuple[str, ...]:
    """The registered methods: ``none`` (the baseline) first, then by name."""
    return tuple(sorted(METHODS, key=lambda name: (name != "none", name)))


def method(name: str) -> Method:
    """The registered method ``name``, or a ValueError listing the registered ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"compressor={name!r}; allowed: {', '.join(method_names())}.") from None


def check_setting(name: str, value: Any, num_layers: int | None = None) -> Any:
    """``value`` as the typed value of argument ``name`` (any method's), or a ValueError naming it and what it allows.
    ``num_layers`` (the language model's decoder layers), when known, bounds the layer arguments."""
    name = ALIASES.get(name, name)
    if name not in ARGUMENTS:
        raise ValueError(f"Unknown compression argument {name!r}; valid: {', '.join(sorted(ARGUMENTS))}.")
    return ARGUMENTS[name].check(value, num_layers)


def _number(name: str, value: Any) -> float:
    """A finite real number; bools are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} is not a number.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number.")
    return value


_INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.]+|-inf)\s*,\s*(-?[\d.]+|inf)\s*([\])])$")


def _interval(within: str) -> tuple[float, float, bool, bool]:
    """``"[0, 1)"`` -> (0.0, 1.0, False, True)."""
    match = _INTERVAL.match(within)
    if match is None:
        raise ValueError(f"not an interval: {within!r}")
    return float(match.group(2)), float(match.group(3)), match.group(1) == "(", match.group(4) == ")"


def arguments_table() -> str:
    """The compression arguments of every registered method as a Markdown table (docs/evaluation.md holds it; a
    test checks that it is current)."""
    rows = ["| method (`compressor=`) | argument | allowed | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for name in method_names():
        registered = METHODS[name]
        if not registered.arguments:
            rows.append(f"| `{name}` | | | | {registered.summary} |")
        for argument in registered.arguments:
            aliases = [alias for alias, target in registered.aliases.items() if target == argument.name]
            shown = f"`{argument.name}`" + "".join(f" (alias `{alias}`)" for alias in aliases)
            rows.append(f"| `{name}` | {shown} | {argument.allowed} | {argument.default} | {argument.help} |")
    return "\n".join(rows)
