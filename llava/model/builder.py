"""``load_pretrained_model``: LLaVA-NeXT's loader, for Qwen2-based LLaVA checkpoints on transformers 5."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from llava.model.checkpoint_files import check_tokenizer_files, compare_weights, read_json, stored_shapes, weight_files
from llava.model.image_processor import SigLipImageProcessor
from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM, config_from_dict
from llava.model.vision_tower import resolve_tower_folder

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
# Keyword arguments LLaVA-NeXT's loader forwards to from_pretrained and that keep their meaning here.
FROM_PRETRAINED_KWARGS = ("low_cpu_mem_usage", "max_memory", "offload_folder", "revision", "cache_dir", "local_files_only", "trust_remote_code")


def looks_like_hub_id(model_path: str | os.PathLike) -> bool:
    """``owner/name`` that is not an existing path and is not written as one (``./x``, ``/x``, ``~/x``)."""
    text = str(model_path)
    return not Path(text).expanduser().exists() and not text.startswith((".", "/", "~")) and text.count("/") == 1


def local_checkpoint(model_path: str | os.PathLike) -> Path:
    """The checkpoint folder ``model_path`` names; FileNotFoundError naming it if it is not one."""
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Model path {model_path!s} does not exist: it is not a checkpoint folder nor a hub id (owner/name).")
    if not path.is_dir():
        raise FileNotFoundError(f"Model path {model_path!s} is a file, not a checkpoint folder.")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a LLaVA checkpoint folder.")
    return path


def resolve_checkpoint(model_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, fetched (or taken from the local hub cache)."""
    if not looks_like_hub_id(model_path):
        return local_checkpoint(model_path)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
    try:
        return Path(snapshot_download(str(model_path), allow_patterns=patterns))
    except Exception as error:  # offline, unknown repo, gated...: say which and why
        raise OSError(f"Could not get {model_path!s} from the hub or its local cache: {error}") from error


def _resolve_dtype(torch_dtype, load_8bit: bool, load_4bit: bool):
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype in (None, "auto"):
        return "auto"
    if torch_dtype not in DTYPES:
        raise ValueError(f"torch_dtype={torch_dtype!r} is not supported; use one of {sorted(DTYPES)} or 'auto'.")
    return DTYPES[torch_dtype]


def _resolve_attn(attn_implementation: str | None, kwargs: dict) -> str:
    if kwargs.pop("use_flash_attention_2", False):
        attn_implementation = "flash_attention_2"
    attn_implementation = attn_implementation or "sdpa"
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={attn_implementation!r}; allowed: {', '.join(ATTN_IMPLEMENTATIONS)}.")
    if attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            flash_ok = False
        else:
            flash_ok = torch.cuda.is_available()
        if not flash_ok:
            logger.warning("flash_attention_2 needs CUDA and the flash-attn package; using sdpa instead.")
            attn_implementation = "sdpa"
    return attn_implementation


def _resolve_device_map(device_map):
    if device_map in (None, "cpu", "auto") or isinstance(device_map, dict):
        if device_map == "auto" and not torch.cuda.is_available():
            return "cpu"
        return device_map
    device = torch.device(device_map)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device_map={device_map!r} but CUDA device {device.index or 0} is not available.")
    return {"": device}


def _quantization_config(load_8bit: bool, load_4bit: bool):
    if not (load_8bit or load_4bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError("load_8bit / load_4bit need the bitsandbytes package (pip install bitsandbytes).") from error
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4"
    )


def _apply_customized_config(config: LlavaQwenConfig, customized_config) -> LlavaQwenConfig:
    if customized_config is None:
        return config
    if isinstance(customized_config, (str, os.PathLike)):
        updates = read_json(customized_config)
    elif isinstance(customized_config, dict):
        updates = customized_config
    else:
        updates = customized_config.to_dict()
    for key, value in updates.items():
        if key not in ("model_type", "architectures", "transformers_version"):
            setattr(config, key, value)
    return config


def _check_weights(info: dict, tied: bool) -> None:
    missing = [k for k in info.get("missing_keys", []) if not (tied and k == "lm_head.weight")]
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = [str(m) for m in info.get("mismatched_keys", [])]
    problems = []
    if missing:
        problems.append(f"missing weights: {sorted(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {sorted(unexpected)}")
    if mismatched:
        problems.append(f"weights with the wrong shape: {mismatched}")
    if problems:
        raise ValueError(
            "The checkpoint does not match the model: " + "; ".join(problems) + ". Check that config.json (and any "
            "overwrite_config / customized_config) belongs to these weights, or download the checkpoint again."
        )


