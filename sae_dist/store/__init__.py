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
    write_block,
    write_store,
)
from sae_dist.store.normalize import MODES, denormalize, normalize, scalar_scale


def __getattr__(name):
    # The reader pulls in torch; import it lazily so writers stay light.
    if name == "ActivationStore":
        from sae_dist.store.reader import ActivationStore

        return ActivationStore
    raise AttributeError(f"module 'sae_dist.store' has no attribute {name!r}")


__all__ = [
    "ACT_DTYPES", "MODES", "ActivationStore", "IncompleteStoreError", "NonFiniteError", "StoreError",
    "create_store", "denormalize", "done_shards", "finalize_store", "mark_shard_done", "merge_norm_stats",
    "norm_stats_partial", "normalize", "open_store", "scalar_scale", "write_block", "write_store",
]
