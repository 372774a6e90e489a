"""FastV on a tiny random Qwen2 model, checked against references written plainly in this file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from llava.compression.dycoke_kv import DyCokeKVPruning, install_dycoke_kv_pruning, remove_dycoke_kv_pruning
from llava.compression.fastv import FastVDecoderLayer, FastVPruning, install_fastv, remove_fastv

LAYER, RATIO = 2, 0.5
VOCAB = 300
STEPS = 8


def tiny_model(attn_implementation: str = "sdpa", seed: int = 0) -> Qwen2ForCausalLM:
    # initializer_range 0.1 makes attention peaked enough that dropping tokens visibly changes the output.
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        pad_token_id=0,
        eos_token_id=None,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model runs fastest on one thread; several threads on a busy machine make it 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def eager(model):
    return with_backend(model, "eager")


def with_backend(model, attn_implementation: str) -> Qwen2ForCausalLM:
    """The same weights under another attention implementation."""
    other = tiny_model(attn_implementation)
    other.load_state_dict(model.state_dict())
    return other


def video_prompt(seed: int, prompt: int = 6, images: int = 48, question: int = 8):
    """Token ids shaped like a LLaVA prompt: text, image tokens, one newline token, question."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (1, prompt + images + 1 + question), generator=generator)
    prunable = torch.zeros_like(ids, dtype=torch.bool)
    prunable[0, prompt : prompt + images] = True
    return ids, prunable


def greedy(model, ids, steps=STEPS, attention_mask=None, return_cache=False):
    """(generated tokens, logits of every step) of a greedy generate."""
    attention_mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=attention_mask,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    result = out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)
    return (*result, out.past_key_values) if return_cache else result


def fastv_greedy(model, pruning, ids, prunable, steps=STEPS, attention_mask=None, return_cache=False):
    install_fastv(model.model, pruning)
    try:
        pruning.start(prunable)
        return greedy(model, ids, steps, attention_mask, return_cache)
    finally:
        remove_fastv(model.model)


def reference_kept_positions(eager, ids, prunable, layer=LAYER, ratio=RATIO) -> list[int]:
    """FastV's rule on the unmodified eager model: layer K-1's attention probabilities, averaged over heads, of the
    last token, at the image positions; the round(n * (1 - R)) highest are kept."""
    with torch.no_grad():
        attentions = eager(input_ids=ids, output_attentions=True).attentions
    image_positions = prunable[0].nonzero().flatten()
    scores = attentions[layer - 1][0].mean(dim=0)[-1][image_positions]
    keep = round(len(image_positions) * (1 - ratio))
    return sorted(image_positions[scores.topk(keep).indices].tolist())


class HiddenTokens:
    """The unmodified eager model with the dropped image tokens hidden from every query of layers >= K by an
    additive mask, in the prefill and at every decoding step."""

    def __init__(self, model, dropped: list[int], layer=LAYER):
        self.dropped = torch.tensor(dropped, dtype=torch.long)
        self.handles = [
            decoder_layer.self_attn.register_forward_pre_hook(self.hide, with_kwargs=True)
            for decoder_layer in model.model.layers[layer:]
        ]

    def hide(self, module, args, kwargs):
        mask = kwargs["attention_mask"]  # eager: (batch, 1, query, keys) additive float mask
        hidden = torch.zeros(mask.shape[-1], dtype=torch.bool)
        hidden[self.dropped] = True
        kwargs["attention_mask"] = mask.masked_fill(hidden, torch.finfo(mask.dtype).min)
        return args, kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_drops_exactly_the_least_attended_image_tokens(model, eager):
    for seed, (prompt, images) in enumerate([(6, 48), (3, 37), (10, 21)]):
        ids, prunable = video_prompt(seed, prompt=prompt, images=images)
        pruning = FastVPruning(LAYER, RATIO)
        fastv_greedy(model, pruning, ids, prunable, steps=2)
        stats = pruning.stats
        expected = reference_kept_positions(eager, ids, prunable)
        assert stats["kept_image_positions"] == [expected]
        assert stats["image_tokens"] == [images] and stats["kept_image_tokens"] == [round(images * (1 - RATIO))]
        # The compact sequence: every non-image position and the kept image positions, in order.
        non_image = (~prunable[0]).nonzero().flatten().tolist()
        assert stats["compact_positions"] == [sorted(non_image + expected)]
        assert stats["pruned"] and stats["compact_tokens"] == ids.shape[1] - images + len(expected)


