"""FastVID (NeurIPS 2025): dynamic temporal segmentation, then density-based spatio-temporal pruning.

Behaviour follows the LLaVA-OneVision code path of the public FastVID code (LunarShen/FastVID, read at commit
a40a109cb8df20e8c2c17c6850f8269717369990): the ``FastVID`` block of ``Qwen2Model.forward`` in
``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py`` (DySeg, STPrune with ATS
and density scores, DTM), fed by ``encode_images`` / ``get_attn_2dPool`` in ``llava/model/llava_arch.py`` and
``SigLipVisionAbstract`` in ``llava/model/multimodal_encoder/siglip_encoder.py``. The public arguments
(``fastvid_retention_ratio``, ``fastvid_DySeg_c``, ``fastvid_DySeg_tau``, ``fastvid_STPrune_d``,
``fastvid_DTM_p``, ``fastvid_DTM_beta``) are this module's ``fastvid_*`` arguments, lower-cased.

Two inputs come from the vision encoder in the public code, not from the pooled tokens: each frame's global
feature (the SigLIP attention-pooling head's output, for the segmentation) and each token's saliency (that
head's probe attention over the patches, averaged over heads and bilinearly pooled to the token grid: see
:func:`fastvid_pool_saliency`). The head is SigLIP's own ``post_layernorm`` and ``head``, loaded from the
vision tower's checkpoint (LLaVA-OneVision drops both) and run on the tower's output patches, before the
projector: the LLaVA model does this when FastVID is on (:mod:`llava.model.pooling_head`, ``needs_pooling_head``).
:func:`fastvid_default_inputs` is a stand-in derived from the pooled tokens (the frame's mean token and the attention
of that mean over the frame's tokens) for experiments without the head; ``select`` never substitutes it silently.

The public lmms-eval arguments keep working under their own spelling (``fastvid_DySeg_c`` ... ``fastvid_DTM_beta``
are aliases of the lower-case names).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from .base import TokenSelection, VideoTokenCompressor, check_video_features
from .registry import Argument, Stages, register

__all__ = [
    "FastVID",
    "fastvid_context_counts",
    "fastvid_default_inputs",
    "fastvid_density_scores",
    "fastvid_pool_saliency",
    "fastvid_segments",
]

FASTVID_ARGUMENTS = (
    Argument("fastvid_retention_ratio", 0.10, "(0, 1]", "share of each frame's tokens kept (int(N * r) per frame)"),
    Argument("fastvid_dyseg_c", 8, "[1, inf)", "DySeg: at least this many segments (cuts at the c - 1 least similar "
             "transitions)", integer=True),
    Argument("fastvid_dyseg_tau", 0.9, "[-1, 1]", "DySeg: also cut where consecutive frames' global features have a "
             "cosine similarity below tau"),
    Argument("fastvid_stprune_d", 0.4, "[0, 1]", "STPrune: share of the kept tokens that are contextual (merged), "
             "the rest salient"),
    Argument("fastvid_dtm_p", 4, "[1, inf)", "DTM: one anchor frame every p frames of a segment", integer=True),
    Argument("fastvid_dtm_beta", 0.6, "[0, 1]", "DTM: lower bound of a contextual token's own weight in its merge"),
    Argument("fastvid_dyseg_ignore", 0.95, "[-1, 1]", "Qwen models only: within a segment, frames whose cosine "
             "similarity to the next is at least this add no tokens of their own (llava.compression.fastvid_qwen)"),
)
_ARGUMENTS = {argument.name: argument for argument in FASTVID_ARGUMENTS}
PUBLIC_NAMES = {  # the public code's lmms-eval model args
    "fastvid_DySeg_c": "fastvid_dyseg_c",
    "fastvid_DySeg_tau": "fastvid_dyseg_tau",
    "fastvid_STPrune_d": "fastvid_stprune_d",
    "fastvid_DTM_p": "fastvid_dtm_p",
    "fastvid_DTM_beta": "fastvid_dtm_beta",
    "fastvid_DySeg_ignore": "fastvid_dyseg_ignore",
}

_NEIGHBOURS = 4  # density = exp(-mean squared distance to the 4 nearest tokens, the token itself included)


def fastvid_segments(frame_global: torch.Tensor, c: int, tau: float) -> list[int]:
    """DySeg: the lengths of the video's segments, in time order, from (F, G) per-frame global features.

    A segment ends after frame i when the cosine similarity of frames i and i + 1 is among the c - 1 lowest
    (stable: the earlier transition wins a tie) or below ``tau``. Fewer than c frames: every frame is a segment
    (the public code's ``topk`` fails there).
    """
    g = F.normalize(frame_global.float(), dim=-1)
    similarity = (g[:-1] * g[1:]).sum(dim=-1)  # (F - 1,)
    lowest = similarity.argsort(stable=True)[: min(c - 1, similarity.numel())]
    cuts = sorted(set(lowest.tolist()) | set((similarity < tau).nonzero().flatten().tolist()))
    ends = cuts + [frame_global.shape[0] - 1]
    return [end - start for start, end in zip([-1] + cuts, ends)]


def fastvid_context_counts(segment_sizes: list[int], context_per_frame: int, p: int) -> list[int]:
    """The contextual (anchor) tokens each frame keeps, from the segment lengths.

    A segment of L frames has ``t = ceil(L / p)`` anchor frames: its last frame and every p-th frame before it.
    Each keeps ``(context_per_frame * L) // t`` tokens (the segment's share); the other frames keep none.
    """
    counts = []
    for length in segment_sizes:
        anchors = -(-length // p)
        share = context_per_frame * length // anchors
        counts += [share if (length - 1 - j) % p == 0 else 0 for j in range(length)]
    return counts


def fastvid_density_scores(tokens: torch.Tensor) -> torch.Tensor:
    """(F, M) density-peak score of each of a frame's M tokens (float32): ``density * distance to a denser token``.

    Distances are Euclidean (``torch.cdist``, as the public code) over sqrt(D); density = exp(-mean squared
    distance to the nearest 4 tokens, itself included); a token's distance to a denser token is to the nearest
    denser one, or the frame's largest distance for the densest. The public code breaks density ties with
    uniform noise of 1e-6; here the lower token index counts as denser, so exact duplicates still make one
    peak, deterministically.
    """
    num_tokens = tokens.shape[1]
    x = tokens.float()
    dist = torch.cdist(x, x) / math.sqrt(x.shape[-1])
    nearest = dist.topk(min(_NEIGHBOURS, num_tokens), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()  # (F, M)
    # denser[f, i, j]: token j is denser than token i.
    index = torch.arange(num_tokens, device=tokens.device)
    earlier = index[None, :] < index[:, None]
    denser = (density[:, None, :] > density[:, :, None]) | ((density[:, None, :] == density[:, :, None]) & earlier)
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    to_denser = torch.where(denser, dist, dist_max).min(dim=-1).values
    return to_denser * density


def fastvid_default_inputs(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins for the encoder's inputs: per-frame global features (F, D) and token saliency (F, N), float32.

    The global feature is the frame's mean token; the saliency is the attention of that mean over the frame's
    tokens, ``softmax(x . mean / sqrt(D))`` (attention pooling with the mean as the query, as the SigLIP head
    pools with its learned probe). Not the published inputs: see the module docstring.
    """
    x = features.float()
    mean = x.mean(dim=1)
    saliency = torch.softmax((x @ mean[:, :, None]).squeeze(-1) / math.sqrt(x.shape[-1]), dim=-1)
    return mean, saliency


def fastvid_pool_saliency(attention: torch.Tensor, pooled_hw: tuple[int, int]) -> torch.Tensor:
    """(F, h * w) saliency on the pooled token grid from the encoder's (F, P) attention over a square patch grid.

    As the public ``get_attn_2dPool``: bilinear interpolation (``align_corners=False``) of the sqrt(P) x sqrt(P)
    map to the pooled grid ``pooled_hw``, e.g. 27 x 27 -> 14 x 14 on LLaVA-OneVision.
    """
    num_frames, patches = attention.shape
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"attention must cover a square patch grid, got {patches} patches")
    grid = attention.float().reshape(num_frames, 1, side, side)
    return F.interpolate(grid, size=tuple(pooled_hw), mode="bilinear").reshape(num_frames, -1)


