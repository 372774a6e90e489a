"""VisionZip on video (llava.compression.visionzip) against a loop transcription of the public LLaVA-OV code."""

import math

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from llava.compression import TokenSelection
from llava.compression.visionzip import (
    VisionZip,
    record_siglip_attention,
    siglip_attention_scores,
)

# --- Reference -------------------------------------------------------------------------------------------------
# Plain loops in float64, written from the LLaVA-OneVision adaptation of VisionZip in github.com/cokeshao/HoliTom,
# visionzip/llava_arch.py, LlavaMetaForCausalLM_visionzip.prepare_inputs_labels_for_multimodal (its inner
# ``visionzip`` function, frames as the batch, "one_token" order), itself following github.com/dvlab-research/VisionZip
# visionzip/clip_encoder.py CLIPVisionTower_VisionZip.forward; plus the documented caps of the counts at N.


def _cos(a, b):
    dot = sum(p * q for p, q in zip(a, b))
    return dot / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))


def reference_visionzip(features, attention, keys, dominant, contextual):
    """(index, per_frame, values) in output order."""
    num_frames, n, _ = features.shape
    x, att, k = features.double().tolist(), attention.double().tolist(), keys.double().tolist()
    dominant = min(dominant, n)
    contextual = min(contextual, n - dominant)
    index, per_frame, values = [], [], []
    for f in range(num_frames):
        top = sorted(range(n), key=lambda i: (-att[f][i], i))[:dominant]
        dominant_tokens = sorted(top)  # masked_select: spatial order
        rest = [i for i in range(n) if i not in top]
        targets = []
        if contextual > 0:
            step = max(1, len(rest) // contextual)
            targets = [rest[p] for p in range(0, len(rest), step)][:contextual]
        joined = {t: [] for t in targets}
        for i in rest:
            if i in targets or not targets:  # no targets (contextual 0): the rest is dropped
                continue
            sims = [_cos(k[f][i], k[f][t]) for t in targets]
            best = 0
            for j, s in enumerate(sims):
                if s > sims[best]:
                    best = j
            joined[targets[best]].append(i)
        for i in dominant_tokens:
            index.append(f * n + i)
            values.append(x[f][i])
        for t in targets:
            value = list(x[f][t])
            if joined[t]:
                for d in range(len(value)):
                    value[d] += sum(x[f][i][d] for i in joined[t]) / len(joined[t])  # target + mean of the joined
            index.append(f * n + t)
            values.append(value)
        per_frame.append(dominant + contextual)
    return index, per_frame, torch.tensor(values, dtype=torch.float64)


def random_inputs(num_frames, tokens, dim=12, head_dim=6, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(num_frames, tokens, dim, generator=gen).to(dtype)
    attention = torch.softmax(torch.randn(num_frames, tokens, generator=gen), dim=-1).to(dtype)
    keys = torch.randn(num_frames, tokens, head_dim, generator=gen).to(dtype)
    return features, attention, keys


def check_against_reference(features, attention, keys, dominant, contextual, grid_hw=None):
    sel = VisionZip(dominant, contextual).select(features, grid_hw, attention=attention, keys=keys)
    index, per_frame, values = reference_visionzip(features, attention, keys, dominant, contextual)
    assert isinstance(sel, TokenSelection) and sel.index.dtype == torch.long
    assert sel.index.tolist() == index
    assert sel.per_frame.tolist() == per_frame
    kept = sel.kept_features(features)
    if features.dtype == torch.float32:
        torch.testing.assert_close(kept.double(), values, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(kept, values.to(features.dtype))
    return sel


# --- Against the reference ---------------------------------------------------------------------------------------

COUNTS = [(42, 8), (10, 4), (0, 5), (5, 0), (20, 29), (3, 7), (30, 30)]


@pytest.mark.parametrize("dominant, contextual", COUNTS)
@pytest.mark.parametrize("num_frames", [1, 2, 5, 8])
def test_matches_reference_random(num_frames, dominant, contextual):
    features, attention, keys = random_inputs(num_frames, 49, seed=num_frames)
    check_against_reference(features, attention, keys, dominant, contextual, (7, 7))


@pytest.mark.parametrize("dominant, contextual", [(9, 3), (2, 5)])
@pytest.mark.parametrize("grid_hw", [(4, 6), (3, 5)])
@pytest.mark.parametrize("num_frames", [1, 2, 5, 8])
def test_matches_reference_non_square_bfloat16(num_frames, grid_hw, dominant, contextual):
    tokens = grid_hw[0] * grid_hw[1]
    features, attention, keys = random_inputs(num_frames, tokens, seed=7 + num_frames, dtype=torch.bfloat16)
    check_against_reference(features, attention, keys, dominant, contextual, grid_hw)


# --- Known answers -------------------------------------------------------------------------------------------------


def test_known_answer_one_frame():
    features = torch.tensor([[n, 10.0 * n] for n in range(9)])[None]  # token n = (n, 10 n)
    attention = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.8, 0.05, 0.4, 0.15, 0.25]])
    keys = torch.tensor([[[1, 0], [0, 0], [1, 0.1], [0.2, 1], [0, 0], [0, 1], [0, 0], [0.1, 1], [1, 0.3]]])
    sel = VisionZip(dominant=3, contextual=2).select(features, attention=attention, keys=keys)
    # Dominant: 1, 4, 6 (highest attention), in spatial order. The other six, 0 2 3 5 7 8: step 6 // 2 = 3, so the
    # targets are the 1st and 4th of them, tokens 0 and 5. By keys 2 and 8 join 0, 3 and 7 join 5.
    assert sel.index.tolist() == [1, 4, 6, 0, 5]
    assert sel.per_frame.tolist() == [5]
    expected = torch.tensor([[1, 10], [4, 40], [6, 60], [0 + 5, 0 + 50], [5 + 5, 50 + 50]], dtype=torch.float32)
    torch.testing.assert_close(sel.values, expected)


