"""DyCoke dynamic KV pruning on a tiny random Qwen2 model, checked against a straightforward masked reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from llava.compression import dycoke_kv
from llava.compression.dycoke_kv import (
    DyCokeDecoderLayer,
    DyCokeKVPruning,
    install_dycoke_kv_pruning,
    remove_dycoke_kv_pruning,
)

LAYER, RATIO = 2, 0.7
VOCAB = 300
# Steps that keep the active set attend over the compact copy or over the full cache with a mask, by size
# (DyCokeKVPruning.compact_min_bytes); the tiny model is far below the default, so both are forced here.
PATHS = {"masked": math.inf, "compact": 0}


def make_pruning(path: str = "masked", threshold: float = 0.9) -> DyCokeKVPruning:
    pruning = DyCokeKVPruning(LAYER, RATIO, threshold=threshold)
    pruning.compact_min_bytes = PATHS[path]
    return pruning


def tiny_model(attn_implementation: str = "sdpa", seed: int = 0) -> Qwen2ForCausalLM:
    # initializer_range 0.1 makes attention peaked enough that the active set both changes and stays across steps.
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


@pytest.fixture(scope="module")
def model():
    return tiny_model()


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


def greedy(model, ids, steps, attention_mask=None):
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
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)


def pruned_greedy(model, pruning, ids, prunable, steps, attention_mask=None):
    install_dycoke_kv_pruning(model.model, pruning)
    try:
        pruning.start(prunable)
        return greedy(model, ids, steps, attention_mask)
    finally:
        remove_dycoke_kv_pruning(model.model)


class MaskedReference:
    """The rule, written plainly on an unmodified eager model: layer L-1's eager attention probabilities decide
    the active image tokens; layers >= L get inactive image tokens hidden by an additive 4D mask."""

    def __init__(self, model, prunable, layer, ratio, threshold=0.9):
        self.image_positions = prunable[0].nonzero().flatten()
        self.keep = int(len(self.image_positions) * (1 - ratio))
        self.threshold = threshold
        self.active = self.previous = None
        self.recompute_steps = []
        self.changed_steps = []  # recomputations that picked a different set
        self.step = 0
        layers = model.model.layers
        self.handles = [layers[layer - 1].self_attn.register_forward_hook(self.decide)]
        for decoder_layer in layers[layer:]:
            self.handles.append(decoder_layer.self_attn.register_forward_pre_hook(self.hide, with_kwargs=True))

    def decide(self, module, args, output):
        weights = output[1]  # eager: (batch, heads, query, keys)
        if weights.shape[2] != 1:
            return  # prefill is exact
        attention = weights[0].mean(dim=0)[-1][self.image_positions]
        if self.previous is None or F.cosine_similarity(attention, self.previous, dim=0) < self.threshold:
            active = self.image_positions[attention.topk(self.keep).indices]
            if self.active is not None and set(active.tolist()) != set(self.active.tolist()):
                self.changed_steps.append(self.step)
            self.active = active
            self.recompute_steps.append(self.step)
        self.previous = attention
        self.step += 1

    def hide(self, module, args, kwargs):
        if kwargs["hidden_states"].shape[1] != 1:
            return None
        mask = kwargs["attention_mask"]
        hidden = torch.zeros(mask.shape[-1], dtype=torch.bool)
        hidden[self.image_positions] = True
        hidden[self.active] = False
        kwargs["attention_mask"] = mask.masked_fill(hidden, torch.finfo(mask.dtype).min)
        return args, kwargs

    def remove(self):
        for handle in self.handles:
            handle.remove()


def reference_greedy(model, ids, prunable, steps, threshold=0.9):
    """Greedy generate of the masked reference (an eager copy of ``model``), and the reference's record."""
    eager = with_backend(model, "eager")
    reference = MaskedReference(eager, prunable, LAYER, RATIO, threshold)
    try:
        tokens, logits = greedy(eager, ids, steps)
    finally:
        reference.remove()
    return tokens, logits, reference