def _check_files_before_loading(folder: Path, config: LlavaQwenConfig) -> None:
    """Names, shapes and readability of the stored weights, from the safetensors headers, before loading any.

    The expected names and shapes come from the model built on the meta device (no memory, no init).
    """
    files = weight_files(folder)
    if not files:
        return  # not a safetensors checkpoint: transformers loads (or rejects) it
    stored = stored_shapes(files)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in LlavaQwenForCausalLM(config).state_dict().items()}
    _check_weights(compare_weights(stored, expected), bool(getattr(config, "tie_word_embeddings", False)))


def load_pretrained_model(
    model_path,
    model_base=None,
    model_name="llava_qwen",
    load_8bit=False,
    load_4bit=False,
    device_map="auto",
    torch_dtype="float16",
    attn_implementation="flash_attention_2",
    customized_config=None,
    overwrite_config=None,
    **kwargs,
):
    """Load a LLaVA-OneVision / LLaVA-Video (Qwen2) checkpoint: ``(tokenizer, model, image_processor, max_length)``.

    Same signature and defaults as LLaVA-NeXT's ``load_pretrained_model``. ``model_path`` is a local folder
    or a hub id. Extra keyword arguments: the video-token compression settings (see
    ``llava.compression.settings``), ``multimodal`` (accepted and ignored, as lmms-eval passes it), and the
    from_pretrained options in ``FROM_PRETRAINED_KWARGS``.
    """
    from llava.compression.settings import pop_compression_kwargs, settings_from_kwargs

    if model_base is not None:
        raise NotImplementedError("model_base (LoRA / projector-only checkpoints) is not supported; pass a full checkpoint.")
    kwargs.pop("multimodal", None)
    compression = pop_compression_kwargs(kwargs)
    attn_implementation = _resolve_attn(attn_implementation, kwargs)
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in FROM_PRETRAINED_KWARGS}
    if kwargs:
        raise TypeError(f"load_pretrained_model got unknown keyword argument(s) {sorted(kwargs)}.")
    dtype = _resolve_dtype(torch_dtype, load_8bit, load_4bit)
    quantization = _quantization_config(load_8bit, load_4bit)

    folder = resolve_checkpoint(model_path)
    config = config_from_dict(read_json(folder / "config.json"), folder)
    config = _apply_customized_config(config, customized_config)
    for key, value in (overwrite_config or {}).items():
        setattr(config, key, value)
    # Checked (and warned about) now, against the checkpoint's layer count, before any weight is read.
    compression_settings = settings_from_kwargs(compression, num_layers=config.num_hidden_layers)

    # Cheap parts first, so that a broken file fails fast, before gigabytes of weights are read.
    tokenizer = _load_tokenizer(folder, config)
    image_processor = _image_processor(config, folder)
    _check_files_before_loading(folder, config)
    model, info = LlavaQwenForCausalLM.from_pretrained(
        folder,
        config=config,
        dtype=dtype,
        device_map=_resolve_device_map(device_map),
        attn_implementation=attn_implementation,
        quantization_config=quantization,
        output_loading_info=True,
        **extra,
    )
    _check_weights(info, bool(getattr(config, "tie_word_embeddings", False)))
    model.eval()

    if getattr(config, "mm_use_im_patch_token", True) or getattr(config, "mm_use_im_start_end", False):
        from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN

        added = [DEFAULT_IMAGE_PATCH_TOKEN] if getattr(config, "mm_use_im_patch_token", True) else []
        if getattr(config, "mm_use_im_start_end", False):
            added += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
        tokenizer.add_tokens(added, special_tokens=True)
        # LLaVA-NeXT resizes to len(tokenizer), which *shrinks* Qwen's padded vocabulary; only ever grow it.
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))

    model.get_vision_tower().image_processor = image_processor
    model.set_compression(compression_settings)

    for key in ("max_sequence_length", "max_position_embeddings", "tokenizer_model_max_length"):
        if getattr(config, key, None):
            return tokenizer, model, image_processor, int(getattr(config, key))
    return tokenizer, model, image_processor, 2048


def _load_tokenizer(folder: Path, config: LlavaQwenConfig):
    check_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, config=config)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"The tokenizer files in {folder} cannot be loaded ({error}); download the checkpoint again "
            "or copy tokenizer.json, vocab.json, merges.txt and tokenizer_config.json from the original."
        ) from error


def _image_processor(config: LlavaQwenConfig, folder: Path) -> SigLipImageProcessor:
    tower_folder = resolve_tower_folder(config.mm_vision_tower, folder)
    if tower_folder is not None and (tower_folder / "preprocessor_config.json").is_file():
        read_json(tower_folder / "preprocessor_config.json")  # invalid JSON: an error that names the file
        return SigLipImageProcessor.from_pretrained(tower_folder)
    size = int(config.mm_vision_tower_config["image_size"])
    return SigLipImageProcessor(size={"height": size, "width": size}, crop_size={"height": size, "width": size})
