"""The vision tower's attention on transformers' own video LLMs (llava/compression/tower_attention.py, native.py).

Oracles:
* the tower's own eager attention probabilities: SigLIP's ``output_attentions`` (LLaVA-OneVision), and for the Qwen VL
  towers (which drop their attention weights) the probabilities their eager attention function computes, read by
  wrapping that function in the test. Reduced with loops in the public code's structure: FlashVID
  (github.com/Fanziyang-v/FlashVID at 1d37422c5afcaa15ee46b5355f5ba798fa93290a, ``flashvid/modeling_qwen2_5_vl.py``
  ``Qwen2_5_VLVisionAttention_forward`` (``attn_weights.mean(1).mean(1)`` per frame of the last block) and
  ``Qwen2_5_VisionTransformerPretrainedModel_forward`` (mean over each merged group of 4, ``reverse_indices``);
  ``flashvid/modeling_qwen3_vl.py`` the same without windows) and, for the keys, ModelTC/LightCompress at
  9701d035b0aac5df97a2ebaadb30bcf0707616f5 (``llmc/compression/token_reduction/visionzip.py``, ``merger_hook``);
  for LLaVA-OneVision the model's own pooling, transcribed (``apply_pooling``: bilinear to ceil(side / 2));
* each method's loop reference (tests/test_visionzip.py, test_flashvid.py, test_holitom.py) on the features and
  attention the method was actually fed;
* this package's LLaVA model with the same weights (tests/references.py ``transformers_onevision``).
"""

from __future__ import annotations

import importlib
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.vision_utils import get_vision_window_index

from llava.compression import apply_compression, compressed
from llava.compression.registry import METHODS
from llava.compression.tower_attention import tower_recorder
from tests import native_models as nm
from tests.conftest import random_video
from tests.references import greedy, load, prompt, transformers_onevision
from tests.test_flashvid import reference_flashvid
from tests.test_visionzip import reference_visionzip

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SIDE = 24  # 6 x 6 patches: Qwen2.5-VL's windows (2 x 2 merged tokens) split each frame unevenly, so order matters
VISIONZIP = dict(compressor="visionzip", visionzip_dominant=1, visionzip_contextual=2)
FLASHVID = dict(compressor="flashvid", flashvid_retention_ratio=0.5, flashvid_expansion=1.0, flashvid_alpha=0.5,
                flashvid_min_segment_num=2, flashvid_pruning_layer=2, flashvid_llm_retention_ratio=1.0)
HOLITOM = dict(compressor="holitom", holitom_r=0.3, holitom_t=0.9, holitom_d=0.5, holitom_k=2, holitom_llm_r=0.0)


def inputs_for(name, model, questions=((5, 6, 7),)):
    return nm.video_inputs(name, model, questions, side=SIDE)


def encode(model, inputs):
    """The stock ``get_video_features`` of the inputs' videos."""
    args = [inputs["pixel_values_videos"]] + ([inputs["video_grid_thw"]] if "video_grid_thw" in inputs else [])
    return model.model.get_video_features(*args)


# ---- the references --------------------------------------------------------------------------------------------


def eager_qwen_last_block(model, inputs, monkeypatch):
    """Per segment of the last vision block (tower order): (probabilities (heads, L, L), keys (heads, L, head_dim)),
    as the model's eager attention computes them."""
    module = importlib.import_module(type(model.model.visual.blocks[-1].attn).__module__)
    stock, last, chunks = module.eager_attention_forward, model.model.visual.blocks[-1].attn, []

    def recording(attention, query, key, value, attention_mask, **kwargs):
        output, weights = stock(attention, query, key, value, attention_mask, **kwargs)
        if attention is last:
            chunks.append((weights[0].double(), key[0].double()))
        return output, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    with torch.no_grad():
        encode(model, inputs)
    monkeypatch.setattr(module, "eager_attention_forward", stock)
    return chunks


