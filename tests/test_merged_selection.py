"""A merging method's selection carries the merged values of its kept tokens (TokenSelection.values); every layout
places them where the kept tokens sit."""

import pytest
import torch

from llava.compression import NEWLINE_POSITIONS, TokenSelection, assemble_video_tokens, video_token_layout


@pytest.mark.parametrize("position", NEWLINE_POSITIONS)
def test_merged_values_replace_the_kept_tokens_in_every_layout(position):
    frames, h, w, dim = 3, 2, 3, 4
    features = torch.randn(frames, h * w, dim)
    index = torch.tensor([4, 0, 5, 8, 6, 15, 13])  # frames 0, 1, 2 in time order, each in its own order
    per_frame = torch.tensor([3, 2, 2])
    values = torch.randn(index.numel(), dim)
    newline = torch.randn(dim)
    merged = assemble_video_tokens(features, TokenSelection(index, per_frame, values), newline, position, (h, w))
    # Expected, token by token: the layout's source; a kept token's merged value comes from its place in `index`.
    source = video_token_layout(frames, h * w, TokenSelection(index, per_frame), position, (h, w))
    rows = [newline if s < 0 else values[index.tolist().index(s)] for s in source.tolist()]
    torch.testing.assert_close(merged.tokens, torch.stack(rows), rtol=0, atol=0)
    plain = assemble_video_tokens(features, TokenSelection(index, per_frame), newline, position, (h, w))
    assert torch.equal(merged.is_visual, plain.is_visual)
    assert not torch.equal(merged.tokens, plain.tokens)


def test_values_must_match_the_kept_tokens():
    with pytest.raises(ValueError, match=r"values must be a \(M, D\) tensor with M = 2 kept tokens"):
        TokenSelection(torch.tensor([0, 1]), torch.tensor([2]), torch.zeros(3, 4))
    selection = TokenSelection(torch.tensor([2, 0]), torch.tensor([2]), torch.ones(2, 4, dtype=torch.float64))
    features = torch.zeros(1, 3, 4)
    assert selection.kept_features(features).dtype == torch.float32
    assert torch.equal(TokenSelection(torch.tensor([2, 0]), torch.tensor([2])).kept_features(features), features[0, [2, 0]])
