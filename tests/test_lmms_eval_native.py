"""lmms-eval's wrappers of transformers' own video LLMs take the compression model args (through this package's
entry point): the stock wrapper loads the model, then the compression is applied to it."""

from __future__ import annotations

import pytest
import torch
from lmms_eval.models import get_model
from lmms_eval.models.simple import qwen2_vl

from tests import native_models as nm


@pytest.fixture
def stock_loading(monkeypatch):
    """The stock qwen2_vl wrapper loads a tiny random Qwen2-VL (no hub access here) and stub processors."""
    model = nm.qwen2_vl()
    monkeypatch.setattr(qwen2_vl.Qwen2VLForConditionalGeneration, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(qwen2_vl.AutoProcessor, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(qwen2_vl.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    return model


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_hf"])
def test_the_wrappers_resolve_to_this_package(name):
    for force_simple in (False, True):  # lmms-eval runs the chat version when there is one
        assert get_model(name, force_simple=force_simple).__module__ == "llava.eval.native_wrappers"


def test_compression_args_are_applied_after_the_stock_loading(stock_loading):
    wrapper = get_model("qwen2_vl")(pretrained="Qwen/Qwen2-VL-2B-Instruct", device="cpu", device_map="cpu",
                                    compressor="vidcom2", vidcom2_r="0.25")
    handle = wrapper.model.llava_compression
    assert wrapper.model is stock_loading and handle.settings.compressor == "vidcom2"
    assert handle.settings.vidcom2_r == 0.25  # the model-arg string, read by the package's one validator
    inputs = nm.video_inputs("qwen2_vl", stock_loading)
    wrapper.model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=nm.PAD)
    assert handle.last_stats["video_tokens_after"] < handle.last_stats["video_tokens_before"]


def test_without_compression_args_the_stock_wrapper_runs_unchanged(stock_loading):
    """No compression model arg: nothing is attached, and the wrapper's model computes what it did before."""
    inputs = nm.video_inputs("qwen2_vl", stock_loading)
    with torch.no_grad():
        before = stock_loading(**inputs).logits
    wrapper = get_model("qwen2_vl")(pretrained="Qwen/Qwen2-VL-2B-Instruct", device="cpu", device_map="cpu")
    assert wrapper.model is stock_loading and "llava_compression" not in wrapper.model.__dict__
    with torch.no_grad():
        after = wrapper.model(**inputs).logits
    assert torch.equal(after, before)


@pytest.mark.parametrize("args, message", [
    ({"dycoke_q": "1"}, r"--model qwen2_vl: unknown model arg\(s\) dycoke_q. Valid model args: .*dycoke_k"),
    ({"dycoke": "True", "dycoke_p": "1.5"}, r"--model qwen2_vl: invalid model arg: dycoke_p=.* allowed: \[0, 1\)"),
    ({"compressor": "fastv", "fastv_k": "9"}, r"fastv_k=9 is out of range; allowed: \[1, 3\]"),
])
def test_bad_model_args_are_named(stock_loading, args, message):
    with pytest.raises(ValueError, match=message):
        get_model("qwen2_vl")(pretrained="Qwen/Qwen2-VL-2B-Instruct", device="cpu", device_map="cpu", **args)