def reference_qwen(model, chunks, grids):
    """FlashVID's reduction, in loops: per patch the mean over heads and over its segment's queries; per merged token
    the mean of its 4 patches (consecutive in the tower); the window order undone; (attention, keys) per video."""
    received, keys = [], []
    for weights, key in chunks:
        heads, length, _ = weights.shape
        for j in range(length):
            received.append(sum(float(weights[h, i, j]) for h in range(heads) for i in range(length)) / (heads * length))
            keys.append(key[:, j].mean(dim=0))
    unit = model.config.vision_config.spatial_merge_size ** 2
    merged = [sum(received[g * unit:(g + 1) * unit]) / unit for g in range(len(received) // unit)]
    merged_keys = [torch.stack(keys[g * unit:(g + 1) * unit]).mean(dim=0) for g in range(len(keys) // unit)]
    visual = model.model.visual
    if hasattr(visual, "fullatt_block_indexes"):  # the tower's order of merged tokens -> their LM order
        window = get_vision_window_index(grids, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]
        in_order = [None] * len(merged)
        in_order_keys = [None] * len(merged)
        for position, token in enumerate(window.tolist()):
            in_order[token], in_order_keys[token] = merged[position], merged_keys[position]
        merged, merged_keys = in_order, in_order_keys
    videos, start = [], 0
    for t, h, w in grids.tolist():
        count = t * h * w // unit
        videos.append((torch.tensor(merged[start:start + count], dtype=torch.float64).view(t, -1),
                       torch.stack(merged_keys[start:start + count]).view(t, count // t, -1)))
        start += count
    return videos


def reference_onevision(model, inputs):
    """SigLIP's eager attention of the layer the features come from (vision_feature_layer=-1: the last), mean over
    heads and queries, and that layer's keys, mean over heads; pooled bilinearly to ceil(side / 2) per frame."""
    pixels = inputs["pixel_values_videos"]
    videos, frames = pixels.shape[:2]
    tower = model.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[-1]
    captured = {}
    hook = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: captured.update(keys=out))
    try:
        with torch.no_grad():
            out = tower(pixels.flatten(0, 1), output_attentions=True)
    finally:
        hook.remove()
    weights = out.attentions[-1].double()  # (videos * frames, heads, S, S)
    heads = weights.shape[1]
    attention = weights.mean(dim=1).mean(dim=1)
    keys = captured["keys"].double().view(*attention.shape, heads, -1).mean(dim=2)
    side = math.isqrt(attention.shape[1])
    size = [math.ceil(side / 2)] * 2

    def pool(x):  # (BF, S, C) -> (BF, N, C), as apply_pooling
        grid = x.view(x.shape[0], side, side, -1).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=size, mode="bilinear").permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[-1])

    attention, keys = pool(attention[..., None])[..., 0], pool(keys)
    return [(a, k) for a, k in zip(attention.view(videos, frames, -1), keys.view(videos, frames, size[0] ** 2, -1))]


def reference_selection(settings, features, attention, keys):
    if settings["compressor"] == "visionzip":
        return reference_visionzip(features, attention, keys, settings["visionzip_dominant"],
                                   settings["visionzip_contextual"])
    if settings["compressor"] == "flashvid":
        return reference_flashvid(features, attention, retention_ratio=settings["flashvid_retention_ratio"],
                                  expansion=settings["flashvid_expansion"], alpha=settings["flashvid_alpha"],
                                  min_segment_num=settings["flashvid_min_segment_num"])
    from tests.test_holitom import reference_holitom

    return reference_holitom(features, attention, settings["holitom_r"], settings["holitom_t"], d=settings["holitom_d"])


class Spy:
    """Records what the applied compressor's ``select`` gets and returns (on the handle's instance only)."""

    def __init__(self, handle):
        self.calls = []
        compressor = handle.video_compressor
        select = compressor.select

        def spied(features, *args, **kwargs):
            selection = select(features, *args, **kwargs)
            self.calls.append((features, kwargs, selection))
            return selection

        compressor.select = spied


def methods():
    """The tower-attention methods registered now (HoliTom once its module is imported by the package)."""
    chosen = [VISIONZIP, FLASHVID]
    if "holitom" in METHODS:
        chosen.append(HOLITOM)
    return chosen


# ---- the recorded attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["forward", "generate"])
@pytest.mark.parametrize("name", [*QWEN, "llava_onevision"])
def test_the_method_gets_the_towers_eager_attention_and_keys(name, run, monkeypatch):
    model = nm.MODELS[name](attn="eager")
    inputs = inputs_for(name, model, ((5, 6, 7), (5, 6, 7, 8, 9)))  # two videos: each gets its own
    if name == "llava_onevision":
        expected = reference_onevision(model, inputs)
    else:
        expected = reference_qwen(model, eager_qwen_last_block(model, inputs, monkeypatch),
                                  inputs["video_grid_thw"])
    with compressed(model, **VISIONZIP) as handle:
        spy = Spy(handle)
        if run == "forward":
            with torch.no_grad():
                model(**inputs)
        else:
            nm.greedy(model, inputs, 2)
        assert handle.encoded is None  # nothing recorded stays on the model
    assert len(spy.calls) == 2
    for (features, kwargs, _), (attention, keys) in zip(spy.calls, expected):
        assert features.shape[:2] == attention.shape
        torch.testing.assert_close(kwargs["attention"].double(), attention, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(kwargs["keys"].double(), keys, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [*QWEN, "llava_onevision"])
def test_recording_leaves_the_tower_output_and_the_model_unchanged(name):
    model = nm.MODELS[name]()
    inputs = inputs_for(name, model)
    with torch.no_grad():
        stock = encode(model, inputs)
        recorder = tower_recorder(model, "visionzip")
        args = [inputs["pixel_values_videos"]] + ([inputs["video_grid_thw"]] if "video_grid_thw" in inputs else [])
        output, videos = recorder(model.model.get_video_features, args, {})
    assert torch.equal(torch.cat(list(output.pooler_output)), torch.cat(list(stock.pooler_output)))
    assert all(not module._forward_pre_hooks for module in model.modules())
    assert len(videos) == 1 and videos[0].attention.dtype == torch.float32
    if name == "llava_onevision":  # bilinear pooling of probabilities: near the frame's mass, not exactly 1
        assert videos[0].attention.shape == (8, 4)
    else:  # per temporal step the patches receive 1 in all (mean over queries); a token is the mean of 4 patches
        t = int(inputs["video_grid_thw"][0, 0])
        torch.testing.assert_close(videos[0].attention.sum(dim=1), torch.full((t,), 1 / 4))


# ---- the selections and the values reaching the LM ------------------------------------------------------------


@pytest.mark.parametrize("settings", methods(), ids=lambda s: s["compressor"])
@pytest.mark.parametrize("name", [*QWEN, "llava_onevision"])
def test_the_selection_equals_the_reference_and_merged_values_reach_the_lm(name, settings):
    model = nm.MODELS[name]()
    inputs = inputs_for(name, model, ((5, 6, 7), (5, 6, 7, 8, 9)))
    seen = []
    with compressed(model, **settings) as handle:
        spy = Spy(handle)
        # Registered after the compression's own pre-hook, so it runs after it: it sees what the LM gets.
        hook = model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            hook.remove()
        stats = handle.last_stats
    embeds = seen[0]
    merged_any = False
    for row, (features, kwargs, selection) in enumerate(spy.calls):
        index, per_frame, values = reference_selection(settings, features, kwargs["attention"], kwargs["keys"])
        assert selection.index.tolist() == index and selection.per_frame.tolist() == per_frame
        kept = selection.kept_features(features)
        torch.testing.assert_close(kept.double(), values.double(), rtol=1e-5, atol=1e-5)
        # Each kept token enters the LM with its (merged) value, at its video column's place in the compact row.
        video_columns = (inputs["input_ids"][row] == nm.VIDEO).nonzero().flatten().tolist()
        if name == "llava_onevision":
            video_columns = video_columns[:-1]  # the newline
        columns = stats["kept_video_columns"][row]
        positions = dict(zip(columns, stats["video_positions"][row]))
        assert sorted(columns) == sorted(video_columns[i] for i in index) and len(columns) < len(video_columns)
        for i, value in zip(selection.index.tolist(), kept):
            torch.testing.assert_close(embeds[row, positions[video_columns[i]]], value, rtol=0, atol=0)
        merged_any |= selection.values is not None and not torch.allclose(
            kept, features.reshape(-1, features.shape[-1])[selection.index])
    assert merged_any  # the check above saw merged values, not only the tokens' own features


@pytest.mark.parametrize("name", [*QWEN, "llava_onevision"])
def test_a_padded_batch_equals_its_rows_alone(name):
    """Each video gets its own tower attention when several go through the tower together."""
    model = nm.MODELS[name]()
    inputs = inputs_for(name, model, ((5, 6, 7), (5, 6, 7, 8, 9, 10, 11)))
    with compressed(model, **VISIONZIP) as handle:
        tokens, logits = nm.greedy(model, inputs, 3)
        assert handle.last_stats["video_tokens_after"] < handle.last_stats["video_tokens_before"]
        for index in range(2):
            row_tokens, row_logits = nm.greedy(model, nm.row(inputs, index), 3)
            assert torch.equal(tokens[index], row_tokens[0])
            torch.testing.assert_close(logits[index], row_logits[0], rtol=1e-4, atol=1e-4)


def onevision_against_the_package_model(tiny_checkpoint, settings: dict, seed: int, tower_folder=None):
    """Generate with ``settings`` on this package's LLaVA model and on transformers' LlavaOnevision with the same
    weights: both give the same tokens, logits and video tokens after compression (fewer than before)."""
    tokenizer, ours = load(tiny_checkpoint, **settings)
    theirs, placeholder = transformers_onevision(tiny_checkpoint, ours)
    if tower_folder is not None:
        theirs.config.mm_vision_tower = str(tower_folder)
    video = random_video(6, ours.get_vision_tower().image_size, seed=seed)
    ids = prompt(tokenizer)
    our_tokens, our_logits = greedy(ours, tokenizer, ids, [video], 4)
    count = 6 * math.ceil(ours.get_vision_tower().num_patches_per_side / 2) ** 2 + 1
    at = int((ids[0] == -200).nonzero())
    expanded = torch.cat([ids[:, :at], torch.full((1, count), placeholder), ids[:, at + 1:]], dim=1)
    with compressed(theirs, **settings) as handle:
        output = theirs.generate(input_ids=expanded, pixel_values_videos=video[None], max_new_tokens=4,
                                 min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 output_logits=True, return_dict_in_generate=True)
    assert handle.last_stats["video_tokens_after"] == ours.last_compression_stats["video_tokens_after"] < count - 1
    assert torch.equal(output.sequences[:, expanded.shape[1]:], our_tokens)
    torch.testing.assert_close(torch.stack(output.logits, 1), our_logits, rtol=1e-4, atol=1e-4)


def test_onevision_equals_the_package_model_on_the_same_weights(tiny_checkpoint):
    """The same weights in both formats: VisionZip (merging) and FlashVID (with its in-LLM stage) give the same
    tokens and logits on transformers' LlavaOnevision as on this package's LLaVA model."""
    for settings in (dict(VISIONZIP), dict(FLASHVID, flashvid_llm_retention_ratio=0.5, flashvid_pruning_layer=2)):
        onevision_against_the_package_model(tiny_checkpoint, settings, seed=7)


# ---- what cannot be supported ----------------------------------------------------------------------------------


def test_configurations_without_a_defined_tower_attention_are_refused_by_name():
    model = nm.llava_onevision()
    for layer in ([-1, -2], 0):
        model.config.vision_feature_layer = layer
        with pytest.raises(ValueError, match=r"compressor='visionzip'.*LlavaOnevision.*vision_feature_layer"):
            apply_compression(model, **VISIONZIP)
        assert "llava_compression" not in model.__dict__
    windowed = nm.qwen2_5_vl()
    windowed.model.visual.fullatt_block_indexes = [0]
    with pytest.raises(ValueError, match=r"compressor='flashvid'.*last block of this Qwen2_5_VL.*within windows"):
        apply_compression(windowed, **FLASHVID)
    assert "llava_compression" not in windowed.__dict__


def test_precomputed_video_features_are_refused_with_a_clear_error():
    model = nm.qwen2_vl()
    if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers release takes no precomputed video features")
    inputs = inputs_for("qwen2_vl", model)
    with torch.no_grad():
        features = encode(model, inputs)  # outside compression: it carries no tower attention
    inputs.pop("pixel_values_videos")
    with compressed(model, **VISIONZIP), pytest.raises(ValueError, match=r"visionzip.*pass the pixels"):
        model(**inputs, mm_encoder_outputs={"video": features})


def test_fastvid_on_onevision_reads_the_pooling_head_and_equals_the_package_model(tiny_checkpoint, tmp_path):
    """FastVID on transformers' LlavaOnevision: SigLIP's pooling head from the tower checkpoint the config names
    (``mm_vision_tower``; the published tower when unset), on the feature layer's output: the same tokens and logits
    as this package's LLaVA model with the same weights and head. Without a readable head: refused by name, nothing
    applied."""
    settings = {"compressor": "fastvid", "fastvid_retention_ratio": 0.5, "fastvid_dyseg_c": 2, "fastvid_dtm_p": 2}
    onevision_against_the_package_model(tiny_checkpoint, settings, seed=8, tower_folder=tiny_checkpoint / "vision_tower")

    bare = nm.llava_onevision()
    bare.config.mm_vision_tower = str(tmp_path)  # a folder without a tower checkpoint
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"compressor='fastvid' reads SigLIP's pooling head .* no \*\.safetensors"):
        apply_compression(bare, **settings)
    assert "llava_compression" not in bare.__dict__
