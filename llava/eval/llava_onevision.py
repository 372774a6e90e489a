"""``--model llava_onevision``: lmms-eval's stock wrapper plus our model args."""

from lmms_eval.models.simple import llava_onevision as stock

from llava.eval.model_args import init_through_stock
from llava.eval.video_errors import WatchesVideoErrors


class LlavaOneVision(WatchesVideoErrors, stock.Llava_OneVision):
    """The stock wrapper, unchanged at run time, with extra model args and no silent video failures.

    Extra args: the compression settings (``dycoke=True,dycoke_k=..,dycoke_l=..,dycoke_p=..``,
    ``compressor=vidcom2|fastv|...``), ``torch_dtype`` (the stock wrapper always loads float16),
    ``device=cpu`` and ``on_video_error=warn|fail``. Unknown or invalid args are a ValueError naming them.
    """

    stock_module = stock
    video_fallback = "answered without its video (text only)"

    def __init__(self, **model_args):
        init_through_stock(
            self, stock.Llava_OneVision, stock, "llava_onevision", model_args, loader_args=("torch_dtype",)
        )
