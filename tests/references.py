"""Plain reference implementations the compressed models are checked against, and the helpers to run them.

Each reference states its method's rule in the most direct way, on an unmodified model with eager attention: hooks
read eager attention's probabilities and hide tokens with the additive attention mask. Hiding a key with the mask
while keeping every position id gives the same result as removing it (what the optimised code does), so equal
logits prove both the selection and the bookkeeping.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from transformers import (
    CompileConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from llava.checkpoint_maker import scale_attention_logits  # noqa: F401  (used by the tests through here)
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import tokenizer_image_token
from llava.model.builder import load_pretrained_model


def load(checkpoint, attn: str = "sdpa", **compression):
    """(tokenizer, model) of a small checkpoint on the CPU in float32."""
    tokenizer, model, _, _ = load_pretrained_model(
        str(checkpoint), None, "llava_qwen", device_map="cpu", torch_dtype="float32", attn_implementation=attn,
        **compression,
    )
    return tokenizer, model


def prompt(tokenizer, question: str = "What happens in the video?") -> torch.Tensor:
    conv = conv_templates["qwen_1_5"].copy()
    conv.append_message(conv.roles[0], f"<image>\n{question}")
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]


def compile_config() -> CompileConfig:
    """Compiled decoding on the CPU, checked for graph breaks (fullgraph) without code generation (eager backend)."""
    config = CompileConfig(fullgraph=True, backend="eager", mode="default")
    config._compile_all_devices = True  # transformers compiles on CPU only when asked this way
    return config


def cache_variants() -> dict[str, dict]:
    """The three ways a generation may run, as generate's keyword arguments: dynamic cache, static cache, static
    cache with compiled decoding (a CompileConfig of its own per call: test modules do not share compiled code)."""
    return {
        "dynamic": {},
        "static": {"cache_implementation": "static"},
        "static-compiled": {"cache_implementation": "static", "compile_config": compile_config()},
    }


def greedy(model, tokenizer, ids, videos, steps: int, **kwargs):
    """(new tokens (B, steps), logits (B, steps, vocab)) of a greedy generate with exactly ``steps`` tokens."""
    output = model.generate(
        ids, images=videos, modalities=["video"] * len(videos), do_sample=False, max_new_tokens=steps,
        min_new_tokens=steps, pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True,
        **kwargs,
    )
    return output.sequences, torch.stack(output.logits, dim=1)


def video_positions(model, ids, video) -> torch.Tensor:
    """Prompt (cache) positions of the video tokens the model's current compressor lets into the prompt."""
    mm = model.build_multimodal_inputs(ids, None, None, [video], ["video"], None, padding_side="left")
    return mm.video_token_mask[0].nonzero().flatten()


def decoder_layers(model):
    """The language model's decoder layers: this package's LLaVA model, or transformers' video LLMs."""
    if hasattr(model, "get_model"):
        return model.get_model().layers
    return model.model.language_model.layers


def _hook(model, layer: int, read, hide) -> list:
    """``read`` after layer ``layer - 1``'s attention (its output: output, probabilities), ``hide`` before the
    attention of every later layer (it may replace the attention mask)."""
    layers = decoder_layers(model)
    handles = [layers[layer - 1].self_attn.register_forward_hook(read)]
    handles += [later.self_attn.register_forward_pre_hook(hide, with_kwargs=True) for later in layers[layer:]]
    return handles


class _Hooked:
    handles: list

    def remove(self):
        for handle in self.handles:
            handle.remove()


