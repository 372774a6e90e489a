"""``--model llava_vid`` (LLaVA-Video): lmms-eval's stock wrapper plus our model args."""

from llava.eval.compat import provide_llava_llama

provide_llava_llama()  # the stock module imports llava.model.language_model.llava_llama at import time

from lmms_eval.models.simple import llava_vid as stock  # noqa: E402

from llava.eval.model_args import init_through_stock  # noqa: E402


class LlavaVid(stock.LlavaVid):
    """The stock wrapper, unchanged at run time, with extra model args.

    Extra args: the compression settings, ``device=cpu``, and ``model_name`` (the stock wrapper has none and
    derives it from the path; it is accepted here so the same ``--model_args`` work for both wrappers).
    """

    def __init__(self, **model_args):
        init_through_stock(self, stock.LlavaVid, stock, "llava_vid", model_args, loader_args=("model_name",))
