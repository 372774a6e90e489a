"""Video-token compression settings: one validated, immutable record, and the ONE validator of each setting.

``compressor`` picks the method (the registered ones: :mod:`llava.compression.registry`); ``dycoke=True`` is the
DyCoke paper's spelling of ``compressor="dycoke"``. Each method declares its own arguments when it registers.
Values come as Python values
(``load_pretrained_model(..., dycoke_p=0.7)``, ``model.dycoke_l = 2``) or as the strings of lmms-eval model args
(``dycoke=True,dycoke_l=3``, read by :func:`parse_setting`); :func:`check_setting` returns the typed value or
raises a ValueError that names the argument and its allowed values. Every other module (the compressors, the model's attributes, the
lmms-eval plugin) validates through it.
"""

from __future__ import annotations

import warnings
from types import MappingProxyType
from typing import Any

from llava.compression import registry
from llava.compression.registry import ALIASES, ARGUMENTS, METHODS, OWNER, Argument, method, method_names

__all__ = ["KEEP_POSITIONS", "CompressionSettings", "check_setting", "composes_with_kv_pruning", "compressors",
           "layer_arguments", "method_arguments", "parse_setting", "pop_compression_kwargs", "setting_names",
           "settings_from_kwargs"]


class CompressionSettings:
    """The compression a model applies: ``compressor``, whether DyCoke's KV pruning follows a pre-LLM method
    (``kv_pruning``, see :func:`settings_from_kwargs`), whether the video tokens a pre-LLM method keeps keep their
    uncompressed positions (``keep_positions``, a public flag of every method) and the value of every registered
    method's arguments (immutable; ``replace`` makes a changed copy). Build it with :func:`settings_from_kwargs`
    (validated); read a value as an attribute (``settings.dycoke_p``)."""

    __slots__ = ("_values",)

    def __init__(self, compressor: str = "none", kv_pruning: bool = False, keep_positions: bool = False,
                 **values: Any):
        defaults = {name: argument.default for name, argument in ARGUMENTS.items()}
        unknown = sorted(set(values) - set(defaults))
        if unknown:
            raise TypeError(f"CompressionSettings got unknown argument(s) {unknown}")
        core = {"compressor": compressor, "kv_pruning": kv_pruning, "keep_positions": keep_positions}
        object.__setattr__(self, "_values", MappingProxyType({**core, **defaults, **values}))

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"CompressionSettings has no argument {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"CompressionSettings is immutable: use settings.replace({name}=...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressionSettings) and dict(self._values) == dict(other._values)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        return f"CompressionSettings({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def replace(self, **changes: Any) -> CompressionSettings:
        values = dict(self._values)
        values.update(changes)
        return CompressionSettings(**values)

    @property
    def dycoke(self) -> bool:
        return self.compressor == "dycoke"

    def as_dict(self) -> dict:
        return dict(self._values)


BOOLEAN = "flag"


def compressors() -> tuple[str, ...]:
    """The registered method names (``none`` first, then by name)."""
    return method_names()


def method_arguments(name: str) -> tuple[str, ...]:
    """The public names of method ``name``'s own arguments."""
    return tuple(argument.name for argument in method(name).arguments)


def setting_names() -> tuple[str, ...]:
    """Every name a compression setting may be given by: ``compressor``, ``dycoke``, ``keep_positions``, the
    arguments, the aliases."""
    return ("compressor", "dycoke", "keep_positions", *ARGUMENTS, *ALIASES)


# ``dycoke=True`` is the DyCoke paper's spelling of ``compressor="dycoke"``.
_DYCOKE_FLAG = Argument("dycoke", False, "flag", "the same as compressor='dycoke'")
# Not a method's argument: it applies to whichever pre-LLM method is selected (and changes nothing without one).
KEEP_POSITIONS = Argument(
    "keep_positions", False, "flag",
    "the video tokens a pre-LLM method keeps keep their uncompressed positions (RoPE), in their original order, "
    "newlines and later text too, and decoding continues at the uncompressed length (default: off, renumbered "
    "as the public methods do)",
)


def check_setting(name: str, value: Any, num_layers: int | None = None) -> Any:
    """``value`` as the typed value of setting ``name``, or a ValueError naming the setting and what it allows.

    ``num_layers`` (the language model's decoder layers), when known, bounds the layer settings. Strings are not
    numbers here: :func:`parse_setting` reads the strings of lmms-eval model args first.
    """
    name = ALIASES.get(name, name)
    if name == "compressor":
        choice = str(value).strip().lower()
        if choice not in METHODS:
            raise ValueError(f"compressor={value!r}; allowed: {', '.join(method_names())}.")
        return choice
    if name == "dycoke":
        return _DYCOKE_FLAG.check(value)
    if name == "keep_positions":
        return KEEP_POSITIONS.check(value)
    if name not in ARGUMENTS:
        raise ValueError(f"Unknown compression argument {name!r}; valid: {', '.join(sorted(setting_names()))}.")
    return registry.check_setting(name, value, num_layers)


def layer_arguments(settings: CompressionSettings | None = None) -> tuple[str, ...]:
    """The arguments that name a decoder layer (bounded by the model's layer count); with ``settings``, those its
    method uses (its own, and DyCoke's when its KV pruning follows). The others are not checked against a model:
    a default such as FlashVID's layer 20 must not refuse a 4-layer model that runs another method."""
    names = tuple(name for name, argument in ARGUMENTS.items() if argument.within == "layer")
    if settings is None:
        return names
    used = {argument.name for argument in method(settings.compressor).arguments}
    if settings.kv_pruning:
        used.update(KV_PRUNING_ARGUMENTS)
    return tuple(name for name in names if name in used)


