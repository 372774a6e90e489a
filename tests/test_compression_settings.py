"""Compression settings: one validator per setting, contradictions are errors, ignored arguments and extreme but
valid values are warned about (and still run)."""

from __future__ import annotations

import warnings

import pytest
import torch

from llava.compression.settings import CompressionSettings, check_setting, parse_setting, settings_from_kwargs
from tests.test_ttm import EXPECTED_PRUNED
from llava.eval.model_args import split_model_args
from tests.conftest import random_video
from tests.references import greedy, load, prompt


def test_lmms_eval_strings_are_read_then_checked_like_python_values():
    settings = settings_from_kwargs({"dycoke": "True", "dycoke_l": "3", "dycoke_p": "0.7", "dycoke_public_quirks": "1"})
    assert (settings.compressor, settings.dycoke_l, settings.dycoke_p, settings.dycoke_public_quirks) == (
        "dycoke", 3, 0.7, True)
    assert isinstance(settings.dycoke_l, int)
    assert parse_setting("image_token_start_index", "None") is None
    for name, value, message in [
        ("dycoke_l", "2.5", "must be an integer"), ("dycoke_p", "high", "not a number"), ("dycoke", "yes", "True or False"),
        ("dycoke_k", "nan", "finite"), ("fastv_k", "0", r"allowed: \[1, num_hidden_layers - 1\]"),
    ]:
        with pytest.raises(ValueError, match=f"{name}=.*{message}"):
            settings_from_kwargs({name: value})


def test_python_values_are_not_parsed():
    with pytest.raises(ValueError, match="dycoke_p='0.7' must be a number, not a string"):
        check_setting("dycoke_p", "0.7")
    with pytest.raises(ValueError, match=r"dycoke_l=2.5 must be an integer"):
        check_setting("dycoke_l", 2.5)
    assert check_setting("dycoke_l", 3.0) == 3 and check_setting("dycoke_l", 5, num_layers=6) == 5
    with pytest.raises(ValueError, match=r"dycoke_l=6 is out of range; allowed: \[1, 5\] for this 6-layer model"):
        check_setting("dycoke_l", 6, num_layers=6)


@pytest.mark.parametrize("kwargs", [{"dycoke": True, "compressor": "none"}, {"dycoke": False, "compressor": "dycoke"},
                                    {"dycoke": "True", "compressor": "vidcom2"}])
def test_contradicting_method_choices_are_an_error(kwargs):
    with pytest.raises(ValueError, match=r"dycoke=.* contradicts compressor="):
        settings_from_kwargs(kwargs)


@pytest.mark.parametrize("kwargs, ignored", [
    ({"dycoke_k": 0.5}, "dycoke_k"),
    ({"compressor": "vidcom2", "dycoke_k": 0.5, "fastv_r": 0.3}, "dycoke_k, fastv_r"),  # dycoke_p would compose
    ({"dycoke": True, "vidcom2_r": 0.5}, "vidcom2_r"),
])
def test_arguments_of_a_method_that_is_not_selected_are_warned_about(kwargs, ignored):
    with pytest.warns(UserWarning, match=rf"argument\(s\) {ignored} do nothing with compressor="):
        settings_from_kwargs(kwargs)


def test_the_selected_method_s_own_arguments_are_not_warned_about():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settings_from_kwargs({"dycoke": True, "dycoke_k": 0.5, "dycoke_l": 2, "dycoke_p": 0.3})
        settings_from_kwargs({"compressor": "fastv", "fastv_k": 2, "fastv_r": 0.5})
        assert settings_from_kwargs({}) == CompressionSettings()


def test_the_loader_and_lmms_eval_apply_the_same_rules(tiny_checkpoint):
    with pytest.warns(UserWarning, match="dycoke_k do nothing with compressor='none'"):
        _, model = load(tiny_checkpoint, dycoke_k=0.5)
    assert model.compressor == "none"
    with pytest.raises(ValueError, match="contradicts"):
        load(tiny_checkpoint, dycoke=True, compressor="none")
    stock_init = lambda self, pretrained="", conv_template="": None  # noqa: E731
    args = split_model_args("llava_onevision", stock_init, {"pretrained": "x", "dycoke": "True", "dycoke_public_quirks": "True"})
    assert args.compression == {"dycoke": "True", "dycoke_public_quirks": "True"}
    with pytest.raises(ValueError, match="--model llava_onevision: invalid model arg: dycoke=True contradicts"):
        split_model_args("llava_onevision", stock_init, {"pretrained": "x", "dycoke": "True", "compressor": "none"})


