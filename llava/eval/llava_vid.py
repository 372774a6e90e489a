"""``--model llava_vid`` (LLaVA-Video): lmms-eval's stock wrapper plus our model args."""

import re

from llava.eval.compat import provide_llava_llama

provide_llava_llama()  # the stock module imports llava.model.language_model.llava_llama at import time

from lmms_eval.models.simple import llava_vid as stock  # noqa: E402

from llava.eval.model_args import init_through_stock  # noqa: E402
from llava.eval.video_errors import WatchesVideoErrors  # noqa: E402


class LlavaVid(WatchesVideoErrors, stock.LlavaVid):
    """The stock wrapper, unchanged at run time, with extra model args and no silent video failures.

    Extra args: the compression settings, ``device=cpu``, ``on_video_error=warn|fail``, and ``model_name``
    (the stock wrapper has none and derives it from the path; it is accepted here so the same
    ``--model_args`` work for both wrappers).
    """

    stock_module = stock
    video_fallback = 'answered "Video ... can not load, check the source"'
    failure_answer = re.compile(r"Video (?P<video>.*) can not load, check the source", re.DOTALL)

    def __init__(self, **model_args):
        init_through_stock(self, stock.LlavaVid, stock, "llava_vid", model_args, loader_args=("model_name",))
