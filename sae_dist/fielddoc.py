"""`option(default, doc)`: a dataclass field with a one-line doc (`metadata["doc"]`).

The configuration dataclasses (sae_dist.config) declare every option this way, so that its default,
type and doc live in one place; `sae-train --help-config` prints them (sae_dist.config.describe).
Light on purpose (no Hydra import): the dataclasses that use it are imported by library code too.
"""

from __future__ import annotations

import copy
import dataclasses

__all__ = ["option", "field_doc", "field_default"]


def option(default=dataclasses.MISSING, doc: str = "", **kwargs):
    """dataclasses.field with `doc` in its metadata; a list / dict / dataclass default is copied per instance."""
    if isinstance(default, (list, dict)) or (dataclasses.is_dataclass(default) and not isinstance(default, type)):
        value = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata={"doc": doc}, **kwargs)
    return dataclasses.field(default=default, metadata={"doc": doc}, **kwargs)


def field_doc(f: dataclasses.Field) -> str:
    """The one-line doc of a dataclass field ('' when it has none)."""
    return str(f.metadata.get("doc", ""))


def field_default(cls, name: str):
    """The default of dataclass `cls`'s field `name` (for code that mirrors an option, so the default lives
    in one place). Raises KeyError naming the field when `cls` has none of that name or it has no plain default."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.default is not dataclasses.MISSING:
            return f.default
    raise KeyError(f"{cls.__name__} has no field {name!r} with a plain default")