def _is_flag(name: str) -> bool:
    return name in ("dycoke", "keep_positions") or (name in ARGUMENTS and ARGUMENTS[name].within == BOOLEAN)


def parse_setting(name: str, value: Any) -> Any:
    """The value of a model arg given as a string (``dycoke=True,dycoke_p=0.7`` in lmms-eval), others as they are."""
    if not isinstance(value, str) or ALIASES.get(name, name) == "compressor":
        return value
    text = value.strip()
    if _is_flag(ALIASES.get(name, name)):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name}={value!r}; allowed: True or False.")
        return text.lower() in ("true", "1")
    if text.lower() in ("", "none"):
        return None
    try:
        return float(text) if any(c in text.lower() for c in ".en") else int(text)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number.") from None


# ---- building settings ----------------------------------------------------------------------------------------


def settings_from_kwargs(
    values: dict, base: CompressionSettings | None = None, num_layers: int | None = None
) -> CompressionSettings:
    """Validated settings: ``base`` (default: the defaults) with ``values`` applied.

    Naming a method (``compressor=...``, ``dycoke=True``) starts it from its defaults: its arguments not given in the
    same call are reset; a call without a method name changes only what it gives. Unknown names and invalid values
    are a ValueError naming them; ``dycoke`` contradicting ``compressor`` is an error; a method's own arguments given
    while another method is selected are warned about (they do nothing).
    """
    values = {ALIASES.get(name, name): value for name, value in values.items()}
    unknown = sorted(set(values) - set(setting_names()))
    if unknown:
        raise ValueError(f"Unknown compression argument(s) {unknown}; valid: {', '.join(sorted(setting_names()))}.")
    checked = {name: check_setting(name, parse_setting(name, value), num_layers) for name, value in values.items()}
    settings = base or CompressionSettings()
    compressor = checked.pop("compressor", None)
    dycoke = checked.pop("dycoke", None)
    if dycoke is not None and compressor is not None and dycoke != (compressor == "dycoke"):
        raise ValueError(
            f"dycoke={dycoke} contradicts compressor={compressor!r}: pass one of them "
            "(dycoke=True is the same as compressor='dycoke')."
        )
    if compressor is None and dycoke is not None:
        compressor = "dycoke" if dycoke else ("none" if settings.compressor == "dycoke" else settings.compressor)
    if compressor is not None:
        checked["compressor"] = compressor
        # Naming a method (compressor=..., dycoke=True) starts it from its defaults, as lmms-eval model args and
        # LLaVA-NeXT's overwrite_config do: its arguments not given in this call go back to their defaults.
        for argument in method(compressor).arguments:
            checked.setdefault(argument.name, argument.default)
    settings = settings.replace(**checked)
    settings = settings.replace(kv_pruning=_composes_kv_pruning(settings, values, switched=compressor is not None))
    if num_layers is not None:  # a base validated without the layer count, or another model's settings
        for name in layer_arguments(settings):
            check_setting(name, getattr(settings, name), num_layers)
    _warn_ignored(settings, values)
    return settings


# DyCoke's decode-time arguments; given with a method that only works before the LM, they add DyCoke's KV pruning.
KV_PRUNING_ARGUMENTS = ("dycoke_l", "dycoke_p", "dycoke_public_quirks")


def composes_with_kv_pruning(compressor: str, settings: CompressionSettings | None = None) -> bool:
    """Whether DyCoke's KV pruning can follow ``compressor`` (with ``settings``, by default its defaults): a method
    that compresses before the LM only (FlashVID with its in-LLM pruning off, ``flashvid_llm_retention_ratio=1``)."""
    if compressor in ("none", "dycoke"):
        return False
    stages = method(compressor).build(settings if settings is not None else CompressionSettings(compressor))
    return stages.video is not None and stages.decoder is None


def _composes_kv_pruning(settings: CompressionSettings, given: dict, switched: bool) -> bool:
    """``kv_pruning`` after a change: on when DyCoke's pruning arguments come with (or for) a pre-LLM method, e.g.
    ``compressor="evs", dycoke_p=0.7``; off when the method changes without them; else as it was."""
    if not composes_with_kv_pruning(settings.compressor, settings):
        return False
    if any(name in given for name in KV_PRUNING_ARGUMENTS):
        return True
    return False if switched else settings.kv_pruning


def _warn_ignored(settings: CompressionSettings, given: dict) -> None:
    composed = KV_PRUNING_ARGUMENTS if settings.kv_pruning else ()
    ignored = [name for name in given if name in OWNER and OWNER[name] != settings.compressor and name not in composed]
    if ignored:
        owners = ", ".join(f"compressor='{OWNER[name]}' for {name}" for name in ignored)
        warnings.warn(
            f"Compression argument(s) {', '.join(ignored)} do nothing with compressor={settings.compressor!r}; "
            f"select the method they belong to ({owners}; dycoke=True is compressor='dycoke').",
            stacklevel=3,
        )


def pop_compression_kwargs(kwargs: dict) -> dict:
    """Remove and return the compression arguments from a keyword dict (e.g. ``load_pretrained_model``'s)."""
    names = set(setting_names())
    return {name: kwargs.pop(name) for name in list(kwargs) if name in names}
