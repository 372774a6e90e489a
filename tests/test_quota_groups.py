"""A selection's quota groups (TokenSelection.groups: PruneVid's in-LLM stage keeps a share of each) follow the kept
tokens into the prompt (MultimodalInputs.video_groups) in every layout, numbered per row across its videos."""

import pytest
import torch

from llava.compression import TokenSelection
from llava.compression.prunevid import PruneVid
from tests.conftest import random_video
from tests.references import load, prompt


def test_groups_must_give_one_group_per_kept_token():
    with pytest.raises(ValueError, match=r"groups must be a \(2,\) torch.long tensor"):
        TokenSelection(torch.tensor([0, 1]), torch.tensor([2]), groups=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"groups must be a \(2,\) torch.long tensor"):
        TokenSelection(torch.tensor([0, 1]), torch.tensor([2]), groups=torch.tensor([0.0, 1.0]))


def test_groups_at_a_layout_source():
    selection = TokenSelection(torch.tensor([4, 0, 5]), torch.tensor([1, 2]), groups=torch.tensor([1, 0, 2]))
    source = torch.tensor([0, 4, -1, 5, -1])  # kept tokens in another order, newlines between them
    assert selection.groups_at(source, 6).tolist() == [0, 1, -1, 2, -1]
    ungrouped = TokenSelection(torch.tensor([4, 0, 5]), torch.tensor([1, 2]))
    assert ungrouped.groups_at(source, 6).tolist() == [0, 0, -1, 0, -1]


STAGE1 = {"prunevid_tau": 0.5, "prunevid_temporal_segment_ratio": 0.5, "prunevid_cluster_ratio": 0.5}


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "tiny_video_checkpoint"])  # one_token, grid newlines
@pytest.mark.parametrize("keep_positions", [False, True])
def test_the_prompt_carries_each_video_token_group(request, checkpoint, keep_positions):
    tokenizer, model = load(request.getfixturevalue(checkpoint), compressor="prunevid", prunevid_layer=1,
                            keep_positions=keep_positions, **STAGE1)
    size = model.get_vision_tower().image_size
    videos = [random_video(6, size, seed=1), random_video(4, size, seed=2)]
    ids = prompt(tokenizer, "<image>\nWhat changes between the two videos?")  # two videos in one row
    mm = model.build_multimodal_inputs(ids, None, None, videos, ["video", "video"], None)
    expected, first = [], 0
    for record in mm.videos:
        selection = record.selection
        # grid and keep_positions lay the kept tokens out in their original order, one_token in the selection's
        in_order = keep_positions or getattr(model.config, "mm_newline_position", "one_token") == "grid"
        order = selection.index.argsort() if in_order else torch.arange(selection.num_kept)
        expected += (selection.groups[order] + first).tolist()
        first += int(selection.groups.max()) + 1
    groups = mm.video_groups[0]
    assert groups[mm.video_token_mask[0]].tolist() == expected
    assert bool((groups[~mm.video_token_mask[0]] == -1).all())  # text and newlines belong to no group
    assert first > 4  # the selections have several groups each


def test_prunevid_selection_groups_are_its_segments_parts():
    """One segment of two identical frames: every position static, one group of static tokens (no dynamic part)."""
    frame = torch.randn(1, 9, 8)
    selection = PruneVid(tau=0.5, temporal_segment_ratio=0.5).select(torch.cat([frame, frame]))
    assert selection.groups.tolist() == [0] * selection.num_kept and selection.num_kept == 9
