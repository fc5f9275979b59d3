"""SAE paths on the Hugging Face hub: ``hf://ORG/REPO[/SUBFOLDER][@REVISION]``.

`resolve_sae_path` turns such a path into a local directory through `huggingface_hub.snapshot_download`
(only the files under SUBFOLDER; its cache, revisions and offline mode: with ``HF_HUB_OFFLINE=1`` only the
cache is read). Every command and function that takes an SAE directory (`sae_dist.load_sae`, `sae-eval
sae_path=`, `sae-browse sae_path=`) accepts one.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HF_PREFIX", "parse_hf_path", "resolve_sae_path"]

HF_PREFIX = "hf://"


def parse_hf_path(path: str) -> tuple[str, str, str | None]:
    """(repo_id, subfolder ("" for the repository's root), revision or None) of ``hf://ORG/REPO[/SUB][@REV]``.
    ValueError naming the path when it has no ORG/REPO."""
    spec, at, revision = path.removeprefix(HF_PREFIX).partition("@")
    parts = [p for p in spec.split("/") if p]
    if len(parts) < 2 or (at and not revision):
        raise ValueError(f"{path!r}: a hub SAE path is hf://ORG/REPO[/SUBFOLDER][@REVISION], "
                         "e.g. hf://jbloom/GPT2-Small-SAEs-Reformatted/blocks.8.hook_resid_pre")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def resolve_sae_path(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory for the SAE at `path`: `path` itself, or for an ``hf://`` path the folder that
    `huggingface_hub.snapshot_download` returns (files under the subfolder only; `cache_dir`: the hub
    cache, default huggingface_hub's). Errors are huggingface_hub's (e.g. offline without a cached copy)."""
    s = os.fspath(path)
    if not s.startswith(HF_PREFIX):
        return Path(s)
    from huggingface_hub import snapshot_download

    repo_id, sub, revision = parse_hf_path(s)
    local = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                              allow_patterns=[f"{sub}/*"] if sub else None)
    return Path(local, sub) if sub else Path(local)
