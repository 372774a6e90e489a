"""Plain reference implementations the compressed models are checked against, and the helpers to run them.

Each reference states its method's rule in the most direct way, on an unmodified model with eager attention: hooks
read eager attention's probabilities and hide tokens with the additive attention mask. Hiding a key with the mask
while keeping every position id gives the same result as removing it (what the optimised code does), so equal
logits prove both the selection and the bookkeeping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CompileConfig

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


def _hook(model, layer: int, read, hide) -> list:
    """``read`` after layer ``layer - 1``'s attention (its output: output, probabilities), ``hide`` before the
    attention of every later layer (it may replace the attention mask)."""
    layers = model.get_model().layers
    handles = [layers[layer - 1].self_attn.register_forward_hook(read)]
    handles += [later.self_attn.register_forward_pre_hook(hide, with_kwargs=True) for later in layers[layer:]]
    return handles


class _Hooked:
    handles: list

    def remove(self):
        for handle in self.handles:
            handle.remove()


class MaskedDyCoke(_Hooked):
    """DyCoke's KV pruning rule on an eager model (batch 1), with hooks.

    Layer L-1's eager attention probabilities of the decoding query, averaged over heads and read at the video
    positions, decide the active set (top int(n * (1 - p)); recomputed at the first step and when the cosine with the
    previous step's is below the threshold); layers >= L get the inactive video tokens hidden by the additive mask.
    ``public_quirks``: the prunable span leaves out the last video token, and steps that keep the set hide nothing.
    """

    def __init__(self, model, positions, layer: int, ratio: float, threshold: float = 0.9, public_quirks=False):
        self.positions = positions[:-1] if public_quirks else positions
        self.keep = int(len(self.positions) * (1 - ratio))
        self.threshold, self.public_quirks = threshold, public_quirks
        self.active = self.previous = None
        self.recomputed: list[bool] = []
        self.margins: list[float] = []  # a selection is well defined when no margin is within rounding
        self.hide_now = True
        self.handles = _hook(model, layer, read=self.decide, hide=self.hide)

    def decide(self, module, args, output):
        weights = output[1]  # eager: (batch, heads, queries, keys)
        if weights.shape[2] != 1:
            return  # the prefill is exact
        attention = weights[0].mean(dim=0)[-1][self.positions]
        recompute = self.previous is None or F.cosine_similarity(attention, self.previous, dim=0) < self.threshold
        if recompute:
            self.active = self.positions[attention.topk(self.keep).indices]
            ranked = attention.sort(descending=True).values
            if self.keep < len(ranked):  # how far the last kept token is from the first dropped one
                self.margins.append(float(ranked[self.keep - 1] - ranked[self.keep]))
        self.recomputed.append(bool(recompute))
        self.hide_now = bool(recompute) or not self.public_quirks
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
    mask (their position ids unchanged)."""

    def __init__(self, model, positions, layer: int, ratio: float):
        self.positions = positions
        self.keep = round(len(self.positions) * (1 - ratio))
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
