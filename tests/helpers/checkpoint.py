"""What a written sae-train checkpoint holds, read back from its files (for tests of sae-plan's checkpoint size)."""

from __future__ import annotations

import math
from pathlib import Path


def checkpoint_on_disk(ck: Path) -> tuple[int, int, list[int]]:
    """(tensor bytes the checkpoint directory's .metadata records, bytes of all its files, bytes of each
    .distcp file: one per writing rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(ck)).read_metadata().state_dict_metadata
    tensors = sum(math.prod(m.size) * m.properties.dtype.itemsize for m in meta.values()
                  if isinstance(m, TensorStorageMetadata))
    files = [f.stat().st_size for f in Path(ck).iterdir() if f.is_file()]
    return tensors, sum(files), [f.stat().st_size for f in Path(ck).glob("*.distcp")]