def test_matches_the_masked_reference_in_prefill_and_decoding(model, eager):
    ids, prunable = video_prompt(0)
    pruning = FastVPruning(LAYER, RATIO)
    tokens, logits, cache = fastv_greedy(model, pruning, ids, prunable, return_cache=True)
    kept = pruning.stats["kept_image_positions"][0]
    dropped = sorted(set(prunable[0].nonzero().flatten().tolist()) - set(kept))
    assert len(dropped) == 24 and pruning.stats["decode_steps"] == STEPS - 1

    with HiddenTokens(eager, dropped):
        ref_tokens, ref_logits = greedy(eager, ids)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)

    # FastV really changed what the model computes, and layers >= K really hold fewer tokens.
    _, full_logits = greedy(model, ids)
    assert (full_logits - logits).abs().max() > 1e-3
    cached = [cache.get_seq_length(layer) for layer in range(4)]
    full = ids.shape[1] + STEPS - 1
    assert cached == [full] * LAYER + [full - len(dropped)] * (4 - LAYER)


def test_forward_returns_the_compact_sequence(model, eager):
    ids, prunable = video_prompt(1)
    pruning = FastVPruning(LAYER, RATIO)
    install_fastv(model.model, pruning)
    try:
        pruning.start(prunable)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        # Not started again: the next forward is unmodified.
        with torch.no_grad():
            assert model(input_ids=ids, use_cache=False).logits.shape[1] == ids.shape[1]
    finally:
        remove_fastv(model.model)
    positions = pruning.stats["compact_positions"][0]
    assert logits.shape == (1, ids.shape[1] - 24, VOCAB) and positions[-1] == ids.shape[1] - 1
    dropped = sorted(set(range(ids.shape[1])) - set(positions))
    with HiddenTokens(eager, dropped), torch.no_grad():
        reference = eager(input_ids=ids, use_cache=False).logits
    # Every kept position's logits are exact, the last prompt token's included.
    torch.testing.assert_close(logits, reference[:, positions], atol=1e-4, rtol=0)


def test_ratio_zero_unstarted_and_imageless_runs_are_unmodified(model):
    ids, prunable = video_prompt(2)
    tokens, logits = greedy(model, ids)
    zero_tokens, zero_logits = fastv_greedy(model, FastVPruning(LAYER, 0.0), ids, prunable)
    assert torch.equal(zero_tokens, tokens) and torch.equal(zero_logits, logits)

    pruning = FastVPruning(LAYER, RATIO)
    install_fastv(model.model, pruning)
    try:
        assert torch.equal(greedy(model, ids)[1], logits)  # start() never called
        pruning.start(torch.zeros_like(prunable))
        assert torch.equal(greedy(model, ids)[1], logits)  # no image token
        assert pruning.stats["pruned"] is False
        pruning.start(prunable)
        assert not torch.equal(greedy(model, ids)[1], logits)
        # start() arms one generation only: the next one, not started, runs unmodified.
        assert torch.equal(greedy(model, ids)[1], logits)
    finally:
        remove_fastv(model.model)
    assert all(type(layer) is Qwen2DecoderLayer for layer in model.model.layers)
    assert not hasattr(model.model, "fastv_pruning")
    assert torch.equal(greedy(model, ids)[1], logits)


def test_no_state_leaks_between_generations(model):
    ids, prunable = video_prompt(3)
    other_ids, other_prunable = video_prompt(4, images=30)
    pruning = FastVPruning(LAYER, RATIO)
    install_fastv(model.model, pruning)
    install_fastv(model.model, pruning)  # idempotent
    try:
        pruning.start(prunable)
        first = greedy(model, ids)
        first_stats = pruning.stats
        pruning.start(other_prunable)
        greedy(model, other_ids, 5)
        assert pruning.stats["image_tokens"] == [30]
        pruning.start(prunable)
        second = greedy(model, ids)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
        assert pruning.stats == first_stats
    finally:
        remove_fastv(model.model)


