"""Every registered compression method, at each of its declared ``examples``, on the LLaVA model (tiny random
checkpoint) and on transformers' own video LLMs: what every method must do, whatever it is. A method registered
tomorrow is picked up here with no edit. Fidelity to each paper's public code is in the method's own test file."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from llava.compression import compressed
from llava.compression.registry import METHODS, method_names
from tests import native_models as nm
from tests.conftest import random_video
from tests.test_conformance import prompt_ids

CASES = [(name, index) for name in method_names() if name != "none" for index in range(len(METHODS[name].examples))]
IDS = [f"{name}-{index}" for name, index in CASES]
GENERATE = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, eos_token_id=None)


def example(name: str, index: int) -> dict:
    return {"compressor": name, **METHODS[name].examples[index]}


def generate(model, ids, videos, mask=None, **kwargs):
    output = model.generate(ids, attention_mask=mask, images=videos, modalities=["video"], output_logits=True,
                            return_dict_in_generate=True, **GENERATE, **kwargs)
    return output.sequences, torch.stack(output.logits, 1)


def padded_batch(tokenizer, size):
    """Two prompts of different lengths, left-padded, with videos of different lengths."""
    prompts = [prompt_ids(tokenizer, "What is moving?")[0], prompt_ids(tokenizer, "Describe every frame of it.")[0]]
    videos = [random_video(8, size, seed=40), random_video(5, size, seed=41)]
    width = max(len(p) for p in prompts)
    ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    return prompts, videos, ids, mask


def assert_compressed(stats: dict) -> None:
    """Fewer video tokens than before reach the stages the method runs (a silent no-op fails): the video stage's
    output, and each decode-time stage's kept (``kept_image_tokens``) or active (``active_image_tokens``) tokens."""
    assert stats["video_tokens_before"] > 0
    decoded = [value for value in stats.values() if isinstance(value, dict) and "image_tokens" in value]
    for decoder in decoded:
        kept = decoder.get("kept_image_tokens", decoder.get("active_image_tokens"))
        assert kept is not None and decoder["image_tokens"], decoder
        assert all(k < n for k, n in zip(kept, decoder["image_tokens"])), decoder
    if not decoded:
        assert stats["video_tokens_after"] < stats["video_tokens_before"]


@pytest.mark.parametrize(("name", "index"), CASES, ids=IDS)
def test_the_method_compresses_and_changes_the_output(model_and_tokenizer, name, index):
    model, tokenizer = model_and_tokenizer
    video = random_video(8, model.get_vision_tower().image_size, seed=42)
    ids = prompt_ids(tokenizer, "What is moving?")
    _, baseline = generate(model, ids, [video])
    model.configure_compression(**example(name, index))
    _, logits = generate(model, ids, [video])
    stats = model.last_compression_stats
    assert stats["compressor"] == name
    assert_compressed(stats)
    assert not torch.allclose(logits, baseline, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "index"), CASES, ids=IDS)
def test_a_padded_batch_equals_its_rows_alone_with_both_caches(model_and_tokenizer, name, index):
    model, tokenizer = model_and_tokenizer
    prompts, videos, ids, mask = padded_batch(tokenizer, model.get_vision_tower().image_size)
    model.configure_compression(**example(name, index))
    singles = [generate(model, p[None], [v]) for p, v in zip(prompts, videos)]
    for cache in ("dynamic", "static"):
        tokens, logits = generate(model, ids, videos, mask, cache_implementation=cache)
        for row, (row_tokens, row_logits) in enumerate(singles):
            assert torch.equal(tokens[row], row_tokens[0]), (cache, row)
            torch.testing.assert_close(logits[row], row_logits[0], rtol=1e-4, atol=1e-4)


def has_decoder_stage(name: str, index: int) -> bool:
    from llava.compression.methods import CompressionSetup
    from llava.compression.settings import settings_from_kwargs

    return CompressionSetup.build(settings_from_kwargs(example(name, index))).decoder is not None


DECODING_CASES = [case for case in CASES if has_decoder_stage(*case)]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize(("name", "index"), DECODING_CASES, ids=[f"{n}-{i}" for n, i in DECODING_CASES])
def test_a_decoding_step_reads_the_host_as_often_as_the_baseline(model_and_tokenizer, name, index, cache):
    """A method working inside the LM adds no host synchronisation to a decoding step (compiled decoding and CUDA
    graphs need none): data-dependent reads counted inside the decoding forwards, against the uncompressed model."""
    from tests.references import HostReads

    model, tokenizer = model_and_tokenizer
    video = random_video(8, model.get_vision_tower().image_size, seed=44)
    ids = prompt_ids(tokenizer, "What is moving?")
    counts = []
    for settings in ({"compressor": "none"}, example(name, index)):
        model.configure_compression(**settings)
        with HostReads(model, decoding_only=True) as reads:
            generate(model, ids, [video], cache_implementation=cache)
        counts.append(reads.count)
        assert reads.forwards == GENERATE["max_new_tokens"] - 1
    assert_compressed(model.last_compression_stats)
    assert counts[1] == counts[0]