def to_transformers_key(name: str, vision_prefix: str) -> str:
    """Original LLaVA-NeXT weight name -> transformers LlavaOnevision name (its tower's keys start with vision_prefix)."""
    replacements = [
        ("model.vision_tower.vision_tower.vision_model.", vision_prefix),
        ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
        ("model.image_newline", "model.image_newline"),
    ]
    for old, new in replacements:
        if name.startswith(old):
            return new + name[len(old):]
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def transformers_onevision(tiny_checkpoint, model, attn: str = "sdpa"):
    """transformers' LlavaOnevisionForConditionalGeneration with the weights of ``model`` (this package's model,
    loaded from ``tiny_checkpoint``), converted to its format; returns (it, its placeholder token id: an unused
    vocabulary id, for images and videos)."""
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    vision = json.loads((tiny_checkpoint / "vision_tower" / "config.json").read_text())
    vision["num_hidden_layers"] -= 1
    vision.pop("model_type")
    placeholder = raw["vocab_size"] - 1
    text_fields = {k: raw[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "rms_norm_eps", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "rope_theta",
    )}
    config = LlavaOnevisionConfig(
        text_config=Qwen2Config(**text_fields),
        vision_config=SiglipVisionConfig(**vision, vision_use_head=False),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=raw["image_grid_pinpoints"],
        vision_aspect_ratio=raw["image_aspect_ratio"],
        image_token_index=placeholder,
        video_token_index=placeholder,
        tie_word_embeddings=raw["tie_word_embeddings"],
    )
    config._attn_implementation = attn
    reference = LlavaOnevisionForConditionalGeneration(config).eval()
    # transformers 5.4 nests SigLIP's layers under `vision_model.`, 5.23 does not: follow the reference's own names.
    nested = any(key.startswith("model.vision_tower.vision_model.") for key in reference.state_dict())
    vision_prefix = "model.vision_tower.vision_model." if nested else "model.vision_tower."
    state = {to_transformers_key(k, vision_prefix): v for k, v in model.state_dict().items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k for k in missing), missing  # tied to the embeddings
    reference.tie_weights()
    return reference, placeholder


class MaskedDyCoke(_Hooked):
    """DyCoke's KV pruning rule on an eager model (batch 1), with hooks.

    Layer L-1's eager attention probabilities of the decoding query, averaged over heads and read at the video
    positions, decide the active set (top int(n * (1 - p)); recomputed at the first step and when the cosine with the
    previous step's is below the threshold); layers >= L get the inactive video tokens hidden by the additive mask.
    ``public_quirks``: the prunable span leaves out the last video token, and steps that keep the set hide nothing.

    Per decoding step it records ``scores`` (the vector ``a``), ``attended`` (the video positions layers >= L see),
    ``recomputed`` and, on the steps that recompute, ``boundaries`` ([lowest kept, highest dropped] score).
    """

    def __init__(self, model, positions, layer: int, ratio: float, threshold: float = 0.9, public_quirks=False):
        self.video = positions
        self.positions = positions[:-1] if public_quirks else positions
        self.keep = int(len(self.positions) * (1 - ratio))
        self.threshold, self.public_quirks = threshold, public_quirks
        self.active = self.previous = None
        self.recomputed: list[bool] = []
        self.margins: list[float] = []  # a selection is well defined when no margin is within rounding
        self.scores: list[torch.Tensor] = []
        self.attended: list[torch.Tensor] = []
        self.boundaries: list[tuple[float, float] | None] = []
        self.hide_now = True
        self.handles = _hook(model, layer, read=self.decide, hide=self.hide)

    def decide(self, module, args, output):
        weights = output[1]  # eager: (batch, heads, queries, keys)
        if weights.shape[2] != 1:
            return  # the prefill is exact
        attention = weights[0].mean(dim=0)[-1][self.positions]
        recompute = self.previous is None or F.cosine_similarity(attention, self.previous, dim=0) < self.threshold
        boundary = None
        if recompute:
            self.active = self.positions[attention.topk(self.keep).indices]
            ranked = attention.sort(descending=True).values
            if 0 < self.keep < len(ranked):  # how far the last kept token is from the first dropped one
                boundary = (float(ranked[self.keep - 1]), float(ranked[self.keep]))
                self.margins.append(boundary[0] - boundary[1])
        self.recomputed.append(bool(recompute))
        self.boundaries.append(boundary)
        self.scores.append(attention)
        self.hide_now = bool(recompute) or not self.public_quirks
        attended = self.active if self.hide_now else self.video
        if self.public_quirks and self.hide_now:
            attended = torch.cat([attended, self.video[-1:]])  # outside the span: never hidden
        self.attended.append(attended.sort().values)
        self.previous = attention

    def hide(self, module, args, kwargs):
        if kwargs["hidden_states"].shape[1] != 1 or not self.hide_now:
            return None
        mask = kwargs["attention_mask"]
        hidden = torch.zeros(mask.shape[-1], dtype=torch.bool)
        hidden[self.positions] = True
        hidden[self.active] = False
        kwargs["attention_mask"] = mask.masked_fill(hidden, torch.finfo(mask.dtype).min)
        return args, kwargs


