"""Pretokenised text: `pretokenize` (datasets.map over 1 or 2 processes) gives exactly the packed train
sequences of the text; a harvest from them holds the rows of a harvest from the text (by default with the
sequences spread over the shards by a global permutation), reads only its own shards' sequences (also when
resumed) and never tokenises."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from helpers.harvest import BODY, CTX, EVAL, assert_same_store, read_store, run_harvest
from helpers.synthetic import tiny_corpus

from sae_dist.harvest import packed_sequences
from sae_dist.harvest.harvester import sequence_order
from sae_dist.harvest.pretokenize import PretokenizedSequences, pretokenize

DOCS = dict(n_files=4, max_chars=4000)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """tiny_corpus(**DOCS) as a JSON-lines file, with an empty document in the middle."""
    docs = tiny_corpus(**DOCS)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    rows = [{"text": d} for d in docs[:2]] + [{"text": ""}] + [{"text": d} for d in docs[2:]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pretokenize(lm, corpus_file, out, **kw):
    return pretokenize(dataset="json", data_files=corpus_file, tokenizer=lm[1], out_dir=out, ctx_len=CTX,
                       eval_fraction=EVAL, progress=False, **kw)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_pretokenized_sequences_are_the_packed_text(lm, corpus_file, tmp_path, num_proc):
    info = _pretokenize(lm, corpus_file, tmp_path / "p", num_proc=num_proc)
    want = list(packed_sequences(tiny_corpus(**DOCS), lm[1], CTX, eval_fraction=EVAL, split="train"))
    seqs = PretokenizedSequences(tmp_path / "p", ctx_len=CTX, eval_fraction=EVAL)
    assert len(want) > 40 and len(seqs) == info["n_seqs"] == len(want) and info["n_documents"] == 5
    assert [seqs[i] for i in range(len(seqs))] == want
    with pytest.raises(FileExistsError):
        _pretokenize(lm, corpus_file, tmp_path / "p")
    with pytest.raises(ValueError, match="pretokenised with ctx_len=16, but this harvest uses data.ctx_len=32"):
        PretokenizedSequences(tmp_path / "p", ctx_len=32, eval_fraction=EVAL)
    short = _pretokenize(lm, corpus_file, tmp_path / "short", max_sequences=7)
    assert short["n_seqs"] == 7


class _Recording:
    """PretokenizedSequences that records the indices read."""

    def __init__(self, seqs):
        self.seqs, self.read = seqs, []

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        self.read.append(i)
        return self.seqs[i]


@pytest.mark.parametrize("row_order", ["shuffled_in_shard", None])
def test_harvest_from_pretokenized_equals_harvest_from_text(lm, corpus_file, tmp_path, row_order):
    """Shards of 16 sequences; rank 0 of 2 reads shards 0 and 2 only; with shard 2's marker removed the
    rerun reads shard 2 only; rank 1 finishes; the store holds the rows of the one harvested from the text,
    also when the token budget is more than the text holds (the last shards short / empty). No tokenizer is
    used. The default order for pretokenised sequences is shuffled_global: shard s holds the sequences at
    positions [16 s, 16 s + 16) of sequence_order(n), which a rank reads in that order."""
    _pretokenize(lm, corpus_file, tmp_path / "p", num_proc=2)
    seqs = PretokenizedSequences(tmp_path / "p", ctx_len=CTX, eval_fraction=EVAL)
    model = lm[0]
    for tokens in (40 * BODY, (len(seqs) + 20) * BODY):
        out = tmp_path / f"pre{tokens}"
        rec = _Recording(seqs)
        n = min(len(seqs), tokens // BODY)
        order = sequence_order(n) if row_order is None else np.arange(n)
        r0 = run_harvest((model, None), out, None, tokens, sequences=rec, rank=0, world_size=2, row_order=row_order)
        assert not r0["complete"] and rec.read == [order[p] for p in range(n) if (p // 16) % 2 == 0]
        (out / "_progress" / "shard_00000002.json").unlink()
        rec.read.clear()
        run_harvest((model, None), out, None, tokens, sequences=rec, rank=0, world_size=2, row_order=row_order)
        assert rec.read == list(order[32:48])
        r1 = run_harvest((model, None), out, None, tokens, sequences=rec, rank=1, world_size=2, row_order=row_order)
        assert r1["complete"]
        (arrays, attrs), shard_seqs = read_store(out, text_order=False), 16 * BODY
        assert attrs["row_order"] == (row_order or "shuffled_global")
        for s in range(-(-n // 16)):  # each shard holds its sequences (every row of each)
            got = np.bincount(arrays["seq_index"][s * shard_seqs:(s + 1) * shard_seqs], minlength=n)
            np.testing.assert_array_equal(np.flatnonzero(got), np.sort(order[16 * s:16 * s + 16]))
            assert set(got[got > 0]) == {BODY}
        run_harvest(lm, tmp_path / f"text{tokens}", tiny_corpus(**DOCS), tokens)
        _set_row_order(out, "shuffled_in_shard")
        assert_same_store(out, tmp_path / f"text{tokens}")


def _set_row_order(path, row_order: str) -> None:
    """Rewrite a store's row_order attribute (to compare its rows and other attributes with another store's)."""
    g = zarr.open_group(str(path), mode="r+")
    g.attrs["row_order"] = row_order


def test_sae_pretokenize_then_sae_harvest_equals_sae_harvest(tiny_lm_dir, corpus_file, tmp_path, console_script):
    """The command lines: `sae-pretokenize data.num_proc=2`, then `sae-harvest data.pretokenized=DIR`, write
    the rows of the store that `sae-harvest` from the text writes (in the global order); a pretokenised
    directory of another ctx_len is refused."""
    common = [f"model.name={tiny_lm_dir}", "device=cpu", "data.dataset=json", f"data.data_files={corpus_file}",
              f"data.ctx_len={CTX}", f"data.eval_fraction={EVAL}", "harvest.tokens=600", "harvest.seqs_per_chunk=4",
              "harvest.seqs_per_shard=16", "harvest.batch_size=5", "harvest.dtype=float32"]
    pre = tmp_path / "pre"
    proc = console_script("sae-pretokenize", *common, f"run_dir={tmp_path / 'p'}", f"data.pretokenized={pre}",
                          "data.num_proc=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((pre / "sae_dist_pretokenized.json").read_text())["n_seqs"] > 40
    for name, extra in (("a", [f"data.pretokenized={pre}"]), ("b", [])):
        proc = console_script("sae-harvest", *common, f"run_dir={tmp_path / name}", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert zarr.open_group(str(tmp_path / "a" / "activations.zarr")).attrs["row_order"] == "shuffled_global"
    _set_row_order(tmp_path / "a" / "activations.zarr", "shuffled_in_shard")
    assert_same_store(tmp_path / "a" / "activations.zarr", tmp_path / "b" / "activations.zarr")
    proc = console_script("sae-harvest", *[c for c in common if not c.startswith("data.ctx_len")], "data.ctx_len=32",
                          f"run_dir={tmp_path / 'c'}", f"data.pretokenized={pre}")
    assert proc.returncode != 0 and "pretokenised with ctx_len=16" in proc.stderr + proc.stdout


def test_a_store_started_with_other_defaults_resumes_with_its_own(lm, tmp_path):
    """A harvest from pretokenised sequences left unfinished under the earlier release's defaults (rows
    shuffled_in_shard, chunks of 16 sequences here, of 64 then) and rerun without harvest.row_order /
    harvest.seqs_per_chunk (today's defaults: shuffled_global, 8) keeps the store's order and chunks: it
    ends as the uninterrupted harvest with those settings, and rerunning it then is a no-op. A given value
    that contradicts the store's is an error naming both."""
    from sae_dist.store.errors import StoreError
    from sae_dist.store.layout import chunk_grid

    seqs = list(packed_sequences(tiny_corpus(**DOCS), lm[1], CTX, eval_fraction=EVAL, split="train"))
    tokens, old = 40 * BODY, dict(row_order="shuffled_in_shard", seqs_per_chunk=16)  # shards of 16, 16, 8
    run_harvest(lm, tmp_path / "whole", None, tokens, sequences=seqs, **old)
    out = tmp_path / "resumed"
    assert not run_harvest(lm, out, None, tokens, sequences=seqs, rank=0, world_size=2, **old)["complete"]
    for given, msg in (({"row_order": "shuffled_global"}, "row_order: store has 'shuffled_in_shard', requested "
                                                          "'shuffled_global'"),
                       ({"seqs_per_chunk": 8}, "seqs_per_chunk: store has 16, requested 8")):
        with pytest.raises(StoreError, match=msg):
            run_harvest(lm, out, None, tokens, sequences=seqs, **given)
    r = run_harvest(lm, out, None, tokens, sequences=seqs, row_order=None, seqs_per_chunk=None)
    assert r["complete"] and r["shards_written"] == 1
    assert_same_store(out, tmp_path / "whole")
    assert chunk_grid(zarr.open_group(str(out), mode="r")["activations"])[0] == 16 * BODY
    assert run_harvest(lm, out, None, tokens, sequences=seqs, row_order=None, seqs_per_chunk=None)["already_complete"]