@pytest.mark.parametrize("path", PATHS)
def test_matches_masked_reference_including_changes_and_reuses_of_the_active_set(model, path):
    steps = 12
    # Find an input whose run both recomputes after the first step and reuses the active set.
    for seed in range(20):
        ids, prunable = video_prompt(seed)
        pruning = make_pruning(path)
        tokens, logits = pruned_greedy(model, pruning, ids, prunable, steps)
        stats = pruning.stats
        if 2 <= stats["recomputations"][0] < stats["decode_steps"]:
            break
    assert 2 <= stats["recomputations"][0] < stats["decode_steps"] == steps - 1
    assert stats["image_tokens"] == [48] and stats["active_image_tokens"] == [int(48 * (1 - RATIO))]

    ref_tokens, ref_logits, reference = reference_greedy(model, ids, prunable, steps)
    assert reference.recompute_steps == stats["recompute_steps"][0]
    assert reference.changed_steps, "the active set never changed after the first step"
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)

    # Pruning really changed what the model computes.
    _, full_logits = greedy(model, ids, steps)
    assert (full_logits[:, 1:] - logits[:, 1:]).abs().max() > 1e-3
    # Prefill is exact.
    torch.testing.assert_close(logits[:, 0], full_logits[:, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threshold", [2.0, -1.0], ids=["set-changes-every-step", "set-never-changes"])
def test_matches_masked_reference_when_the_set_always_or_never_changes(model, path, threshold):
    """threshold 2: every step recomputes (what random weights mostly do); -1: only the first step does."""
    steps = 10
    ids, prunable = video_prompt(12)
    pruning = make_pruning(path, threshold)
    tokens, logits = pruned_greedy(model, pruning, ids, prunable, steps)
    ref_tokens, ref_logits, reference = reference_greedy(model, ids, prunable, steps, threshold)
    expected_steps = list(range(steps - 1)) if threshold > 1 else [0]
    assert pruning.stats["recompute_steps"] == [expected_steps] and reference.recompute_steps == expected_steps
    if threshold > 1:
        assert reference.changed_steps, "the active set never changed"
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_compact_copy_and_mask_buffers_grow(model, monkeypatch):
    monkeypatch.setattr(dycoke_kv, "_COMPACT_GROWTH", 2)
    ids, prunable = video_prompt(13)
    for threshold in (0.9, -1.0):
        for path in PATHS:
            pruning = make_pruning(path, threshold)
            tokens, logits = pruned_greedy(model, pruning, ids, prunable, 9)
            ref_tokens, ref_logits, reference = reference_greedy(model, ids, prunable, 9, threshold)
            assert pruning.stats["recompute_steps"][0] == reference.recompute_steps
            assert torch.equal(tokens, ref_tokens)
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_steps_that_change_the_set_copy_nothing_and_the_decision_reuses_the_layer_query(model):
    """On the full-cache path no compact copy is made; the compact copy exists only for steps keeping the set;
    layer L-1 projects its query once per forward (the decision reuses it)."""
    ids, prunable = video_prompt(14)
    decision_layer = model.model.layers[LAYER - 1]
    calls = []
    handle = decision_layer.self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    try:
        for threshold, compact_layers in ((2.0, []), (-1.0, [LAYER, LAYER + 1])):
            calls.clear()
            pruning = make_pruning("compact", threshold)
            install_dycoke_kv_pruning(model.model, pruning)
            try:
                pruning.start(prunable)
                greedy(model, ids, 6)
                assert sorted(pruning._sequence.compact) == compact_layers
            finally:
                remove_dycoke_kv_pruning(model.model)
            assert len(calls) == 6  # the prefill and 5 decoding steps
    finally:
        handle.remove()


def test_ratio_zero_and_removal_leave_the_model_unmodified(model):
    ids, prunable = video_prompt(1)
    tokens, logits = greedy(model, ids, 10)
    zero_tokens, zero_logits = pruned_greedy(model, DyCokeKVPruning(LAYER, 0.0), ids, prunable, 10)
    assert torch.equal(zero_tokens, tokens)
    assert torch.equal(zero_logits, logits)

    pruned_tokens, _ = pruned_greedy(model, DyCokeKVPruning(LAYER, RATIO), ids, prunable, 10)
    assert all(type(layer) is Qwen2DecoderLayer for layer in model.model.layers)
    assert not hasattr(model.model, "dycoke_kv_pruning")
    after_tokens, after_logits = greedy(model, ids, 10)
    assert torch.equal(after_tokens, tokens)
    assert torch.equal(after_logits, logits)


def test_unstarted_or_imageless_generation_is_unmodified(model):
    ids, prunable = video_prompt(2)
    tokens, logits = greedy(model, ids, 8)
    pruning = DyCokeKVPruning(LAYER, RATIO)
    install_dycoke_kv_pruning(model.model, pruning)
    try:
        assert torch.equal(greedy(model, ids, 8)[1], logits)  # start() never called
        pruning.start(torch.zeros_like(prunable))
        assert torch.equal(greedy(model, ids, 8)[1], logits)  # no image token
        pruning.start(prunable)
        assert not torch.equal(greedy(model, ids, 8)[1], logits)
        # start() arms one generation only: the next one, not started, runs unmodified.
        assert torch.equal(greedy(model, ids, 8)[1], logits)
    finally:
        remove_dycoke_kv_pruning(model.model)


def test_no_state_leaks_between_generations(model):
    ids, prunable = video_prompt(3)
    other_ids, other_prunable = video_prompt(4, images=30)
    pruning = DyCokeKVPruning(LAYER, RATIO)
    install_dycoke_kv_pruning(model.model, pruning)
    install_dycoke_kv_pruning(model.model, pruning)  # idempotent
    try:
        pruning.start(prunable)
        first = greedy(model, ids, 10)
        first_stats = pruning.stats
        pruning.start(other_prunable)
        greedy(model, other_ids, 6)
        pruning.start(prunable)
        second = greedy(model, ids, 10)
        assert torch.equal(first[0], second[0])
        assert torch.equal(first[1], second[1])
        assert _same_stats(pruning.stats, first_stats)
    finally:
        remove_dycoke_kv_pruning(model.model)


def _same_stats(a, b):
    """Equal statistics; the similarity of the first step is NaN, which == would not accept."""
    without_similarity = [{key: value for key, value in stats.items() if key != "similarity"} for stats in (a, b)]
    same_similarity = torch.equal(torch.tensor(a["similarity"]).nan_to_num(), torch.tensor(b["similarity"]).nan_to_num())
    return without_similarity[0] == without_similarity[1] and same_similarity


def two_rows():
    """Two video prompts with different image spans, and their left-padded batch."""
    rows = [video_prompt(5, prompt=4, images=26, question=5), video_prompt(6, prompt=9, images=36, question=7)]
    width = max(row_ids.shape[1] for row_ids, _ in rows)

    def left_padded(tensors):
        return torch.cat([F.pad(tensor, (width - tensor.shape[1], 0)) for tensor in tensors])

    ids = left_padded([row_ids for row_ids, _ in rows])
    attention_mask = left_padded([torch.ones_like(row_ids) for row_ids, _ in rows])
    prunable = left_padded([row_prunable for _, row_prunable in rows])
    return rows, (ids, attention_mask, prunable)


@pytest.mark.parametrize("path", PATHS)
def test_batch_with_left_padding_equals_rows_alone(model, path):
    rows, (ids, attention_mask, prunable) = two_rows()
    pruning = make_pruning(path)
    tokens, logits = pruned_greedy(model, pruning, ids, prunable, 10, attention_mask)
    batch_stats = pruning.stats
    for row, (row_ids, row_prunable) in enumerate(rows):
        row_tokens, row_logits = pruned_greedy(model, pruning, row_ids, row_prunable, 10)
        assert torch.equal(tokens[row : row + 1], row_tokens)
        torch.testing.assert_close(logits[row : row + 1], row_logits, atol=1e-5, rtol=0)
        assert batch_stats["recompute_steps"][row] == pruning.stats["recompute_steps"][0]
    assert batch_stats["image_tokens"] == [26, 36]


@pytest.mark.parametrize("path", PATHS)
def test_uneven_rows_without_padding_equal_rows_alone(model, path):
    """Rows of one length with different image counts: no padding, but unused slots in the padded layout."""
    rows = [video_prompt(15, prompt=4, images=26, question=5), video_prompt(16, prompt=9, images=16, question=10)]
    ids = torch.cat([row_ids for row_ids, _ in rows])
    prunable = torch.cat([row_prunable for _, row_prunable in rows])
    pruning = make_pruning(path)
    tokens, logits = pruned_greedy(model, pruning, ids, prunable, 10)
    batch_stats = pruning.stats
    assert batch_stats["image_tokens"] == [26, 16]
    for row, (row_ids, row_prunable) in enumerate(rows):
        row_tokens, row_logits = pruned_greedy(model, pruning, row_ids, row_prunable, 10)
        assert torch.equal(tokens[row : row + 1], row_tokens)
        torch.testing.assert_close(logits[row : row + 1], row_logits, atol=1e-5, rtol=0)
        assert batch_stats["recompute_steps"][row] == pruning.stats["recompute_steps"][0]


@pytest.mark.parametrize("path", PATHS)
def test_rows_without_images_are_unaffected(model, path):
    text_ids, _ = video_prompt(7, images=0)
    video_ids, video_prunable = video_prompt(8, images=40)
    pad = video_ids.shape[1] - text_ids.shape[1]
    ids = torch.cat([F.pad(text_ids, (pad, 0)), video_ids])
    attention_mask = torch.cat([F.pad(torch.ones_like(text_ids), (pad, 0)), torch.ones_like(video_ids)])
    prunable = torch.cat([torch.zeros_like(video_prunable), video_prunable])

    pruning = make_pruning(path)
    tokens, logits = pruned_greedy(model, pruning, ids, prunable, 8, attention_mask)
    text_tokens, text_logits = greedy(model, text_ids, 8)
    assert torch.equal(tokens[:1], text_tokens)
    torch.testing.assert_close(logits[:1], text_logits, atol=1e-5, rtol=0)
    assert pruning.stats["recomputations"][0] == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", ["eager", "padding_mask_2d"])
def test_backends_give_the_same_pruned_tokens(model, backend, path):
    """sdpa (4D bool mask or None), eager (4D float mask) and a flash-attention-like backend (2D mask or None)."""
    other = with_backend(model, backend if backend == "eager" else _register_padding_mask_2d_backend())
    single = video_prompt(9)
    _, (ids, attention_mask, prunable) = two_rows()
    for ids, attention_mask, prunable in [(single[0], None, single[1]), (ids, attention_mask, prunable)]:
        expected_pruning, pruning = make_pruning(path), make_pruning(path)
        tokens, logits = pruned_greedy(model, expected_pruning, ids, prunable, 10, attention_mask)
        other_tokens, other_logits = pruned_greedy(other, pruning, ids, prunable, 10, attention_mask)
        assert torch.equal(tokens, other_tokens)
        torch.testing.assert_close(logits, other_logits, atol=1e-5, rtol=0)
        assert pruning.stats["recompute_steps"] == expected_pruning.stats["recompute_steps"]


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

    AttentionInterface.register("padding_mask_2d_test", attention)
    AttentionMaskInterface.register("padding_mask_2d_test", flash_attention_mask)
    return "padding_mask_2d_test"


def test_accelerate_dispatch_hooks_keep_working(model):
    hooks = pytest.importorskip("accelerate.hooks")

    class CountCalls(hooks.ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountCalls.calls += 1
            return args, kwargs

    ids, prunable = video_prompt(10)
    hooked = with_backend(model, "sdpa")
    expected = pruned_greedy(model, DyCokeKVPruning(LAYER, RATIO), ids, prunable, 6)
    for layer in hooked.model.layers:
        hooks.add_hook_to_module(layer, CountCalls())
    got = pruned_greedy(hooked, DyCokeKVPruning(LAYER, RATIO), ids, prunable, 6)
    assert torch.equal(got[1], expected[1])
    assert CountCalls.calls == 6 * len(hooked.model.layers)


def test_invalid_arguments_raise_clear_errors(model):
    with pytest.raises(ValueError, match="layer must be >= 1"):
        DyCokeKVPruning(0, RATIO)
    with pytest.raises(ValueError, match="layer must be an int"):
        DyCokeKVPruning(2.0, RATIO)
    for ratio in (1.0, -0.1, 1.5, "0.7"):
        with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
            DyCokeKVPruning(LAYER, ratio)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        DyCokeKVPruning(LAYER, RATIO, threshold=float("nan"))
    with pytest.raises(ValueError, match=r"must be in \[1, 3\] for a model with 4 decoder layers"):
        install_dycoke_kv_pruning(model.model, DyCokeKVPruning(4, RATIO))
    with pytest.raises(TypeError, match="DyCokeKVPruning"):
        install_dycoke_kv_pruning(model.model, object())

    pruning = DyCokeKVPruning(LAYER, RATIO)
    with pytest.raises(TypeError, match="torch.bool"):
        pruning.start(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(batch, prefill_length\)"):
        pruning.start(torch.zeros(5, dtype=torch.bool))

    ids, prunable = video_prompt(11)
    with pytest.raises(ValueError, match=r"prunable_mask of shape \(1, 62\) but the prefill has shape \(1, 63\)"):
        pruned_greedy(model, pruning, ids, prunable[:, 1:], 3)
    assert all(type(layer) is Qwen2DecoderLayer for layer in model.model.layers)


def test_install_switches_only_layers_from_the_decision_layer(model):
    pruning = DyCokeKVPruning(LAYER, RATIO)
    weights = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    install_dycoke_kv_pruning(model.model, pruning)
    try:
        kinds = [type(layer) for layer in model.model.layers]
        assert kinds == [Qwen2DecoderLayer] * (LAYER - 1) + [DyCokeDecoderLayer] * (4 - LAYER + 1)
        assert {name: tensor.data_ptr() for name, tensor in model.state_dict().items()} == weights
        install_dycoke_kv_pruning(model.model, DyCokeKVPruning(1, RATIO))
        assert all(type(layer) is DyCokeDecoderLayer for layer in model.model.layers)
    finally:
        remove_dycoke_kv_pruning(model.model)


def test_shared_single_query_attention_helpers():
    from llava.compression._attention import (
        additive_key_mask,
        key_validity,
        mean_head_attention,
        single_query_attention,
        single_query_attention_with_weights,
    )

    generator = torch.Generator().manual_seed(0)
    batch, heads, key_heads, length, head_dim, scaling = 2, 6, 2, 9, 8, 0.3
    query = torch.randn(batch, heads, 1, head_dim, generator=generator)
    keys, values = (torch.randn(batch, key_heads, length, head_dim, generator=generator) for _ in "kv")
    valid = torch.rand(batch, length, generator=generator) > 0.3
    valid[:, -1] = True
    # Eager attention with repeated key/value heads (head h uses key/value head h // groups).
    repeated_keys, repeated_values = (t.repeat_interleave(heads // key_heads, dim=1) for t in (keys, values))
    scores = (query @ repeated_keys.transpose(2, 3) * scaling).masked_fill(~valid[:, None, None, :], float("-inf"))
    probabilities = scores.softmax(dim=-1)
    expected = (probabilities @ repeated_values).transpose(1, 2).reshape(batch, 1, heads * head_dim)

    for mask in (valid, additive_key_mask(valid, torch.float32)):
        torch.testing.assert_close(single_query_attention(query, keys, values, mask, scaling), expected)
    attended, mean = single_query_attention_with_weights(query, keys, values, valid, scaling)
    torch.testing.assert_close(attended, expected)
    torch.testing.assert_close(mean, probabilities[:, :, 0].mean(dim=1))
    torch.testing.assert_close(mean, mean_head_attention(query, keys, valid, scaling))

    # Key validity from each backend's mask format.
    additive = torch.zeros(batch, 1, 1, length).masked_fill(~valid[:, None, None, :], torch.finfo(torch.float32).min)
    for backend_mask in (valid[:, None, None, :], additive, valid.long()):
        assert torch.equal(key_validity(backend_mask, batch, length), valid)
    assert key_validity(None, batch, length) is None
    with pytest.raises(NotImplementedError, match="attention masks .* are not supported"):
        key_validity(object(), batch, length)
