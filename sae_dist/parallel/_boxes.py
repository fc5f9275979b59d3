"""`Boxes`: the local data of a DTensor that a rank holds as a few disjoint boxes at global offsets
(`sae_dist.parallel.state.RankPart`), for torch.distributed.checkpoint. Imported only when one is
built, so a single-process run never imports torch's private shards wrapper."""

from __future__ import annotations

from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper

__all__ = ["Boxes"]


class Boxes(LocalShardsWrapper):
    """torch's `LocalShardsWrapper` (the boxes and their global offsets, saved and loaded in place by DCP),
    plus a rank that holds none of the tensor: no chunk to save and none to load."""

    def __create_chunk_list__(self):
        return [] if not self._local_shards else super().__create_chunk_list__()
