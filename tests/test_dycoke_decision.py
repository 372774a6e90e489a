"""DyCoke's decision at each decoding step, checked against references written from the paper's rule.

The rule (DESIGN.md section 4): the current query's attention at layer L-1 over that layer's whole cache, softmax,
averaged over heads and read at the M merged video tokens, is the vector ``a``; the active set is the top
int(M * (1 - p)) of ``a``. Here: the active count for every L and frame count; the decision's inputs (query, keys,
span) against an eager model's own attention; and the same decision and tokens on every path (dynamic cache, static
cache, compiled decoding, a row alone or in a padded batch), over a long decode too. None of it needs the public code.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.qwen2 import modeling_qwen2

from llava.compression import dycoke_kv
from llava.compression.dycoke_kv import rank_by_score
from llava.constants import IMAGE_TOKEN_INDEX
from llava.transformers_compat import output_cache
from tests.conftest import random_video
from tests.references import (
    MaskedDyCoke,
    cache_variants,
    load,
    prompt,
    scale_attention_logits,
)
from tests.test_ttm import EXPECTED_PRUNED

RATIO, MERGE = 0.7, 0.7
VARIANTS = cache_variants()


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    """``models(scale)``: (tokenizer, the DyCoke model with sdpa, the same weights with eager attention and no
    pruning), attention logits scaled by ``scale`` (sharper attention changes the active set more often)."""
    made = {}

    def get(scale: float = 1.0):
        if scale not in made:
            tokenizer, model = load(tiny_checkpoint, dycoke=True, dycoke_k=MERGE, dycoke_p=RATIO)
            _, reference = load(tiny_checkpoint, "eager", dycoke=True, dycoke_k=MERGE, dycoke_p=0.0)
            for m in (model, reference):
                scale_attention_logits(m, scale)
            made[scale] = tokenizer, model, reference
        return made[scale]

    return get


def use(model, layer: int, public_quirks: bool = False) -> None:
    """DyCoke at layer ``layer``, this file's ratios, every setting given (a model keeps a setting until changed)."""
    model.configure_compression(dycoke=True, dycoke_k=MERGE, dycoke_l=layer, dycoke_p=RATIO,
                                dycoke_public_quirks=public_quirks)


def merged_video_tokens(frames: int, per_frame: int) -> int:
    """M after TTM, from the pairing rule: each pruned frame keeps int((1 - k) * N) of its N tokens."""
    return frames * per_frame - len(EXPECTED_PRUNED[frames]) * (per_frame - int((1 - MERGE) * per_frame))


def video_span(ids: torch.Tensor, count: int) -> torch.Tensor:
    """Cache positions of the ``count`` video tokens: where the placeholder sits, the newline after them."""
    start = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    return torch.arange(start, start + count)


def generate(model, tokenizer, ids, videos, steps: int, **kwargs):
    """(tokens, the DyCoke state of the call, the trace) of a greedy generate of exactly ``steps`` tokens."""
    with model.compression_trace() as trace:
        output = model.generate(
            ids, images=videos, modalities=["video"] * len(videos), do_sample=False, max_new_tokens=steps,
            min_new_tokens=steps, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, **kwargs,
        )
    return output.sequences, getattr(output_cache(output), "compression", None), trace


