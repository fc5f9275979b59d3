"""The harvester's background shard writer on the tiny LM + tiny corpus: shard writes run in another thread
while the LM fills the next shard, and the store's bytes are those of the LM run directly; a failed write
is raised by `harvest`, leaves its shard unmarked and is redone by the rerun; an error in the LM loop waits
for the shard being written, which keeps its marker. Each test blocks a write until the main thread has
gone on (with a 30 s guard), which a harvest that writes in its own thread never does."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers.harvest import BODY, CTX, EVAL, HOOK, SMALL, assert_same_store, read_store, run_harvest
from helpers.synthetic import tiny_corpus

import sae_dist.harvest.harvester as harvester
import sae_dist.store as store
from sae_dist.harvest import HarvestError, packed_sequences, run_to_hooks, splice_hook
from sae_dist.harvest.harvester import shard_row_permutation
from sae_dist.store import done_shards

N_SEQS = 40  # shards of 16, 16 and 8 sequences (run_harvest: seqs_per_shard=16, batches of 5)
GUARD_S = 30.0  # how long a blocked write waits for the main thread before the test fails


class _Forwards:
    """Counts the LM's forwards (at the embedding) in `n`; `event` is set when forward number `at` starts."""

    def __init__(self, model, at: int):
        self.n, self.at, self.event = 0, at, threading.Event()
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, *_a) -> None:
        self.n += 1
        if self.n == self.at:
            self.event.set()

    def remove(self) -> None:
        self._handle.remove()


