"""`LMStream` (sae-train source=lm): its windows hold exactly the rows a harvest of the same text stores,
each row once; dp ranks take alternate windows; the text restarts at its end; a resumed stream returns the
same batches as an uninterrupted one; bad arguments and foreign states are refused by name."""

import numpy as np
import pytest
import torch
from helpers.harvest import BODY, CTX, EVAL, HOOK, SMALL, read_store, run_harvest
from helpers.synthetic import tiny_corpus

from sae_dist.harvest.stream import LMStream
from sae_dist.harvest.text import packed_sequences
from sae_dist.store.reader import normalize

BATCH = 60  # rows per batch: a window of 8 sequences (120 rows) holds 2 batches


def _stream(lm, docs, **kw):
    model, tok = lm
    args = dict(model=model, tokenizer=tok, hook_name=HOOK, batch_tokens=BATCH,
                docs=None if docs is None else (lambda: docs), ctx_len=CTX,
                eval_fraction=EVAL, buffer_tokens=8 * BODY, lm_batch_size=3, dtype="float32", seed=3,
                normalize="none")
    args.update(kw)
    return LMStream(**args)


def _hidden_rows(lm, seqs) -> torch.Tensor:
    """Independent reference: the full forward's hidden state after block 1 at positions 1.., [n*BODY, d]."""
    model, _ = lm
    with torch.no_grad():
        hs = model(input_ids=torch.tensor(seqs), output_hidden_states=True).hidden_states[2]
    return hs[:, 1:, :].reshape(-1, hs.shape[-1])


def _sorted_rows(x: torch.Tensor) -> np.ndarray:
    a = x.double().numpy()
    return a[np.lexsort(a.T[::-1])]


@pytest.fixture(scope="module")
def docs():
    return tiny_corpus(**SMALL)


def test_windows_hold_the_harvested_rows_once_each(lm, docs, tmp_path):
    s = _stream(lm, docs)
    assert (s.window_sequences, s.window_rows, s.batches_per_window) == (8, 120, 2)
    batches = [next(s) for _ in range(6)]  # three windows
    s.close()
    seqs = list(packed_sequences(docs, lm[1], CTX, eval_fraction=EVAL))[:24]
    for w in range(3):
        got = torch.cat(batches[2 * w : 2 * w + 2])
        ref = _hidden_rows(lm, seqs[8 * w : 8 * w + 8])
        np.testing.assert_allclose(_sorted_rows(got), _sorted_rows(ref), rtol=1e-5, atol=1e-5)
        assert not torch.equal(got, ref)  # shuffled within the window
    # the same rows a float32 harvest of the same text stores (sequences 0..23)
    run_harvest(lm, tmp_path / "s.zarr", docs, tokens=24 * BODY, dtype="float32")
    arrays, _ = read_store(tmp_path / "s.zarr")
    np.testing.assert_allclose(_sorted_rows(torch.cat(batches)), _sorted_rows(torch.from_numpy(arrays["activations"])),
                               rtol=1e-5, atol=1e-5)


def test_dp_ranks_take_alternate_windows_and_batches_are_normalised(lm, docs):
    one = _stream(lm, docs)
    ref = [next(one) for _ in range(4)]  # windows 0 and 1
    one.close()
    for rank in (0, 1):
        s = _stream(lm, docs, dp_rank=rank, dp_size=2, batch_tokens=2 * BATCH, normalize="layer_norm")
        got = torch.cat([next(s), next(s)])  # its first window: window `rank` of the stream
        s.close()
        want = normalize(torch.cat(ref[2 * rank : 2 * rank + 2]), "layer_norm")[0]
        np.testing.assert_allclose(_sorted_rows(got), _sorted_rows(want), rtol=1e-5, atol=1e-5)