def left_padded_batch(rows):
    width = max(row_ids.shape[1] for row_ids, _ in rows)

    def pad(tensors):
        return torch.cat([F.pad(tensor, (width - tensor.shape[1], 0)) for tensor in tensors])

    return (
        pad([row_ids for row_ids, _ in rows]),
        pad([torch.ones_like(row_ids) for row_ids, _ in rows]),
        pad([row_prunable for _, row_prunable in rows]),
    )


# (seed, prompt, images, question) per row: different image counts (so different kept counts), and equal image
# counts with different padding.
BATCHES = {
    "different_counts": [(5, 4, 26, 5), (6, 9, 36, 7)],
    "same_counts": [(7, 4, 30, 5), (8, 9, 30, 7)],
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_batch_with_left_padding_equals_rows_alone(model, batch):
    rows = [video_prompt(*row) for row in BATCHES[batch]]
    ids, attention_mask, prunable = left_padded_batch(rows)
    pruning = FastVPruning(LAYER, RATIO)
    tokens, logits = fastv_greedy(model, pruning, ids, prunable, attention_mask=attention_mask)
    batch_stats = pruning.stats
    assert batch_stats["image_tokens"] == [row[2] for row in BATCHES[batch]]
    for row, (row_ids, row_prunable) in enumerate(rows):
        row_tokens, row_logits = fastv_greedy(model, pruning, row_ids, row_prunable)
        assert torch.equal(tokens[row : row + 1], row_tokens)
        torch.testing.assert_close(logits[row : row + 1], row_logits, atol=1e-5, rtol=0)
        padding = ids.shape[1] - row_ids.shape[1]
        assert [p - padding for p in batch_stats["kept_image_positions"][row]] == pruning.stats[
            "kept_image_positions"
        ][0]


def test_rows_without_images_are_unaffected(model):
    text_ids, _ = video_prompt(9, images=0)
    video_ids, video_prunable = video_prompt(10, images=40)
    ids, attention_mask, prunable = left_padded_batch([(text_ids, torch.zeros_like(text_ids, dtype=torch.bool)),
                                                       (video_ids, video_prunable)])
    pruning = FastVPruning(LAYER, RATIO)
    tokens, logits = fastv_greedy(model, pruning, ids, prunable, attention_mask=attention_mask)
    text_tokens, text_logits = greedy(model, text_ids)
    assert torch.equal(tokens[:1], text_tokens)
    torch.testing.assert_close(logits[:1], text_logits, atol=1e-5, rtol=0)
    assert pruning.stats["kept_image_positions"][0] == []


@pytest.mark.parametrize("backend", ["eager", "padding_mask_2d"])
def test_backends_agree(model, backend):
    """sdpa (4D bool mask or None), eager (4D float mask) and a flash-attention-like backend (2D mask or None)."""
    other = with_backend(model, backend if backend == "eager" else _register_padding_mask_2d_backend())
    single = video_prompt(11)
    rows = [video_prompt(*row) for row in BATCHES["different_counts"]]
    for ids, attention_mask, prunable in [(single[0], None, single[1]), left_padded_batch(rows)]:
        expected_pruning, pruning = FastVPruning(LAYER, RATIO), FastVPruning(LAYER, RATIO)
        tokens, logits = fastv_greedy(model, expected_pruning, ids, prunable, attention_mask=attention_mask)
        other_tokens, other_logits = fastv_greedy(other, pruning, ids, prunable, attention_mask=attention_mask)
        assert torch.equal(tokens, other_tokens)
        torch.testing.assert_close(logits, other_logits, atol=1e-5, rtol=0)
        assert pruning.stats == expected_pruning.stats


def _register_padding_mask_2d_backend() -> str:
    """A backend that, like flash attention, only accepts a 2D padding mask (or None)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask
    from transformers.models.qwen2.modeling_qwen2 import repeat_kv

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        assert attention_mask is None or attention_mask.ndim == 2
        key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
        query_length, key_length = query.shape[2], key.shape[2]
        allowed = torch.ones(query_length, key_length, dtype=torch.bool).tril(key_length - query_length)
        if attention_mask is not None:
            allowed = allowed[None, None] & attention_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("fastv_padding_mask_2d_test", attention)
    AttentionMaskInterface.register("fastv_padding_mask_2d_test", flash_attention_mask)
    return "fastv_padding_mask_2d_test"


def test_invalid_arguments_raise_clear_errors(model):
    with pytest.raises(ValueError, match="layer must be >= 1"):
        FastVPruning(0, RATIO)
    for layer in (2.0, True, "2"):
        with pytest.raises(ValueError, match="layer must be an int"):
            FastVPruning(layer, RATIO)
    for ratio in (1.0, -0.1, 1.5, "0.5", float("nan"), True):
        with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
            FastVPruning(LAYER, ratio)
    with pytest.raises(ValueError, match=r"must be in \[1, 3\] for a model with 4 decoder layers"):
        install_fastv(model.model, FastVPruning(4, RATIO))
    with pytest.raises(TypeError, match="FastVPruning"):
        install_fastv(model.model, DyCokeKVPruning(LAYER, RATIO))

    pruning = FastVPruning(LAYER, RATIO)
    with pytest.raises(TypeError, match="torch.bool"):
        pruning.start(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(batch, prefill_length\)"):
        pruning.start(torch.zeros(5, dtype=torch.bool))

    ids, prunable = video_prompt(12)
    with pytest.raises(ValueError, match=r"prunable_mask of shape \(1, 62\) but the prefill has shape \(1, 63\)"):
        fastv_greedy(model, pruning, ids, prunable[:, 1:], 3)
    assert all(type(layer) is Qwen2DecoderLayer for layer in model.model.layers)

    # FastV and DyCoke KV pruning both switch decoder layers: one at a time.
    install_dycoke_kv_pruning(model.model, DyCokeKVPruning(LAYER, 0.7))
    try:
        with pytest.raises(TypeError, match="remove it before installing FastV"):
            install_fastv(model.model, pruning)
    finally:
        remove_dycoke_kv_pruning(model.model)


def test_install_switches_only_layers_from_the_decision_layer(model):
    pruning = FastVPruning(LAYER, RATIO)
    weights = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    install_fastv(model.model, pruning)
    try:
        kinds = [type(layer) for layer in model.model.layers]
        assert kinds == [Qwen2DecoderLayer] * (LAYER - 1) + [FastVDecoderLayer] * (4 - LAYER + 1)
        assert {name: tensor.data_ptr() for name, tensor in model.state_dict().items()} == weights
        install_fastv(model.model, FastVPruning(1, RATIO))
        assert all(type(layer) is FastVDecoderLayer for layer in model.model.layers)
    finally:
        remove_fastv(model.model)
    assert all(type(layer) is Qwen2DecoderLayer for layer in model.model.layers)


@pytest.mark.parametrize("layer", [1, 3])
def test_other_layers_match_the_reference(model, eager, layer):
    ids, prunable = video_prompt(13)
    pruning = FastVPruning(layer, 0.75)
    tokens, logits = fastv_greedy(model, pruning, ids, prunable, steps=6)
    kept = pruning.stats["kept_image_positions"][0]
    assert kept == reference_kept_positions(eager, ids, prunable, layer, 0.75) and len(kept) == 12
    dropped = sorted(set(prunable[0].nonzero().flatten().tolist()) - set(kept))
    with HiddenTokens(eager, dropped, layer):
        ref_tokens, ref_logits = greedy(eager, ids, 6)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_accelerate_dispatch_hooks_keep_working(model):
    hooks = pytest.importorskip("accelerate.hooks")

    class CountCalls(hooks.ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountCalls.calls += 1
            return args, kwargs

    ids, prunable = video_prompt(14)
    hooked = with_backend(model, "sdpa")
    expected = fastv_greedy(model, FastVPruning(LAYER, RATIO), ids, prunable, steps=6)
    for layer in hooked.model.layers:
        hooks.add_hook_to_module(layer, CountCalls())
    got = fastv_greedy(hooked, FastVPruning(LAYER, RATIO), ids, prunable, steps=6)
    assert torch.equal(got[1], expected[1])
    assert CountCalls.calls == 6 * len(hooked.model.layers)