@pytest.mark.parametrize(("name", "index"), CASES, ids=IDS)
def test_nothing_of_a_generation_stays_on_the_model(model_and_tokenizer, name, index):
    model, tokenizer = model_and_tokenizer
    video = random_video(6, model.get_vision_tower().image_size, seed=43)
    model.configure_compression(**example(name, index))
    output = model.generate(prompt_ids(tokenizer, "What is moving?"), images=[video], modalities=["video"],
                            return_dict_in_generate=True, **GENERATE)
    state = getattr(output.get("cache", output.get("past_key_values")), "compression", None)
    reference = weakref.ref(state) if state is not None else None
    del output, state
    gc.collect()
    assert reference is None or reference() is None
    for module in model.modules():  # no tensor hangs off a module but its parameters and buffers
        extra = [key for key, value in vars(module).items() if isinstance(value, torch.Tensor)]
        assert not extra, f"{type(module).__name__} holds {extra}"


def out_of_range(argument):
    """Values the argument's declared range rejects (derived from the declaration, not written per method)."""
    if argument.within == "flag":
        return [2, "yes"]
    if argument.within == "layer":
        return [0, 10_000, 1.5, "two"]
    low, high = (part.strip(" [()]") for part in argument.within.split(","))
    values = [float(low) - 1] if low != "-inf" else []
    values += [float(high) + 1] if high != "inf" else []
    values += [float(low)] if argument.within.startswith("(") else []
    values += [float(high)] if argument.within.endswith(")") and high != "inf" else []
    return values + ([0.5] if argument.integer else []) + ["many"]


SETTINGS_CASES = [(name, argument) for name in method_names() for argument in METHODS[name].arguments]


@pytest.mark.parametrize(("name", "argument"), SETTINGS_CASES, ids=[a.name for _, a in SETTINGS_CASES])
def test_settings_are_validated_atomically(model_and_tokenizer, name, argument):
    model, _ = model_and_tokenizer
    model.configure_compression(**example(name, 0) if METHODS[name].examples else {"compressor": name})
    before = model.compression
    for value in out_of_range(argument):
        with pytest.raises(ValueError, match=argument.name):
            setattr(model, argument.name, value)
        with pytest.raises(ValueError, match=argument.name):  # next to a valid value: nothing is applied
            model.configure_compression(compressor="none", **{argument.name: value})
        assert model.compression == before


@pytest.mark.parametrize(("name", "index"), CASES, ids=IDS)
@pytest.mark.parametrize("family", nm.MODELS)
def test_on_transformers_models_the_method_compresses_and_is_removed_after(family, name, index):
    model = nm.MODELS[family]()
    inputs = nm.video_inputs(family, model, ((5, 6, 7),))
    stock = nm.greedy(model, inputs, 3)[1]
    try:
        with compressed(model, **example(name, index)) as handle:
            logits = nm.greedy(model, inputs, 3)[1]
            stats = handle.last_stats
    except ValueError as error:  # a combination the model cannot run must say so by name
        assert name in str(error) or "fastv_k" in str(error), error  # the method or its layer argument
        return
    assert not torch.allclose(logits, stock, rtol=1e-5, atol=1e-5)
    decoded = [value for value in stats.values() if isinstance(value, dict) and value.get("image_tokens")]
    assert stats.get("video_tokens_after", 0) < stats.get("video_tokens_before", 0) or any(
        all(k < n for k, n in zip(value.get("kept_image_tokens", value.get("active_image_tokens", [])),
                                  value["image_tokens"])) for value in decoded)
    assert "llava_compression" not in model.__dict__
    assert not model.model.language_model._forward_pre_hooks
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in model.model.language_model.layers)


def test_the_docs_table_of_arguments_is_current():
    from pathlib import Path

    from llava.compression.registry import arguments_table

    docs = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    table = docs.split("<!-- methods table -->\n", 1)[1].split("\n<!-- end of methods table -->", 1)[0]
    assert table == arguments_table(), "regenerate the table in docs/evaluation.md (command above it)"


@pytest.mark.parametrize(("name", "index"), DECODING_CASES, ids=[f"{n}-{i}" for n, i in DECODING_CASES])
def test_beam_search_and_a_passed_cache_are_refused_by_name(model_and_tokenizer, name, index):
    """A method inside the LM keeps one generation's state in the cache it makes: beam search, several sequences per
    row and a cache passed in are refused with the method's name, on the LLaVA model and on transformers' models."""
    from transformers.cache_utils import DynamicCache

    from llava.compression.methods import CompressionSetup
    from llava.compression.settings import settings_from_kwargs

    label = CompressionSetup.build(settings_from_kwargs(example(name, index))).decoder.label
    model, tokenizer = model_and_tokenizer
    video = random_video(4, model.get_vision_tower().image_size, seed=45)
    ids = prompt_ids(tokenizer, "What is moving?")
    model.configure_compression(**example(name, index))
    for bad in ({"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True}, {"past_key_values": DynamicCache()}):
        with pytest.raises(ValueError, match=label):
            model.generate(ids, images=[video], modalities=["video"], max_new_tokens=2, **bad)
    native = nm.MODELS["qwen2_vl"]()
    inputs = nm.video_inputs("qwen2_vl", native, ((5, 6, 7),))
    try:
        with compressed(native, **example(name, index)):
            with pytest.raises(ValueError, match=label):
                native.generate(**inputs, max_new_tokens=2, num_beams=2)
    except ValueError as error:  # the model refuses the method itself, by name
        assert name in str(error), error
