"""``--model llava_onevision``: lmms-eval's stock wrapper plus our model args."""

from lmms_eval.models.simple import llava_onevision as stock

from llava.eval.model_args import init_through_stock


class LlavaOneVision(stock.Llava_OneVision):
    """The stock wrapper, unchanged at run time, with extra model args.

    Extra args: the compression settings (``dycoke=True,dycoke_k=..,dycoke_l=..,dycoke_p=..``,
    ``compressor=vidcom2|fastv|...``), ``torch_dtype`` (the stock wrapper always loads float16), and
    ``device=cpu``. Unknown or invalid args are a ValueError naming them.
    """

    def __init__(self, **model_args):
        init_through_stock(
            self, stock.Llava_OneVision, stock, "llava_onevision", model_args, loader_args=("torch_dtype",)
        )