def test_known_answer_frames_offsets_and_unjoined_target():
    features = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    attention = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    keys = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [0, 1]], [[0, 1], [0, 1], [1, 0.1], [1, 0]]])
    sel = VisionZip(dominant=1, contextual=2).select(features, attention=attention, keys=keys)
    # Frame 0: dominant 3; of the rest 0 1 2 (step 3 // 2 = 1) the targets are 0 and 1. Token 2's key is orthogonal
    # to both (a tie): it joins the first, 0; target 1 stays alone. Frame 1: dominant 0; rest 1 2 3: targets 1 and 2,
    # and 3 joins 2 (keys (1, 0) and (1, 0.1)).
    assert sel.index.tolist() == [3, 0, 1, 4, 5, 6]
    x = features.view(-1, 3)
    expected = torch.stack([x[3], x[0] + x[2], x[1], x[4], x[5], x[6] + x[7]])
    torch.testing.assert_close(sel.values, expected)


def test_prune_only_is_top_attention_in_spatial_order():
    features, attention, keys = random_inputs(3, 16, seed=4)
    sel = VisionZip(dominant=5, contextual=0).select(features, attention=attention, keys=keys)
    assert sel.values is None
    for f in range(3):
        expected = sorted(attention[f].topk(5).indices.tolist())
        assert (sel.index[5 * f:5 * f + 5] - 16 * f).tolist() == expected


# --- Budget, order, shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dominant, contextual, tokens, expected", [
    (42, 8, 196, (42, 8)), (42, 8, 169, (42, 8)), (16, 4, 196, (16, 4)),  # OV defaults, LLaVA-Video, about 10 %
    (82, 16, 196, (82, 16)), (41, 8, 196, (41, 8)),  # about 50 % and 25 % of 196
    (42, 8, 16, (16, 0)), (10, 8, 16, (10, 6)), (0, 20, 16, (0, 16)),  # capped at N
])
def test_counts(dominant, contextual, tokens, expected):
    compressor = VisionZip(dominant, contextual)
    assert compressor.counts(tokens) == expected
    features, attention, keys = random_inputs(3, tokens, seed=tokens)
    sel = compressor.select(features, attention=attention, keys=keys)
    assert sel.per_frame.tolist() == [sum(expected)] * 3
    assert int(sel.per_frame.sum()) == sel.index.numel() == 3 * sum(expected)
    assert len(set(sel.index.tolist())) == sel.num_kept


def test_frames_in_time_order():
    features, attention, keys = random_inputs(5, 25, seed=2)
    sel = VisionZip(6, 3).select(features, attention=attention, keys=keys)
    frames = (sel.index // 25).tolist()
    assert frames == sorted(frames) and frames == [f for f in range(5) for _ in range(9)]


def test_describe():
    assert VisionZip().describe() == {"name": "visionzip", "dominant": 42, "contextual": 8}


# --- Validation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, value", [
    ("dominant", -1), ("dominant", 2.5), ("dominant", "3"), ("dominant", None), ("dominant", math.inf),
    ("contextual", -1), ("contextual", 0.5), ("contextual", True),
])
def test_invalid_arguments_name_themselves(name, value):
    with pytest.raises(ValueError, match=rf"visionzip_{name}="):
        VisionZip(**{name: value})


def test_nothing_kept_is_refused():
    with pytest.raises(ValueError, match="visionzip_dominant=0 and visionzip_contextual=0"):
        VisionZip(0, 0)


def test_select_needs_attention_and_keys():
    features, attention, keys = random_inputs(2, 9)
    with pytest.raises(ValueError, match="attention"):
        VisionZip().select(features, keys=keys)
    with pytest.raises(ValueError, match="keys"):
        VisionZip().select(features, attention=attention)
    with pytest.raises(ValueError, match=r"keys.*\(2, 9, head_dim\)"):
        VisionZip().select(features, attention=attention, keys=keys[:, :4])
    with pytest.raises(ValueError, match="grid_hw"):
        VisionZip().select(features, (3, 4), attention=attention, keys=keys)