def test_the_text_starts_again_at_its_end(lm, docs):
    two_docs = [d[:800] for d in docs[:2]]
    n = len(list(packed_sequences(two_docs, lm[1], CTX, eval_fraction=EVAL)))
    assert 8 < n < 200
    s = _stream(lm, two_docs)
    windows = s._windows(0)
    seqs = [q for _ in range(n // 8 + 2) for q in next(windows)[1]]
    text = list(packed_sequences(two_docs, lm[1], CTX, eval_fraction=EVAL))
    assert seqs == (text * 3)[: len(seqs)]


def test_resume_returns_the_uninterrupted_batches(lm, docs):
    a = _stream(lm, docs)
    ref = [next(a) for _ in range(7)]
    a.close()
    b = _stream(lm, docs)
    for _ in range(3):
        next(b)
    state = b.state_dict()
    b.close()
    assert (state["batches"], state["window"], state["first_sequence"], state["batch_in_window"]) == (3, 1, 8, 1)
    c = _stream(lm, docs)
    c.load_state_dict(state)
    for want in ref[3:]:
        assert torch.equal(next(c), want)
    c.close()


def test_pretokenised_sequences_are_read_in_a_new_random_order_each_pass(lm, docs):
    """With random-access sequences the stream's position j holds sequence perm_e[j % n], perm_e the
    permutation of pass e = j // n (default_rng([seed, e, 0x5EC])); a window's rows are those sequences'
    hidden states; every sequence is read once per pass; a resumed stream in its second pass returns the
    uninterrupted batches; a state of the text order is refused."""
    seqs = list(packed_sequences(docs, lm[1], CTX, eval_fraction=EVAL))[:20]  # n = 20: 2.5 windows per pass
    s = _stream(lm, None, sequences=seqs)
    assert s.sequence_order == "shuffled"
    order = [int(i) for e in range(2) for i in np.random.default_rng([3, e, 0x5EC]).permutation(20)]
    windows = s._windows(0)
    read = [q for _ in range(5) for q in next(windows)[1]]  # 40 positions = two passes
    assert read == [seqs[i] for i in order] and sorted(order[:20]) == list(range(20)) and order[:20] != order[20:]
    batches = [next(s) for _ in range(8)]  # windows 0..3
    s.close()
    got = torch.cat(batches[2:4])  # window 1: positions 8..15
    np.testing.assert_allclose(_sorted_rows(got), _sorted_rows(_hidden_rows(lm, [seqs[i] for i in order[8:16]])),
                               rtol=1e-5, atol=1e-5)
    b = _stream(lm, None, sequences=seqs)
    for _ in range(5):
        next(b)
    state = b.state_dict()
    b.close()
    c = _stream(lm, None, sequences=seqs)
    c.load_state_dict(state)
    for want in batches[5:]:
        assert torch.equal(next(c), want)
    c.close()
    with pytest.raises(ValueError, match=r"sequence_order='text' .* sequence_order='shuffled' \(data.pretokenized"):
        _stream(lm, None, sequences=seqs).load_state_dict({**state, "version": 1, "sequence_order": "text"})


def test_bad_arguments_and_foreign_states_are_refused(lm, docs):
    with pytest.raises(ValueError, match="normalize=scalar"):
        _stream(lm, docs, normalize="scalar")
    with pytest.raises(ValueError, match="buffer_tokens=30 is below the batch of 60"):
        _stream(lm, docs, buffer_tokens=30)
    with pytest.raises(ValueError, match="exactly one of docs"):
        _stream(lm, docs, sequences=[[1] * CTX])
    state = _stream(lm, docs).state_dict()
    with pytest.raises(ValueError, match=r"window_sequences=8 .* window_sequences=16 \(stream.buffer_tokens\)"):
        _stream(lm, docs, buffer_tokens=16 * BODY).load_state_dict(state)
    with pytest.raises(ValueError, match="trained from an activation store"):
        _stream(lm, docs).load_state_dict({"epoch": 0, "batch": 3})


def test_the_lm_is_loaded_by_the_stream_from_its_structure(lm, docs, tiny_lm_dir):
    """With the LM's structure and load_lm, a stream with no share_group (it runs the LM) loads it once and serves
    the batches of a stream given the loaded LM; the structure alone is refused, and so is a hook it lacks or a
    loaded LM of another width, by name."""
    from sae_dist.harvest.lm import load_lm_structure

    structure, loads = load_lm_structure(tiny_lm_dir, dtype="float32"), []
    s = _stream(lm, docs, model=structure, tokenizer=None, load_lm=lambda: loads.append(1) or lm)
    ref = _stream(lm, docs)
    assert loads == [1] and s.model is lm[0] and s.spec.module is ref.spec.module
    got = [next(s) for _ in range(3)]
    s.close()  # one stream's producer thread at a time on the shared LM
    want = [next(ref) for _ in range(3)]
    ref.close()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="model has no weights"):
        _stream(lm, docs, model=structure, tokenizer=None)
    with pytest.raises(ValueError, match="'blocks.7.hook_resid_post': layer 7 out of range"):
        _stream(lm, docs, model=structure, tokenizer=None, load_lm=lambda: lm, hook_name="blocks.7.hook_resid_post")
    wide = load_lm_structure(tiny_lm_dir, dtype="float32")
    wide.config.hidden_size = 48
    with pytest.raises(ValueError, match="load_lm gave an LM of width 32 but its structure .* d_in=48"):
        _stream(lm, docs, model=wide, tokenizer=None, load_lm=lambda: lm)


def test_no_window_past_max_batches_is_computed(lm, docs, monkeypatch):
    computed = []
    real = LMStream.window_rows_of
    monkeypatch.setattr(LMStream, "window_rows_of", lambda self, w, *a: computed.append(w) or real(self, w, *a))
    s = _stream(lm, docs, max_batches=3)  # batches 0, 1 (window 0) and 2 (window 1)
    for _ in range(3):
        next(s)
    s._thread.join(timeout=30)
    assert not s._thread.is_alive() and computed == [0, 1]
    with pytest.raises(RuntimeError, match="no window after batch 4"):
        next(s), next(s)


def test_activations_beyond_the_buffer_dtype_are_refused_by_name(lm, docs, monkeypatch):
    """A bfloat16 activation above float16's largest value (65504) is finite in the LM but Inf in a float16
    buffer: the check runs after the cast and names the sequences, instead of an Inf reaching training."""
    import sae_dist.harvest.hooks as hooks
    from sae_dist.harvest.harvester import HarvestError

    real = hooks.run_to_hooks

    def loud(model, specs, ids):
        (a,) = real(model, specs, ids)
        a = a.to(torch.bfloat16)
        a[-1, 2, 0] = 70000.0  # the batch's last sequence, a position the stream keeps
        return [a]

    monkeypatch.setattr(hooks, "run_to_hooks", loud)
    seqs = list(packed_sequences(docs, lm[1], CTX, eval_fraction=EVAL))[:8]
    assert _stream(lm, docs, dtype="bfloat16").window_rows_of(0, seqs).isfinite().all()
    with pytest.raises(HarvestError, match=r"non-finite .* sequences \[0, 3\) \(window 0\) in torch.float16"):
        _stream(lm, docs, dtype="float16").window_rows_of(0, seqs)


def test_a_window_is_its_rows_in_the_seeded_order(lm, docs):
    """Window w holds the hooked rows of its sequences (positions 1.., sequence by sequence) permuted by
    `default_rng([seed, w]).permutation`: the order a resumed stream recomputes. Reference: the full
    forward's hidden states, concatenated, then indexed by that permutation."""
    seqs = list(packed_sequences(docs, lm[1], CTX, eval_fraction=EVAL))[8:16]
    s = _stream(lm, docs)
    got = s.window_rows_of(1, seqs)
    s.close()
    ref = _hidden_rows(lm, seqs)
    perm = torch.from_numpy(np.random.default_rng([3, 1]).permutation(len(ref)))
    torch.testing.assert_close(got, ref[perm], rtol=1e-5, atol=1e-5)
