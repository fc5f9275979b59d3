"""Exceptions raised by the activation store (`sae_dist.store`).

Every message names the place (store path, shard index / file, token row range) and the fix.
"""


class StoreError(RuntimeError):
    """An activation store is missing, invalid, corrupt, or does not match what the caller asked for."""


class IncompleteStoreError(StoreError):
    """The store's harvest is unfinished (`harvest.complete` is false)."""


class NonFiniteError(StoreError):
    """Activations contain NaN or Inf; the message names the token rows."""


__all__ = ["StoreError", "IncompleteStoreError", "NonFiniteError"]