class HiddenFastV(_Hooked):
    """FastV's rule on an eager model (batch 1), with hooks: from layer K on, the prefill and every decoding step see
    the video tokens outside the top round(n * (1 - R)) of layer K-1's last-prompt-token attention hidden by the
    mask (their position ids unchanged). ``rounding``: how n * (1 - R) becomes a count (FlashVID: math.ceil)."""

    def __init__(self, model, positions, layer: int, ratio: float, rounding=round):
        self.positions = positions
        self.keep = rounding(len(self.positions) * (1 - ratio))
        self.dropped = None
        self.handles = _hook(model, layer, read=self.rank, hide=self.hide)

    def rank(self, module, args, output):
        weights = output[1]
        if weights.shape[2] == 1:
            return
        attention = weights[0].mean(dim=0)[-1][self.positions]
        kept = self.positions[attention.topk(self.keep).indices]
        self.dropped = self.positions[~torch.isin(self.positions, kept)]

    def hide(self, module, args, kwargs):
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = mask.index_fill(-1, self.dropped, torch.finfo(mask.dtype).min)
        return args, kwargs


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations whose result or output shape needs the tensor's data on the host (and calls of
    ``Tensor.tolist``, which no dispatch mode sees). With ``decoding_only``, only inside ``model``'s decoding
    forwards (one new token per row), so what generate's own loop and the prefill do is left out."""

    READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique2",
             "aten::item", "aten::equal")

    def __init__(self, model=None, decoding_only: bool = False):
        super().__init__()
        self.count = self.forwards = 0
        self.model, self.watching = model, not decoding_only

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        reads = self

        def counted_tolist(tensor):
            reads.count += reads.watching
            return reads._tolist(tensor)

        torch.Tensor.tolist = counted_tolist
        if self.model is not None and not self.watching:
            self._hooks = [
                self.model.register_forward_pre_hook(self._start, with_kwargs=True),
                self.model.register_forward_hook(self._stop),
            ]
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        return super().__exit__(*exc)

    def _start(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        self.watching = ids is not None and ids.shape[1] == 1
        self.forwards += self.watching

    def _stop(self, module, args, output):
        self.watching = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.watching and func._schema.name in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


# ---- selection references (loops written from the rules in DESIGN.md) -------------------------------------------


def reference_ttm(features: torch.Tensor, k: float) -> tuple[list[int], list[int]]:
    """Straightforward per-frame TTM, written from the description. Returns (index, per_frame)."""
    num_frames, n_tok, _ = features.shape
    feats = features.float()
    if k == 0:
        return list(range(num_frames * n_tok)), [n_tok] * num_frames
    n = int((1 - k) * n_tok)
    kept = {f: list(range(n_tok)) for f in range(num_frames)}
    for first in range(0, num_frames - 1, 2):
        sim = F.cosine_similarity(feats[first], feats[first + 1], dim=1)
        kept[first + 1] = sim.topk(n, largest=False).indices.tolist()
    for i in range(0, num_frames - 4, 4):
        sim = F.cosine_similarity(feats[i], feats[i + 2], dim=1)
        kept[i + 2] = sim.topk(n, largest=False).indices.tolist()
    index = [f * n_tok + t for f in range(num_frames) for t in kept[f]]
    return index, [len(kept[f]) for f in range(num_frames)]


def reference_vidcom2(features: torch.Tensor, r: float) -> tuple[list[int], list[int]]:
    """Per-frame loop written from the description in DESIGN.md section 5."""
    num_frames, n_tok, dim = features.shape
    flat = features.float().reshape(-1, dim)
    variance = flat.var(dim=0, unbiased=False)
    channels = variance.argsort()[: dim // 2]
    x = flat[:, channels]
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    video_center = x.mean(dim=0)

    def gaussian(tokens, center):
        d2 = ((tokens - center) ** 2).sum(dim=-1)
        return sum(torch.exp(-d2 / (2 * 2.0**e)) for e in range(-3, 2))

    video_sim, frame_sim = [], []
    for f in range(num_frames):
        tokens = x[f * n_tok : (f + 1) * n_tok]
        video_sim.append(gaussian(tokens, video_center))
        frame_sim.append(gaussian(tokens, tokens.mean(dim=0)))
    uniqueness = torch.stack([-v.mean() for v in video_sim])
    weights = torch.exp((uniqueness - uniqueness.max()) / 0.01)
    probs = weights / weights.sum()
    index, per_frame = [], []
    for f in range(num_frames):
        scale = min(1.0, float(r * (1 + probs[f] - probs.mean())))
        budget = max(1, int(torch.tensor(scale * n_tok).round()))
        local = torch.topk(video_sim[f] + frame_sim[f], budget, largest=False).indices.sort().values
        index += (local + f * n_tok).tolist()
        per_frame.append(budget)
    return index, per_frame
