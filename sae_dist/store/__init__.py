"""sae_dist.store: the zarr v3 activation store (layout, writer, shuffling reader, normalisation).

Layout and attributes: see `sae_dist.store.layout` and docs/formats.md#activation-store.
Importing this package registers the zarr "bfloat16" data type (backed by ml_dtypes).
"""

from sae_dist.store.errors import IncompleteStoreError, NonFiniteError, StoreError
from sae_dist.store.layout import (
    ACT_DTYPES,
    create_store,
    done_shards,
    finalize_store,
    mark_shard_done,
    merge_norm_stats,
    norm_stats_partial,
    open_store,
    read_attrs,
    write_block,
    write_store,
)

#: names of `sae_dist.store.reader`, imported on first use: the reader pulls in torch, writers stay light
_READER_NAMES = ("ActivationStore", "MODES", "denormalize", "normalize", "scalar_scale")


def __getattr__(name):
    if name in _READER_NAMES:
        from sae_dist.store import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'sae_dist.store' has no attribute {name!r}")


__all__ = [
    "ACT_DTYPES", "MODES", "ActivationStore", "IncompleteStoreError", "NonFiniteError", "StoreError",
    "create_store", "denormalize", "done_shards", "finalize_store", "mark_shard_done", "merge_norm_stats",
    "norm_stats_partial", "normalize", "open_store", "read_attrs", "scalar_scale", "write_block", "write_store",
]
