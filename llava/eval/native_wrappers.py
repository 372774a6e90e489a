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


def with_compression(stock_cls, model: str, name: str) -> type:
    """A subclass of the stock wrapper ``stock_cls`` (lmms-eval's ``--model model``) that takes the compression
    model args."""

    def __init__(self, **model_args):
        init_with_compression(self, stock_cls, model, model_args)

    doc = f"The stock ``{model}`` wrapper ({stock_cls.__module__}) with the compression model args."
    return type(name, (stock_cls,), {"__init__": __init__, "__doc__": doc, "__module__": __name__, "__qualname__": name})


# Simple and chat versions (lmms-eval runs the chat one when a model has it).
Qwen2VL = with_compression(qwen2_vl.Qwen2_VL, "qwen2_vl", "Qwen2VL")
Qwen25VL = with_compression(qwen2_5_vl.Qwen2_5_VL, "qwen2_5_vl", "Qwen25VL")
Qwen25VLChat = with_compression(qwen2_5_vl_chat.Qwen2_5_VL, "qwen2_5_vl", "Qwen25VLChat")
Qwen3VL = with_compression(qwen3_vl.Qwen3_VL, "qwen3_vl", "Qwen3VL")
Qwen3VLChat = with_compression(qwen3_vl_chat.Qwen3_VL, "qwen3_vl", "Qwen3VLChat")
# transformers' LLaVA-OneVision among others; the stock wrapper answers with an empty string when generation
# raises: check the log for errors.
LlavaHf = with_compression(llava_hf.LlavaHf, "llava_hf", "LlavaHf")
LlavaHfChat = with_compression(llava_hf_chat.LlavaHf, "llava_hf", "LlavaHfChat")