class FastVID(VideoTokenCompressor):
    """FastVID with retention ratio ``retention_ratio``: about that share of the video's tokens survive.

    With R = int(N * retention_ratio) tokens per frame, S = R - int(R * stprune_d) salient tokens and
    C = R - S contextual tokens:

    1. **DySeg** splits the video into segments (:func:`fastvid_segments`, ``dyseg_c`` and ``dyseg_tau``).
    2. **ATS**: every frame keeps its S most salient tokens, unchanged.
    3. **STPrune** on each frame's other N - S tokens: density-peak scores (:func:`fastvid_density_scores`).
       A segment's anchor frames (:func:`fastvid_context_counts`, ``dtm_p``) keep their top-scoring tokens as
       contextual tokens, the segment's whole context budget between them; the other frames keep only their
       salient tokens.
    4. **DTM**: a contextual token becomes ``w * itself + (1 - w) * mean of the tokens assigned to it``, with
       ``w = max(1 / (count + 1), dtm_beta)``; each non-salient token is assigned to its most cosine-similar
       contextual token (the first on a tie). An anchor frame of a multi-frame segment draws from the
       non-salient tokens of every frame of its segment; a single-frame segment from its own.

    Kept tokens come in original order with their merged values in ``values``; ``index`` is where each sits.
    Salient tokens are chosen with a stable sort (the lower index wins a tie), as are contextual tokens.
    ``retention_ratio = 1`` with ``stprune_d = 0`` keeps every token unchanged.

    Kept as in the public code: a frame of a multi-frame segment whose share equals C (e.g. C = 1, 3 frames,
    ``dtm_p`` = 2) is treated like a single-frame segment and the segment's other frames are not merged into
    anything; every anchor frame of a segment merges the whole segment, so a token may feed several anchors.
    Fixed: the public code fails with fewer frames than ``dyseg_c``, with fewer than 4 non-salient tokens, with
    no contextual tokens (C = 0), and when a frame's share exceeds its N - S non-salient tokens; here a share is
    capped at N - S and the others work as described. Scores and merges are computed in float32; ``values``
    come in the feature dtype.
    """

    name = "fastvid"
    needs_pooling_head = True

    def __init__(
        self,
        retention_ratio: float = 0.10,
        dyseg_c: int = 8,
        dyseg_tau: float = 0.9,
        stprune_d: float = 0.4,
        dtm_p: int = 4,
        dtm_beta: float = 0.6,
        dyseg_ignore: float = 0.95,
    ) -> None:
        self.retention_ratio = _ARGUMENTS["fastvid_retention_ratio"].check(retention_ratio)
        self.dyseg_c = _ARGUMENTS["fastvid_dyseg_c"].check(dyseg_c)
        self.dyseg_tau = _ARGUMENTS["fastvid_dyseg_tau"].check(dyseg_tau)
        self.stprune_d = _ARGUMENTS["fastvid_stprune_d"].check(stprune_d)
        self.dtm_p = _ARGUMENTS["fastvid_dtm_p"].check(dtm_p)
        self.dtm_beta = _ARGUMENTS["fastvid_dtm_beta"].check(dtm_beta)
        self.dyseg_ignore = _ARGUMENTS["fastvid_dyseg_ignore"].check(dyseg_ignore)  # the Qwen variant's only

    def qwen_variant(self):
        """The public code's Qwen2.5-VL FastVID with these arguments (:mod:`llava.compression.fastvid_qwen`): what
        transformers' Qwen VL models run, since they have no SigLIP pooling head."""
        from .fastvid_qwen import FastVIDQwen

        return FastVIDQwen(self.retention_ratio, self.dyseg_c, self.dyseg_tau, self.dyseg_ignore, self.stprune_d,
                           self.dtm_p, self.dtm_beta)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "retention_ratio": self.retention_ratio,
            "dyseg_c": self.dyseg_c,
            "dyseg_tau": self.dyseg_tau,
            "stprune_d": self.stprune_d,
            "dtm_p": self.dtm_p,
            "dtm_beta": self.dtm_beta,
        }

    def token_counts(self, tokens_per_frame: int) -> tuple[int, int]:
        """(S, C): salient and contextual tokens per frame, the public code's rounding."""
        retain = int(tokens_per_frame * self.retention_ratio)
        salient = retain - int(retain * self.stprune_d)
        return salient, retain - salient

    def select(
        self,
        features: torch.Tensor,
        grid_hw: tuple[int, int] | None = None,
        *,
        frame_global: torch.Tensor | None = None,
        saliency: torch.Tensor | None = None,
    ) -> TokenSelection:
        """Choose and merge the tokens to keep.

        Args:
            features: (F, N, D) pooled tokens of one video, frames in time order.
            grid_hw: (h, w) of each frame's token grid, checked against N (the selection does not use it).
            frame_global: (F, G) each frame's global feature for the segmentation (the SigLIP head's output).
            saliency: (F, N) each token's saliency (:func:`fastvid_pool_saliency` of the SigLIP head's attention).
        """
        num_frames, tokens_per_frame, dim = check_video_features(features)
        _check_grid(tokens_per_frame, grid_hw)
        if frame_global is None or saliency is None:
            raise ValueError(
                "compressor='fastvid' needs frame_global= and saliency=: the output and the attention of SigLIP's "
                "pooling head (the LLaVA model passes them; see llava.model.pooling_head), or "
                "fastvid_default_inputs(features) as an explicit stand-in."
            )
        _check_input("frame_global", frame_global, (num_frames, None))
        _check_input("saliency", saliency, (num_frames, tokens_per_frame))
        salient, context = self.token_counts(tokens_per_frame)
        if salient + context == 0:
            warnings.warn(
                f"fastvid_retention_ratio={self.retention_ratio} keeps int(r * {tokens_per_frame}) = 0 tokens per "
                "frame: the video reaches the language model empty. Use a larger fastvid_retention_ratio.",
                stacklevel=2,
            )
        device = features.device
        feats = features.float()
        segments = fastvid_segments(frame_global, self.dyseg_c, self.dyseg_tau)
        counts = fastvid_context_counts(segments, context, self.dtm_p)
        offset = torch.arange(num_frames, device=device)[:, None] * tokens_per_frame

        # ATS: the S most salient tokens of each frame, kept unchanged.
        salient_local = saliency.float().argsort(dim=-1, descending=True, stable=True)[:, :salient]  # (F, S)
        is_salient = torch.zeros(num_frames, tokens_per_frame, dtype=torch.bool, device=device)
        is_salient.scatter_(1, salient_local, True)
        index = [(salient_local + offset).flatten()]
        values = [_take(feats, salient_local).reshape(-1, dim)]

        # The other tokens of each frame, in spatial order, and their density-peak ranking.
        rest_local = torch.arange(tokens_per_frame, device=device).expand(num_frames, -1)[~is_salient]
        rest_local = rest_local.reshape(num_frames, tokens_per_frame - salient)  # (F, M)
        rest = _take(feats, rest_local)  # (F, M, D)
        if context > 0:  # then the frame has C <= N - S non-salient tokens
            ranked = fastvid_density_scores(rest).argsort(dim=-1, descending=True, stable=True)  # (F, M)

            # Frames whose share is exactly C merge their own tokens (single-frame segments, and the quirk above).
            own = torch.tensor([f for f, n in enumerate(counts) if n == context], dtype=torch.long, device=device)
            if own.numel():
                anchors = ranked[own, :context]
                index.append((rest_local[own].gather(1, anchors) + offset[own]).flatten())
                values.append(_merge(rest[own], _take(rest[own], anchors), self.dtm_beta).reshape(-1, dim))

            # Anchor frames of multi-frame segments merge every non-salient token of their segment.
            start = 0
            for length in segments:
                frames = [f for f in range(start, start + length) if counts[f] > context]
                if frames:
                    share = min(counts[start + length - 1], rest.shape[1])
                    frames = torch.tensor(frames, dtype=torch.long, device=device)
                    anchors = ranked[frames, :share]
                    pool = rest[start : start + length].reshape(1, -1, dim).expand(frames.numel(), -1, -1)
                    index.append((rest_local[frames].gather(1, anchors) + offset[frames]).flatten())
                    values.append(_merge(pool, _take(rest[frames], anchors), self.dtm_beta).reshape(-1, dim))
                start += length

        index = torch.cat(index)
        order = index.argsort()  # the public code's final sort: original order
        index = index[order]
        per_frame = torch.bincount(index // tokens_per_frame, minlength=num_frames)
        return TokenSelection(index=index, per_frame=per_frame, values=torch.cat(values)[order].to(features.dtype))


def _take(tokens: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """tokens[b, local[b, k]] for (B, M, D) tokens and (B, K) indices: (B, K, D)."""
    return tokens.gather(1, local[..., None].expand(-1, -1, tokens.shape[-1]))


def _merge(pool: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """DTM: (B, K, D) targets merged with the (B, P, D) pool tokens assigned to them (most cosine-similar)."""
    similarity = F.normalize(pool, dim=-1) @ F.normalize(targets, dim=-1).transpose(1, 2)  # (B, P, K)
    assign = F.one_hot(similarity.argmax(dim=-1), targets.shape[1]).to(pool.dtype)  # argmax: first on a tie
    count = assign.sum(dim=1)[..., None]  # (B, K, 1)
    weight = (1.0 / (count + 1.0)).clamp(min=beta)
    mean = (assign.transpose(1, 2) @ pool) / count.clamp(min=1.0)
    return weight * targets + (1.0 - weight) * mean


def _check_input(name: str, value: Any, shape: tuple) -> None:
    """A floating-point tensor of ``shape`` (None: any size), or a ValueError naming the input."""
    if not isinstance(value, torch.Tensor) or value.dim() != len(shape) or not value.is_floating_point() or any(
        want is not None and got != want for got, want in zip(value.shape, shape)
    ):
        want = ", ".join("any" if s is None else str(s) for s in shape)
        got = f"shape {tuple(value.shape)}, {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a floating-point tensor of shape ({want}), got {got}")


def _check_grid(tokens_per_frame: int, grid_hw: tuple[int, int] | None) -> None:
    if grid_hw is None:
        return
    if not isinstance(grid_hw, (tuple, list)) or len(grid_hw) != 2 or any(
        isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in grid_hw
    ):
        raise ValueError(f"grid_hw must be two positive ints (h, w), got {grid_hw!r}")
    if grid_hw[0] * grid_hw[1] != tokens_per_frame:
        raise ValueError(f"grid_hw {tuple(grid_hw)!r} gives {grid_hw[0] * grid_hw[1]} tokens per frame, "
                         f"but the features have {tokens_per_frame}")


@register(
    "fastvid",
    *FASTVID_ARGUMENTS,
    summary="FastVID: dynamic temporal segmentation, then per segment the salient tokens (SigLIP head's attention) "
            "plus density-peak contextual tokens merged over the segment",
    examples=({"fastvid_retention_ratio": 0.5, "fastvid_dyseg_c": 2, "fastvid_dtm_p": 2},
              {"fastvid_retention_ratio": 0.1, "fastvid_stprune_d": 0.6, "fastvid_dyseg_tau": 0.99}),
    aliases=PUBLIC_NAMES,
)
def build(settings) -> Stages:
    return Stages(video=FastVID(settings.fastvid_retention_ratio, settings.fastvid_dyseg_c, settings.fastvid_dyseg_tau,
                                settings.fastvid_stprune_d, settings.fastvid_dtm_p, settings.fastvid_dtm_beta,
                                dyseg_ignore=settings.fastvid_dyseg_ignore))
