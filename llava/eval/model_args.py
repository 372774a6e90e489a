"""What our lmms-eval wrappers add to the stock ones: model-arg checks, compression args, ``device=cpu``,
``on_video_error`` (see ``video_errors``).

The stock ``llava_onevision`` / ``llava_vid`` wrappers do all the work (video reading, frame sampling,
prompts, generation); a subclass only reshapes the model args before the stock ``__init__`` and hands the
extra loader arguments to ``load_pretrained_model`` while that ``__init__`` runs (``loader_extras``).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from loguru import logger  # lmms-eval's logger: shown at its --verbosity

from llava.compression.settings import pop_compression_kwargs, setting_names, settings_from_kwargs
from llava.eval.video_errors import check_policy
from llava.model.builder import local_checkpoint, looks_like_hub_id

# Model args the wrapper itself consumes, with their defaults.
WRAPPER_ARGS = {"on_video_error": "warn"}


@dataclass
class WrapperArgs:
    """Model args split into the stock wrapper's own, the extras for ``load_pretrained_model`` and ours."""

    stock: dict
    loader: dict = field(default_factory=dict)
    compression: dict = field(default_factory=dict)
    wrapper: dict = field(default_factory=lambda: dict(WRAPPER_ARGS))


def valid_names(stock_init, extra: tuple[str, ...]) -> list[str]:
    params = inspect.signature(stock_init).parameters.values()
    own = [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return sorted(set(own) | set(extra) | set(setting_names()) | set(WRAPPER_ARGS))


def split_model_args(model: str, stock_init, kwargs: dict, extra: tuple[str, ...] = ()) -> WrapperArgs:
    """Check every model arg by name (unknown = ValueError listing the valid ones) and validate compression."""
    kwargs = dict(kwargs)
    valid = valid_names(stock_init, extra)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"--model {model}: unknown model arg(s) {', '.join(unknown)}. Valid model args: {', '.join(valid)}."
        )
    compression = pop_compression_kwargs(kwargs)
    try:
        settings_from_kwargs(compression)  # early, before a possibly long model load
    except ValueError as error:
        raise ValueError(f"--model {model}: invalid model arg: {error}") from None
    wrapper = {name: kwargs.pop(name, default) for name, default in WRAPPER_ARGS.items()}
    check_policy(model, wrapper["on_video_error"])
    return WrapperArgs(stock=kwargs, compression=compression, wrapper=wrapper)


def check_pretrained(model: str, pretrained) -> None:
    """A local-looking ``pretrained`` must be a checkpoint folder: said here, before the stock wrapper's traceback."""
    if pretrained is None or looks_like_hub_id(pretrained):
        return
    try:
        local_checkpoint(pretrained)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"--model {model}: pretrained={pretrained}: {error} Pass a checkpoint folder (absolute, or relative to "
            "the folder lmms-eval runs in) or a hub id such as lmms-lab/llava-onevision-qwen2-7b-ov."
        ) from None


def is_cpu(args: dict) -> bool:
    """``device=cpu`` or ``device_map=cpu`` in the model args (or ``--device cpu``), or ``accelerate launch --cpu``."""
    from accelerate.utils import parse_flag_from_env

    asked = any(str(args.get(name) or "").lower() == "cpu" for name in ("device", "device_map"))
    return asked or parse_flag_from_env("ACCELERATE_USE_CPU")


def place_on_cpu(model: str, args: WrapperArgs) -> None:
    """Route the stock wrapper to its single-process branch with ``self._device = cpu``.

    The stock wrappers build ``cuda:{rank}`` devices unless ``device_map == "auto"`` with one process; in
    that branch they take ``device`` as given and never move the model. The loader itself is told
    ``device_map="cpu"`` so that ``auto`` cannot place weights on a GPU that happens to be present.
    """
    from accelerate import PartialState

    if PartialState().num_processes > 1:
        raise ValueError(
            f"--model {model}: device=cpu runs in one process only (the stock wrapper's data parallelism "
            "is CUDA-only); use `accelerate launch --num_processes 1 --cpu` or plain `python -m lmms_eval`."
        )
    args.stock["device"] = "cpu"
    args.stock["device_map"] = "auto"
    args.loader["device_map"] = "cpu"


def require_cuda(model: str) -> None:
    if not torch.cuda.is_available():
        raise ValueError(
            f"--model {model}: CUDA is not available here. "
            "Pass device=cpu in --model_args (or --device cpu) to run on the CPU."
        )


def prepare(model: str, stock_init, kwargs: dict, loader_args: tuple[str, ...] = ()) -> WrapperArgs:
    """All checks and rewrites before the stock ``__init__``; ``loader_args`` go to the loader only."""
    args = split_model_args(model, stock_init, kwargs, extra=loader_args)
    check_pretrained(model, args.stock.get("pretrained"))
    for name in loader_args:
        if name in args.stock:
            args.loader[name] = args.stock.pop(name)
    if is_cpu(args.stock):
        place_on_cpu(model, args)
        # float16 on a CPU is slow and poorly supported; keep the user's choice if given.
        dtype_target = args.loader if "torch_dtype" in loader_args else args.stock
        dtype_target.setdefault("torch_dtype", "float32")
    else:
        require_cuda(model)
    args.loader.update(args.compression)
    return args


@contextmanager
def loader_extras(stock_module, **extra):
    """While the stock ``__init__`` runs, its ``load_pretrained_model`` gets ``extra`` as keyword args.

    ``extra`` wins over what the stock wrapper passes (e.g. ``device_map``); a ``model_name`` entry replaces
    the positional one. Yields a list that records each call, so a caller can check the loader was used.
    """
    original = stock_module.load_pretrained_model
    calls = []

    def load(model_path, model_base, model_name, *args, **kwargs):
        name = extra.get("model_name") or model_name
        kwargs.update({k: v for k, v in extra.items() if k != "model_name"})
        calls.append(kwargs)
        return original(model_path, model_base, name, *args, **kwargs)

    stock_module.load_pretrained_model = load
    try:
        yield calls
    finally:
        stock_module.load_pretrained_model = original


def init_through_stock(
    wrapper, stock_cls, stock_module, model: str, model_args: dict, loader_args: tuple[str, ...] = ()
):
    """Run ``stock_cls.__init__`` on ``wrapper`` with checked args and our loader extras."""
    args = prepare(model, stock_cls.__init__, model_args, loader_args)
    with loader_extras(stock_module, **args.loader) as calls:
        stock_cls.__init__(wrapper, **args.stock)
    if not calls:
        raise RuntimeError(
            f"The installed lmms-eval's {model} wrapper did not call load_pretrained_model; "
            "this plugin supports lmms-eval 0.7.x."
        )
    wrapper.watch_video_errors(model, args.wrapper["on_video_error"])
    if args.compression:
        logger.info(f"{model}: video-token compression {wrapper.model.compression.as_dict()}")
