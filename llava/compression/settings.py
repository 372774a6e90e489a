"""Video-token compression settings: one validated, immutable record, and the ONE validator of each setting.

``compressor`` picks the method (``none``, ``dycoke``, ``vidcom2``, ``fastv``); ``dycoke=True`` is the DyCoke
paper's spelling of ``compressor="dycoke"``. Each method has its own arguments. Values come as Python values
(``load_pretrained_model(..., dycoke_p=0.7)``, ``model.dycoke_l = 2``) or as the strings of lmms-eval model args
(``dycoke=True,dycoke_l=3``, read by :func:`parse_setting`); :func:`check_setting` returns the typed value or
raises a ValueError that names the argument and its allowed values. Every other module (the compressors, the model's attributes, the
lmms-eval plugin) validates through it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

COMPRESSORS = ("none", "dycoke", "vidcom2", "fastv")
# Names the DyCoke README uses for the same thing.
ALIASES = {"dycoke_num_image_per_frame": "dycoke_num_tokens_per_frame"}
# The arguments that belong to each method: given while another method is selected, they are ignored (warned).
METHOD_ARGUMENTS = {
    "dycoke": ("dycoke_k", "dycoke_l", "dycoke_p", "dycoke_num_tokens_per_frame", "image_token_start_index",
               "dycoke_public_quirks"),
    "vidcom2": ("vidcom2_r",),
    "fastv": ("fastv_k", "fastv_r"),
}


@dataclass(frozen=True)
class CompressionSettings:
    """The compression a model applies. Build it with :func:`settings_from_kwargs` (validated)."""

    compressor: str = "none"
    dycoke_k: float = 0.7  # TTM pruning ratio (0 = no merging)
    dycoke_l: int = 3  # layer L: pruning decided at L-1, applied from L on
    dycoke_p: float = 0.7  # KV pruning ratio (0 = no pruning)
    dycoke_num_tokens_per_frame: int | None = None  # accepted for compatibility; derived from the input
    image_token_start_index: int | None = None  # accepted for compatibility; derived from the input
    dycoke_public_quirks: bool = False  # reproduce the public DyCoke code's decoding exactly (see dycoke_kv.py)
    vidcom2_r: float = 0.25  # VidCom2 retention ratio
    fastv_k: int = 2  # FastV layer K
    fastv_r: float = 0.5  # FastV ratio of image tokens dropped

    @property
    def dycoke(self) -> bool:
        return self.compressor == "dycoke"

    def as_dict(self) -> dict:
        return asdict(self)


FIELD_NAMES = tuple(f.name for f in fields(CompressionSettings))
BOOLEAN_SETTINGS = ("dycoke", "dycoke_public_quirks")
SETTING_NAMES = FIELD_NAMES + ("dycoke",) + tuple(ALIASES)


# ---- the validators -------------------------------------------------------------------------------------------


def check_setting(name: str, value: Any, num_layers: int | None = None) -> Any:
    """``value`` as the typed value of setting ``name``, or a ValueError naming the setting and what it allows.

    ``num_layers`` (the language model's decoder layers), when known, bounds the layer settings. Strings are not
    numbers here: :func:`parse_setting` reads the strings of lmms-eval model args first.
    """
    name = ALIASES.get(name, name)
    if isinstance(value, str) and name != "compressor":
        raise ValueError(f"{name}={value!r} must be a {'bool' if name in BOOLEAN_SETTINGS else 'number'}, not a string.")
    if name in BOOLEAN_SETTINGS:
        return _boolean(name, value)
    if name == "compressor":
        choice = str(value).strip().lower()
        if choice not in COMPRESSORS:
            raise ValueError(f"compressor={value!r}; allowed: {', '.join(COMPRESSORS)}.")
        return choice
    if name in ("dycoke_k", "dycoke_p", "fastv_r"):
        return _ratio(name, value, upper_open=True)  # [0, 1)
    if name == "vidcom2_r":
        return _ratio(name, value, lower_open=True)  # (0, 1]
    if name in ("dycoke_l", "fastv_k"):
        layer = _integer(name, value)
        top = num_layers - 1 if num_layers is not None else None
        if layer < 1 or (top is not None and layer > top):
            allowed = f"[1, {top}] for this {num_layers}-layer model" if top is not None else "[1, num_hidden_layers - 1]"
            raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}.")
        return layer
    if name in ("dycoke_num_tokens_per_frame", "image_token_start_index"):
        if value is None:
            return None
        number = _integer(name, value)
        if number < 0:
            raise ValueError(f"{name}={value!r} must be a non-negative integer (or left unset).")
        return number
    raise ValueError(f"Unknown compression argument {name!r}; valid: {', '.join(sorted(SETTING_NAMES))}.")


def parse_setting(name: str, value: Any) -> Any:
    """The value of a model arg given as a string (``dycoke=True,dycoke_p=0.7`` in lmms-eval), others as they are."""
    if not isinstance(value, str) or ALIASES.get(name, name) == "compressor":
        return value
    text = value.strip()
    if ALIASES.get(name, name) in BOOLEAN_SETTINGS:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name}={value!r}; allowed: True or False.")
        return text.lower() in ("true", "1")
    if text.lower() in ("", "none"):
        return None
    try:
        return float(text) if any(c in text.lower() for c in ".en") else int(text)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number.") from None


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name}={value!r}; allowed: True or False.")


def _number(name: str, value: Any) -> float:
    """A real number; bools are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} is not a number.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number.")
    return value