def _reference(lm, hooks: list[str]) -> dict[str, np.ndarray]:
    """{hook: float32 [N_SEQS * BODY, d]}: the LM run directly on each shard's sequences in batches of 5 (as the
    harvest batches them), positions 1.., each shard's rows in the order shard_row_permutation gives."""
    model, tok = lm
    seqs = list(packed_sequences(tiny_corpus(**SMALL), tok, CTX, eval_fraction=EVAL, split="train"))[:N_SEQS]
    out = {h: [] for h in hooks}
    for lo in range(0, N_SEQS, 16):
        shard = {h: [] for h in hooks}
        for b in range(lo, min(lo + 16, N_SEQS), 5):
            with torch.inference_mode():
                acts = run_to_hooks(model, hooks, torch.tensor(seqs[b : min(b + 5, lo + 16, N_SEQS)]))
            for h, a in zip(hooks, acts, strict=True):
                shard[h].append(a[:, 1:].reshape(-1, a.shape[-1]).numpy())
        for h in hooks:
            rows = np.concatenate(shard[h])
            out[h].append(rows[shard_row_permutation(lo // 16, len(rows))])
    return {h: np.concatenate(v) for h, v in out.items()}


def test_shard_writes_run_beside_the_next_shards_forwards_and_the_store_is_unchanged(lm, tmp_path, monkeypatch):
    """Two hooks, three shards: shard 0's first write_block blocks until the LM starts shard 1 (forward 5), so
    the harvest only finishes if writing runs beside the LM. Every write and marker is made outside the main
    thread, in shard order, each store's shard written before it is marked; the stores hold exactly the rows
    of the LM run directly (same batches, shard_row_permutation order) and numpy's norm statistics."""
    model, _ = lm
    hooks = [HOOK, "blocks.0.hook_mlp_out"]
    shard1 = _Forwards(model, at=5)
    events, real_write, real_mark = [], store.write_block, store.mark_shard_done

    def write_block(group, start, acts, **kw):
        if not events:
            assert shard1.event.wait(GUARD_S), "the LM did not start shard 1 while shard 0 was being written"
        real_write(group, start, acts, **kw)
        events.append(("write", group.store.root.name, start // (16 * BODY), threading.current_thread()))

    def mark_shard_done(path, shard, info):
        real_mark(path, shard, info)
        events.append(("mark", path.rsplit("/", 1)[-1], shard, threading.current_thread()))

    monkeypatch.setattr(store, "write_block", write_block)
    monkeypatch.setattr(store, "mark_shard_done", mark_shard_done)
    try:
        out = run_harvest(lm, tmp_path / "s", tiny_corpus(**SMALL), N_SEQS * BODY, hook_name=hooks, dtype="float32")
    finally:
        shard1.remove()
    assert out["complete"] and out["tokens_written"] == N_SEQS * BODY and out["shards_written"] == 3
    assert [e[:3] for e in events] == [(kind, h, s) for s in range(3) for h in hooks for kind in ("write", "mark")]
    assert all(e[3] is not threading.main_thread() for e in events)
    for h, ref in _reference(lm, hooks).items():
        arrays, attrs = read_store(tmp_path / "s" / h, text_order=False)
        np.testing.assert_array_equal(arrays["activations"], ref)  # bit for bit
        norms = np.linalg.norm(ref.astype(np.float64), axis=1)
        np.testing.assert_allclose(attrs["norm_stats"]["mean_norm"], norms.mean(), rtol=1e-12)
        np.testing.assert_allclose(attrs["norm_stats"]["mean_sq_norm"], (norms**2).mean(), rtol=1e-12)
        assert attrs["norm_stats"]["n"] == N_SEQS * BODY and attrs["harvest"]["complete"] is True


@pytest.mark.parametrize("bad_shard", [1, 2])
def test_a_failed_shard_write_is_raised_by_harvest_and_the_rerun_redoes_it(lm, tmp_path, monkeypatch, bad_shard):
    """write_block fails in shard 1 (raised at the next shard) or in the last shard 2 (raised at the end): the
    caller gets the writer thread's exception, the shards before it are marked, it and later ones are not, and
    the rerun writes exactly those, giving the store of an undisturbed harvest."""
    docs, tokens = tiny_corpus(**SMALL), N_SEQS * BODY
    failed_in, real_write = [], store.write_block

    def write_block(group, start, acts, **kw):
        if start == bad_shard * 16 * BODY:
            failed_in.append(threading.current_thread())
            raise OSError(f"injected: no space left on device writing shard {bad_shard}")
        real_write(group, start, acts, **kw)

    monkeypatch.setattr(store, "write_block", write_block)
    with pytest.raises(OSError, match=f"injected: no space left on device writing shard {bad_shard}"):
        run_harvest(lm, tmp_path / "s", docs, tokens)
    assert len(failed_in) == 1 and failed_in[0] is not threading.main_thread()
    assert sorted(done_shards(tmp_path / "s")) == list(range(bad_shard))
    monkeypatch.undo()
    again = run_harvest(lm, tmp_path / "s", docs, tokens)
    assert again["complete"] and again["shards_written"] == 3 - bad_shard
    assert again["tokens_written"] == tokens - bad_shard * 16 * BODY
    run_harvest(lm, tmp_path / "clean", docs, tokens)
    assert_same_store(tmp_path / "s", tmp_path / "clean")


def test_an_lm_error_waits_for_the_shard_being_written(lm, tmp_path, monkeypatch):
    """Shard 1's second batch (forward 6: sequences 21..25) turns non-finite; shard 0's write blocks until that
    HarvestError is made, so it is still being written when the LM loop fails. The error names that batch
    (found once per shard, after the batches that follow it), and harvest returns only after shard 0 is
    written and marked; the rerun does shards 1 and 2 and equals an undisturbed harvest."""
    model, _ = lm
    docs, tokens = tiny_corpus(**SMALL), N_SEQS * BODY
    failing = threading.Event()

    class SignalledError(HarvestError):
        def __init__(self, *args):
            super().__init__(*args)
            failing.set()

    real_write = store.write_block

    def write_block(group, start, acts, **kw):
        if start == 0:
            assert failing.wait(GUARD_S), "the LM loop did not go on while shard 0 was being written"
        real_write(group, start, acts, **kw)

    monkeypatch.setattr(store, "write_block", write_block)
    monkeypatch.setattr(harvester, "HarvestError", SignalledError)
    sixth = _Forwards(model, at=6)
    try:
        with splice_hook(model, "blocks.0.hook_mlp_out", lambda a: a * float("nan") if sixth.n == 6 else a):
            with pytest.raises(HarvestError, match=r"non-finite .* sequences \[21, 22, 23, 24, 25\] "
                                                   r"\(bad: \[21, 22, 23, 24, 25\]\)"):
                run_harvest(lm, tmp_path / "s", docs, tokens)
    finally:
        sixth.remove()
    assert sixth.n == 8  # shard 1 ran to its end (forwards 5..8) before its flags were read
    assert sorted(done_shards(tmp_path / "s")) == [0]
    monkeypatch.undo()
    again = run_harvest(lm, tmp_path / "s", docs, tokens)
    assert again["complete"] and again["shards_written"] == 2
    run_harvest(lm, tmp_path / "clean", docs, tokens)
    assert_same_store(tmp_path / "s", tmp_path / "clean")