# ---- extreme but valid values: they run, with one warning that says what happens ------------------------------------


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_checkpoint):
    tokenizer, model = load(tiny_checkpoint)
    return model, tokenizer


def run(model, tokenizer, frames=6, **generate_kwargs):
    video = random_video(frames, model.get_vision_tower().image_size, seed=40)
    return greedy(model, tokenizer, prompt(tokenizer), [video], 4, **generate_kwargs)


def test_merging_that_empties_frames_runs_and_warns(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.configure_compression(dycoke=True, dycoke_k=0.97, dycoke_p=0.0)  # int(0.03 * 16) = 0 tokens kept
    emptied = len(EXPECTED_PRUNED[6])  # the frames TTM merges into their reference (1, 3, 5 and 2)
    with pytest.warns(UserWarning, match=rf"dycoke_k=0.97 keeps int\(\(1 - k\) \* 16\) = 0 tokens .* {emptied} of the 6"):
        tokens, logits = run(model, tokenizer)
    stats = model.last_compression_stats
    assert stats["video_tokens_after"] == (6 - emptied) * 16 and torch.isfinite(logits).all()
    model.reset_compression()


@pytest.mark.parametrize("cache", [None, "static"])
def test_pruning_that_leaves_no_active_video_token_runs_and_warns(model_and_tokenizer, cache):
    model, tokenizer = model_and_tokenizer
    model.configure_compression(dycoke=True, dycoke_k=0.0, dycoke_l=2, dycoke_p=0.99)  # int(96 * 0.01) = 0
    with pytest.warns(UserWarning, match=r"dycoke_p=0.99 keeps int\(n \* \(1 - p\)\) = 0 of the n video tokens"):
        tokens, logits = run(model, tokenizer, cache_implementation=cache)
    kv = model.last_compression_stats["kv_pruning"]
    assert kv["active_image_tokens"] == [0] and kv["decode_steps"] == 3 and torch.isfinite(logits).all()
    model.reset_compression()


def test_fastv_dropping_every_video_token_runs_and_warns(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.configure_compression(compressor="fastv", fastv_k=2, fastv_r=0.999)
    with pytest.warns(UserWarning, match=r"FastV: fastv_r=0.999 keeps 0 of the n video tokens"):
        tokens, logits = run(model, tokenizer)
    assert model.last_compression_stats["fastv"]["kept_image_tokens"] == [0] and torch.isfinite(logits).all()
    model.reset_compression()


def test_the_loader_rejects_bad_settings_before_reading_weights(tiny_checkpoint, monkeypatch):
    from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM

    def never(*args, **kwargs):
        raise AssertionError("weights were loaded before the settings were checked")

    monkeypatch.setattr(LlavaQwenForCausalLM, "from_pretrained", never)
    with pytest.raises(ValueError, match=r"dycoke_l=9 is out of range; allowed: \[1, 3\] for this 4-layer model"):
        load(tiny_checkpoint, dycoke=True, dycoke_l=9)


def test_naming_a_method_starts_it_from_its_defaults():
    """compressor=... / dycoke=True resets that method's arguments not given in the same call (as lmms-eval model
    args and the side-by-side comparison with the public DyCoke code expect); a call naming no method changes only
    what it gives."""
    from llava.compression.settings import settings_from_kwargs

    quirks = settings_from_kwargs({"dycoke": True, "dycoke_p": 0.5, "dycoke_public_quirks": True})
    again = settings_from_kwargs({"dycoke": True, "dycoke_k": 0.7, "dycoke_l": 3, "dycoke_p": 0.7}, quirks)
    assert not again.dycoke_public_quirks and again.dycoke_p == 0.7
    assert settings_from_kwargs({"dycoke": True}, quirks).dycoke_p == 0.7  # the default again
    kept = settings_from_kwargs({"dycoke_p": 0.9}, quirks)  # no method named: the rest stays
    assert kept.dycoke_public_quirks and kept.dycoke_p == 0.9
    switched = settings_from_kwargs({"compressor": "evs"}, settings_from_kwargs({"compressor": "evs", "evs_rate": 0.3}))
    assert switched.evs_rate == 0.7
    kept_positions = settings_from_kwargs({"compressor": "evs"}, settings_from_kwargs({"keep_positions": True}))
    assert kept_positions.keep_positions  # a flag of every method, not one method's argument
