"""What the multi-process tests (tests/integration/parallel/, tests/integration/train/) and the in-process
tests of the latent sharding (tests/unit/parallel/) share: the TopK SAE's parameter names, a free TCP
port for a gloo rendezvous, the shard of a full SAE tensor that a tensor-parallel rank holds, and a
prefix for assert_close's mismatch report."""

from __future__ import annotations

import socket

import torch

#: the TopK SAE's parameters, which a tensor-parallel rank holds shards of (`tp_shard`)
NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tp_shard(t: torch.Tensor, name: str, lo: int, hi: int) -> torch.Tensor:
    """Latents lo:hi of the full SAE tensor `name` (W_enc's columns, b_enc's entries, W_dec's rows;
    b_dec is replicated)."""
    return {"W_enc": lambda: t[:, lo:hi], "b_enc": lambda: t[lo:hi], "W_dec": lambda: t[lo:hi],
            "b_dec": lambda: t}[name]()


def prefixed(prefix: str, report: str) -> str:
    """assert_close `msg` callable (bound with partial): `prefix` before torch's mismatch report."""
    return f"{prefix}: {report}"
