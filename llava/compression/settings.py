"""Video-token compression settings: one validated record, filled from keyword / lmms-eval model args.

``compressor`` picks the method (``none``, ``dycoke``, ``vidcom2``, ``fastv``); ``dycoke=True`` is the
DyCoke paper's spelling of ``compressor="dycoke"``. Each method has its own arguments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

COMPRESSORS = ("none", "dycoke", "vidcom2", "fastv")
# Names the DyCoke README uses for the same thing.
ALIASES = {"dycoke_num_image_per_frame": "dycoke_num_tokens_per_frame"}


@dataclass
class CompressionSettings:
    compressor: str = "none"
    dycoke_k: float = 0.7  # TTM pruning ratio (0 = no merging)
    dycoke_l: int = 3  # layer L: pruning decided at L-1, applied from L on
    dycoke_p: float = 0.7  # KV pruning ratio (0 = no pruning)
    dycoke_num_tokens_per_frame: int | None = None  # accepted for compatibility; derived from the input
    image_token_start_index: int | None = None  # accepted for compatibility; derived from the input
    vidcom2_r: float = 0.25  # VidCom2 retention ratio
    fastv_k: int = 2  # FastV layer K
    fastv_r: float = 0.5  # FastV ratio of image tokens dropped

    @property
    def dycoke(self) -> bool:
        return self.compressor == "dycoke"

    def validate(self, num_layers: int | None = None) -> "CompressionSettings":
        """Raise ValueError naming the argument and its allowed range; return self."""
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor={self.compressor!r}; allowed: {', '.join(COMPRESSORS)}.")
        _in_range("dycoke_k", self.dycoke_k, 0.0, 1.0)
        _in_range("dycoke_p", self.dycoke_p, 0.0, 1.0)
        _in_range("fastv_r", self.fastv_r, 0.0, 1.0)
        if not (0.0 < self.vidcom2_r <= 1.0):
            raise ValueError(f"vidcom2_r={self.vidcom2_r} is out of range; allowed: (0, 1].")
        top = (num_layers - 1) if num_layers is not None else None
        _layer("dycoke_l", self.dycoke_l, top)
        _layer("fastv_k", self.fastv_k, top)
        for name in ("dycoke_num_tokens_per_frame", "image_token_start_index"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} must be a non-negative integer (or left unset).")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value < high):
        raise ValueError(f"{name}={value} is out of range; allowed: [{low:g}, {high:g}).")


def _layer(name: str, value: int, top: int | None) -> None:
    if top is None:
        if value < 1:
            raise ValueError(f"{name}={value} is out of range; allowed: [1, num_hidden_layers-1].")
    elif not (1 <= value <= top):
        raise ValueError(f"{name}={value} is out of range; allowed: [1, {top}] for this {top + 1}-layer model.")


SETTING_NAMES = tuple(f.name for f in fields(CompressionSettings)) + ("dycoke",) + tuple(ALIASES)


def _coerce(name: str, value):
    """lmms-eval passes model args as parsed strings/numbers; accept 'True', '0.7', '3' alike."""
    if name == "dycoke":
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"dycoke={value!r}; allowed: True or False.")
            return value.lower() in ("true", "1")
        return bool(value)
    if name == "compressor":
        return str(value).lower()
    kind = {f.name: f.type for f in fields(CompressionSettings)}[name]
    if value is None:
        return None
    try:
        return int(value) if "int" in str(kind) and float(value) == int(float(value)) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number.") from None


def settings_from_kwargs(values: dict, base: CompressionSettings | None = None) -> CompressionSettings:
    """Build settings from keyword arguments (unknown names are a ValueError listing the valid ones)."""
    settings = CompressionSettings(**(base.as_dict() if base else {}))
    values = {ALIASES.get(k, k): v for k, v in values.items()}
    unknown = set(values) - set(SETTING_NAMES)
    if unknown:
        raise ValueError(f"Unknown compression argument(s) {sorted(unknown)}; valid: {', '.join(sorted(SETTING_NAMES))}.")
    if "dycoke" in values:
        on = _coerce("dycoke", values.pop("dycoke"))
        if on:
            settings.compressor = "dycoke"
        elif settings.compressor == "dycoke" and "compressor" not in values:
            settings.compressor = "none"
    for name, value in values.items():
        setattr(settings, name, _coerce(name, value))
    return settings


def pop_compression_kwargs(kwargs: dict) -> dict:
    """Remove and return the compression arguments from a keyword dict (e.g. ``load_pretrained_model``'s)."""
    return {name: kwargs.pop(name) for name in list(kwargs) if name in SETTING_NAMES}
