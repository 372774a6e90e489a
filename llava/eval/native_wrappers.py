"""``--model qwen2_vl | qwen2_5_vl | qwen3_vl | llava_hf``: lmms-eval's stock wrappers of transformers' own video
LLMs, plus the compression model args (``compressor=vidcom2,vidcom2_r=0.25``, ``dycoke=True,dycoke_k=...``,
``compressor=fastv,...``), applied with :func:`llava.compression.apply_compression` once the stock wrapper has
loaded the model. Without them the stock wrapper runs unchanged. Unknown or invalid args are a ValueError naming
them, before the model loads. lmms-eval runs the chat version of a wrapper when it has one (qwen2_5_vl, qwen3_vl,
llava_hf): each gets its subclass here too.
"""

from __future__ import annotations

from lmms_eval.models.chat import llava_hf as llava_hf_chat
from lmms_eval.models.chat import qwen2_5_vl as qwen2_5_vl_chat
from lmms_eval.models.chat import qwen3_vl as qwen3_vl_chat
from lmms_eval.models.simple import llava_hf, qwen2_5_vl, qwen2_vl, qwen3_vl
from loguru import logger  # lmms-eval's logger

from llava.compression import apply_compression
from llava.eval.model_args import split_model_args


def init_with_compression(wrapper, stock_cls, model: str, model_args: dict) -> None:
    """Run ``stock_cls.__init__`` on ``wrapper`` with the stock args, then apply the compression args."""
    args = split_model_args(model, stock_cls.__init__, model_args)
    if args.wrapper.get("on_video_error", "warn") != "warn":
        raise ValueError(f"--model {model}: on_video_error is not supported by this wrapper (only llava_onevision, llava_vid).")
    stock_cls.__init__(wrapper, **args.stock)
    if args.compression:
        handle = apply_compression(wrapper.model, **args.compression)
        logger.info(f"{model}: video-token compression {handle.describe()}")


class Qwen2VL(qwen2_vl.Qwen2_VL):
    """The stock ``qwen2_vl`` wrapper with the compression model args."""

    def __init__(self, **model_args):
        init_with_compression(self, qwen2_vl.Qwen2_VL, "qwen2_vl", model_args)


class Qwen25VL(qwen2_5_vl.Qwen2_5_VL):
    """The stock ``qwen2_5_vl`` wrapper with the compression model args."""

    def __init__(self, **model_args):
        init_with_compression(self, qwen2_5_vl.Qwen2_5_VL, "qwen2_5_vl", model_args)


class Qwen3VL(qwen3_vl.Qwen3_VL):
    """The stock ``qwen3_vl`` wrapper with the compression model args."""

    def __init__(self, **model_args):
        init_with_compression(self, qwen3_vl.Qwen3_VL, "qwen3_vl", model_args)


class LlavaHf(llava_hf.LlavaHf):
    """The stock ``llava_hf`` wrapper (transformers' LLaVA-OneVision among others) with the compression model args.

    Note: the stock wrapper answers with an empty string when generation raises; check the log for errors."""

    def __init__(self, **model_args):
        init_with_compression(self, llava_hf.LlavaHf, "llava_hf", model_args)


class Qwen25VLChat(qwen2_5_vl_chat.Qwen2_5_VL):
    """The stock chat ``qwen2_5_vl`` wrapper with the compression model args."""

    def __init__(self, **model_args):
        init_with_compression(self, qwen2_5_vl_chat.Qwen2_5_VL, "qwen2_5_vl", model_args)


class Qwen3VLChat(qwen3_vl_chat.Qwen3_VL):
    """The stock chat ``qwen3_vl`` wrapper with the compression model args."""

    def __init__(self, **model_args):
        init_with_compression(self, qwen3_vl_chat.Qwen3_VL, "qwen3_vl", model_args)


class LlavaHfChat(llava_hf_chat.LlavaHf):
    """The stock chat ``llava_hf`` wrapper with the compression model args."""

    def __init__(self, **model_args):
        init_with_compression(self, llava_hf_chat.LlavaHf, "llava_hf", model_args)