def paper_attention(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B, T): softmax(q K^T * scaling) over all T keys, mean over the query heads (grouped keys repeated)."""
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    return (query @ keys.transpose(-1, -2) * scaling).softmax(dim=-1).mean(dim=1)[:, 0]


# ---- the count ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", sorted(EXPECTED_PRUNED))
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_the_active_set_has_int_m_times_1_minus_p_video_tokens_at_every_layer(models, layer, frames):
    tokenizer, model, _ = models()
    side = model.get_vision_tower().num_patches_per_side
    count = merged_video_tokens(frames, math.ceil(side / 2) ** 2)
    ids = prompt(tokenizer)
    span = video_span(ids, count)
    video = random_video(frames, model.get_vision_tower().image_size, seed=frames)
    for quirks in (False, True):
        use(model, layer, quirks)
        for variant in ("dynamic", "static"):
            _, _, trace = generate(model, tokenizer, ids, [video], 5, **VARIANTS[variant])
            kv = trace.kv_stats
            assert torch.equal(trace.video_positions, span)
            assert kv["image_tokens"] == [count] and len(trace.active_positions) == kv["decode_steps"] == 4
            if not quirks:
                keep = int(count * (1 - RATIO))
                assert kv["active_image_tokens"] == [keep] and kv["scored_image_tokens"] == [count]
                for attended in trace.active_positions:
                    assert len(attended) == keep and len(set(attended.tolist())) == keep
                    assert torch.isin(attended, span).all()
                continue
            # The public code's span leaves the last video token out of the ranking and always attends to it; a
            # step that keeps the set attends to the full cache.
            keep = int((count - 1) * (1 - RATIO))
            assert kv["active_image_tokens"] == [keep + 1] and kv["scored_image_tokens"] == [count - 1]
            for step, attended in enumerate(trace.active_positions):
                if step in kv["recompute_steps"][0]:
                    assert len(set(attended.tolist())) == keep + 1 and attended[-1] == span[-1]
                    assert torch.isin(attended[:-1], span[:-1]).all()
                else:
                    assert torch.equal(attended, span)


# ---- the inputs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quirks", [False, True], ids=["default", "public_quirks"])
@pytest.mark.parametrize("variant", ["dynamic", "static"])
def test_the_decision_reads_the_query_keys_and_span_of_the_rule(models, variant, quirks, monkeypatch):
    tokenizer, model, reference = models(0.36)  # the set is kept at some steps and recomputed at others
    layer, steps = 2, 10
    use(model, layer, quirks)
    ids, video = prompt(tokenizer), random_video(8, model.get_vision_tower().image_size, seed=6)
    count = merged_video_tokens(8, math.ceil(model.get_vision_tower().num_patches_per_side / 2) ** 2)
    span = video_span(ids, count)

    decided, rule_inputs = [], []  # per decoding step: what the decision and the reference's layer L-1 attend with
    mean_head_attention, eager_attention = dycoke_kv.mean_head_attention, modeling_qwen2.eager_attention_forward

    def decision_spy(query, keys, valid, scaling):
        attention = mean_head_attention(query, keys, valid, scaling)
        valid = None if valid is None else valid.clone()
        decided.append((query.clone(), keys.clone(), valid, attention))  # the cache and the mask change in place
        return attention

    def eager_spy(module, query, key, *args, **kwargs):
        if module.layer_idx == layer - 1 and query.shape[2] == 1:
            rule_inputs.append((query.clone(), key.clone()))
        return eager_attention(module, query, key, *args, **kwargs)

    monkeypatch.setattr(dycoke_kv, "mean_head_attention", decision_spy)
    monkeypatch.setattr(modeling_qwen2, "eager_attention_forward", eager_spy)
    rule = MaskedDyCoke(reference, span, layer, RATIO, public_quirks=quirks)
    try:
        expected, _, _ = generate(reference, tokenizer, ids, [video], steps)
    finally:
        rule.remove()
    tokens, state, trace = generate(model, tokenizer, ids, [video], steps, **VARIANTS[variant])
    assert min(rule.margins) > 1e-5 and 0 < sum(rule.recomputed) < steps - 1  # well-defined sets; both kinds of step
    assert torch.equal(tokens, expected)

    # The span: all M merged video tokens (public quirks: all but the last).
    assert torch.equal(state.layout.video_index[0], span[:-1] if quirks else span)
    scaling = model.get_model().layers[layer - 1].self_attn.scaling
    kv = trace.kv_stats
    assert len(decided) == len(rule_inputs) == steps - 1
    for step, ((query, keys, valid, attention), (rule_query, rule_keys)) in enumerate(zip(decided, rule_inputs)):
        filled = rule_keys.shape[2]  # the prompt, the tokens decoded so far and this one
        # The query: this step's token at layer L-1; the keys: that layer's whole cache and nothing else (a static
        # cache's unfilled slots are not keys).
        torch.testing.assert_close(query, rule_query, rtol=1e-5, atol=1e-5)
        if valid is None:  # every key valid
            assert keys.shape[2] == filled
        else:
            assert torch.equal(valid[0], torch.arange(keys.shape[2]) < filled)
        torch.testing.assert_close(keys[:, :, :filled], rule_keys, rtol=1e-5, atol=1e-5)
        # The vector a: the paper's formula on the reference's inputs, read at the span.
        expected_attention = paper_attention(rule_query, rule_keys, scaling)
        torch.testing.assert_close(attention[:, :filled], expected_attention, rtol=1e-4, atol=1e-7)
        assert not attention[:, filled:].any()
        torch.testing.assert_close(rule.scores[step], expected_attention[0, rule.positions], rtol=1e-4, atol=1e-7)
        # The set and the boundary scores the step decided on.
        assert torch.equal(trace.active_positions[step], rule.attended[step])
        boundary = kv["boundary_scores"][0][step]
        if rule.recomputed[step]:
            assert boundary == pytest.approx(list(rule.boundaries[step]), rel=1e-4)
        else:
            assert all(math.isnan(score) for score in boundary)
    assert kv["recompute_steps"][0] == [step for step, hit in enumerate(rule.recomputed) if hit]


# ---- the same decision on every path ------------------------------------------------------------------------------


def test_equal_scores_rank_in_position_order():
    scores = torch.tensor([[0.2, 0.5, 0.2, 0.5, 0.1, 0.5], [0.3, 0.3, 0.3, 0.3, 0.3, 0.3]])
    expected = [sorted(range(6), key=lambda i: (-row[i], i)) for row in scores.tolist()]
    values, order = rank_by_score(scores)
    assert order.tolist() == expected
    assert torch.equal(values, scores.gather(1, order))
    compiled = torch.compile(rank_by_score, backend="eager", fullgraph=True)
    assert compiled(scores)[1].tolist() == expected


def first_difference(a, b) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if not torch.equal(x, y)), None)


def test_a_long_decode_decides_the_same_on_every_path(models):
    tokenizer, model, _ = models()  # attention peaked enough that the set is recomputed at almost every step
    use(model, 2)
    ids, video = prompt(tokenizer), random_video(8, model.get_vision_tower().image_size, seed=6)
    runs = {variant: generate(model, tokenizer, ids, [video], 300, **VARIANTS[variant]) for variant in VARIANTS}
    tokens, _, trace = runs["dynamic"]
    assert len(trace.kv_stats["recompute_steps"][0]) > 250
    for variant, (other_tokens, _, other) in runs.items():
        step = first_difference(trace.active_positions, other.active_positions)
        assert step is None, (
            f"{variant}: the active set differs from the dynamic cache's at step {step}; boundary scores "
            f"{trace.kv_stats['boundary_scores'][0][step]} vs {other.kv_stats['boundary_scores'][0][step]}")
        assert torch.equal(other_tokens, tokens), variant
        assert other.kv_stats["recompute_steps"] == trace.kv_stats["recompute_steps"]


@pytest.mark.parametrize("variant", ["static", "dynamic"])
def test_a_padded_batch_decides_as_its_rows_alone(models, variant):
    tokenizer, model, _ = models()
    use(model, 2)
    size, steps = model.get_vision_tower().image_size, 48
    questions = ("What happens in the video?", "Describe the colours and the motion in this short video clip.")
    rows = [(prompt(tokenizer, q), random_video(frames, size, seed)) for q, frames, seed in zip(questions, (8, 6), (6, 13))]
    width = max(ids.shape[1] for ids, _ in rows)
    padded, mask = torch.full((2, width), tokenizer.pad_token_id), torch.zeros(2, width, dtype=torch.long)
    for index, (ids, _) in enumerate(rows):  # generate pads the spliced prompts on the left
        padded[index, : ids.shape[1]], mask[index, : ids.shape[1]] = ids[0], 1
    batch_tokens, batch, _ = generate(model, tokenizer, padded, [video for _, video in rows], steps, attention_mask=mask,
                                      **VARIANTS[variant])
    batch_stats = batch.summary()
    assert batch_stats["image_tokens"][0] != batch_stats["image_tokens"][1]  # rows of different widths
    for index, (ids, video) in enumerate(rows):
        tokens, alone, _ = generate(model, tokenizer, ids, [video], steps, **VARIANTS[variant])
        assert torch.equal(batch_tokens[index, -steps:], tokens[0, -steps:])
        shift = batch.prefill_length - alone.prefill_length  # the row's left padding in the batch
        positions = [p + shift for p in alone.active_positions(0)]
        assert first_difference(batch.active_positions(index), positions) is None
        assert batch_stats["recompute_steps"][index] == alone.summary()["recompute_steps"][0]