def _integer(name: str, value: Any) -> int:
    number = _number(name, value)
    if number != int(number):
        raise ValueError(f"{name}={value!r} must be an integer.")
    return int(number)


def _ratio(name: str, value: Any, *, lower_open: bool = False, upper_open: bool = False) -> float:
    number = _number(name, value)
    too_low = number <= 0.0 if lower_open else number < 0.0
    too_high = number >= 1.0 if upper_open else number > 1.0
    if too_low or too_high:
        interval = f"{'(' if lower_open else '['}0, 1{')' if upper_open else ']'}"
        raise ValueError(f"{name}={value!r} is out of range; allowed: {interval}.")
    return number


# ---- building settings ----------------------------------------------------------------------------------------


def settings_from_kwargs(
    values: dict, base: CompressionSettings | None = None, num_layers: int | None = None
) -> CompressionSettings:
    """Validated settings: ``base`` (default: the defaults) with ``values`` applied.

    Unknown names and invalid values are a ValueError naming them; ``dycoke`` contradicting ``compressor`` is an
    error; a method's own arguments given while another method is selected are warned about (they are kept for
    when that method is selected, but do nothing now).
    """
    values = {ALIASES.get(name, name): value for name, value in values.items()}
    unknown = sorted(set(values) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(f"Unknown compression argument(s) {unknown}; valid: {', '.join(sorted(SETTING_NAMES))}.")
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
    settings = replace(settings, **checked)
    if num_layers is not None:  # a base validated without the layer count, or another model's settings
        for name in ("dycoke_l", "fastv_k"):
            check_setting(name, getattr(settings, name), num_layers)
    _warn_ignored(settings, values)
    return settings


def _warn_ignored(settings: CompressionSettings, given: dict) -> None:
    ignored = [
        name for method, names in METHOD_ARGUMENTS.items() if method != settings.compressor
        for name in names if name in given
    ]
    if ignored:
        warnings.warn(
            f"Compression argument(s) {', '.join(ignored)} do nothing with compressor={settings.compressor!r}; "
            f"select the method they belong to (e.g. dycoke=True for dycoke_*, compressor='vidcom2' for vidcom2_r, "
            f"compressor='fastv' for fastv_*).",
            stacklevel=3,
        )


def pop_compression_kwargs(kwargs: dict) -> dict:
    """Remove and return the compression arguments from a keyword dict (e.g. ``load_pretrained_model``'s)."""
    return {name: kwargs.pop(name) for name in list(kwargs) if name in SETTING_NAMES}
