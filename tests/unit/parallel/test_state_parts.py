"""`sae_dist.parallel.state.row_major_boxes`, which cuts a rank's contiguous range of a flattened tensor into
the boxes a checkpoint saves (`RankPart`), against a brute-force reference; a RankPart outside a distributed
run is refused. The checkpoints themselves: tests/integration/train/test_deepspeed_engine_gloo.py."""

import math

import pytest
import torch

from sae_dist.parallel.mesh import ParallelContext
from sae_dist.parallel.state import RankPart, global_view, row_major_boxes


@pytest.mark.parametrize("shape", [(7,), (1, 9), (5, 1), (4, 6), (6, 5)])
def test_boxes_cover_exactly_the_range(shape):
    n = math.prod(shape)
    flat_ids = torch.arange(n).view(shape)
    for start in range(n + 1):
        for numel in range(n - start + 1):
            boxes = row_major_boxes(start, numel, shape)
            assert len(boxes) <= (1 if len(shape) == 1 else 3)
            got, pos = [], 0
            for off, size, at in boxes:
                assert at == pos and all(s > 0 for s in size)
                box = flat_ids[tuple(slice(o, o + s) for o, s in zip(off, size, strict=True))]
                got += box.flatten().tolist()  # row-major inside the box = the range's order
                pos += box.numel()
            assert got == list(range(start, start + numel)), (shape, start, numel, boxes)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\) is not 1-D or 2-D"):
        row_major_boxes(0, 5, (2, 3, 4))
    part = RankPart(torch.zeros(3), 2, (2, 3))
    with pytest.raises(ValueError, match="a RankPart needs a distributed run"):
        global_view(part, 1, ParallelContext(device=torch.device("cpu")))