# --- The tower's attention score ----------------------------------------------------------------------------------


def tiny_siglip(attn_implementation):
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                                image_size=28, patch_size=7, attn_implementation=attn_implementation)
    return SiglipVisionModel(config).eval()


def test_scores_equal_eager_output_attentions_and_keep_the_output():
    model = tiny_siglip("eager")
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    layer = getattr(model, "vision_model", model).encoder.layers[-1]  # transformers 5 has no vision_model level
    captured = {}
    hook = layer.self_attn.k_proj.register_forward_hook(lambda m, args, out: captured.update(keys=out))
    with torch.no_grad():
        plain = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        hook.remove()
        with record_siglip_attention(layer) as records:
            recorded = model(pixel_values=pixels)
    assert torch.equal(recorded.last_hidden_state, plain.last_hidden_state)  # the tower's output is unchanged
    assert len(records) == 1 and not layer._forward_pre_hooks  # one forward, hook removed

    attention, keys = records[0]
    eager = plain.attentions[-1]  # (B, heads, S, S) of the last layer
    assert eager.shape == (2, 4, 16, 16)
    torch.testing.assert_close(attention, eager.mean(dim=1).mean(dim=1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(keys, captured["keys"].view(2, 16, 4, 8).mean(dim=2))
    # The same from the layer's input directly (the encoder's hidden state before the last layer).
    direct = siglip_attention_scores(layer, plain.hidden_states[-2])
    torch.testing.assert_close(direct[0], attention, rtol=0, atol=0)
    torch.testing.assert_close(direct[1], keys, rtol=0, atol=0)


def test_recording_on_the_llava_tower_keeps_its_output():
    from llava.model.vision_tower import SigLipVisionTower, llava_tower_config

    torch.manual_seed(0)
    config = llava_tower_config({
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3, "image_size": 28,
        "patch_size": 7, "num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0,
    })
    tower = SigLipVisionTower(config).eval()
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = tower(pixels)
        with record_siglip_attention(tower.vision_tower.vision_model.encoder.layers[-1]) as records:
            recorded = tower(pixels)
    assert torch.equal(recorded, plain)
    attention, keys = records[0]
    assert attention.shape == (3, 16) and keys.shape == (3, 16, 8)
    torch.testing.assert_close(attention.sum(dim=-1), torch.ones(3))  # each query's probabilities sum to 1


@pytest.mark.parametrize("position", ["one_token", "frame", "grid"])
def test_layout_places_merged_values(position):
    from llava.compression import assemble_video_tokens

    features, attention, keys = random_inputs(3, 16, seed=3)
    sel = VisionZip(4, 3).select(features, attention=attention, keys=keys)
    tokens, is_visual = assemble_video_tokens(features, sel, torch.zeros(features.shape[-1]), position, (4, 4))
    kept = tokens[is_visual]
    if position == "grid":  # the grid layout puts each frame's tokens in spatial order
        order = sel.index.argsort()
        torch.testing.assert_close(kept, sel.values[order])
    else:
        torch.testing.assert_close(kept, sel.values)


def test_the_llava_model_scores_with_its_towers_last_layer_and_keeps_the_references_tokens(loaded_tiny):
    """Inside the model: the attention and keys of the tower's last kept layer (for the frames' own input), pooled as
    the features are, reach VisionZip; the trace records the reference's choice and the tower's output is unchanged."""
    from llava.compression.visionzip import siglip_attention_scores
    from tests.conftest import random_video
    from tests.test_conformance import prompt_ids

    tokenizer, model, _, _ = loaded_tiny
    video = random_video(6, model.get_vision_tower().image_size, seed=60)
    layer = model.get_vision_tower().vision_tower.vision_model.encoder.layers[-1]
    inputs = []

    def record_input(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(record_input, with_kwargs=True)
    try:
        plain = model.encode_images(video)
        model.configure_compression(compressor="visionzip", visionzip_dominant=3, visionzip_contextual=2)
        with model.compression_trace() as trace:
            model.generate(prompt_ids(tokenizer, "What is moving?"), images=[video], modalities=["video"],
                           max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
        model.reset_compression()
    attention, keys = siglip_attention_scores(layer, inputs[0])
    pooled_attention = model.get_2dPool(attention[..., None])[..., 0]
    pooled_keys = model.get_2dPool(keys)
    index, per_frame, values = reference_visionzip(trace.pooled, pooled_attention, pooled_keys, 3, 2)
    assert trace.selection.index.tolist() == index and trace.selection.per_frame.tolist() == per_frame
    torch.testing.assert_close(trace.selection.values.double(), torch.as_tensor(values).double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.encode_images(video), plain)  # recording changed nothing
