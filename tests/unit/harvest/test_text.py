"""Text pipeline: stdlib corpus through HF datasets, stable eval split, packing into ctx_len sequences."""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from pathlib import Path

import pytest
from helpers.synthetic import make_tiny_lm, tiny_corpus
from transformers import AutoTokenizer

from sae_dist.harvest.text import (
    is_eval_document,
    iter_documents,
    packed_sequences,
    stdlib_corpus_files,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tiny_lm(tmp_path_factory.mktemp("tiny_lm")))


def test_stdlib_corpus_files():
    files = stdlib_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert files == sorted(files) and len(files) > 500
    assert all(f.endswith(".py") and Path(f).is_file() for f in files)
    assert not any("site-packages" in Path(f).parts for f in files)
    assert str(root / "os.py") in files
    assert str(root / "json" / "decoder.py") in files  # recursive
    # independent listing with os.walk
    import os

    ref = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages")]
        ref += [os.path.join(d, n) for n in names if n.endswith(".py")]
    assert files == sorted(ref)


def test_iter_documents_stdlib_reads_files_in_order():
    files = [f for f in stdlib_corpus_files() if Path(f).stat().st_size > 0]
    it = iter_documents("stdlib")
    for f in files[:5]:
        assert next(it) == Path(f).read_text(encoding="utf-8", errors="replace")


def test_iter_documents_local_files_and_missing_column(tmp_path):
    rows = [{"id": i, "body": f"document number {i} " * random.randint(1, 5)} for i in range(7)]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    got = list(iter_documents("json", data_files=str(p), text_field="body"))
    assert got == [r["body"] for r in rows]
    got2 = list(iter_documents("json", data_files=str(p), text_field="body", streaming=False))
    assert got2 == got
    with pytest.raises(ValueError, match=r"no column 'text'.*\['id', 'body'\]"):
        list(iter_documents("json", data_files=str(p), text_field="text"))


def test_is_eval_document_stable_and_calibrated():
    rng = random.Random(random.randrange(2**31))
    docs = [f"doc {rng.random()} {i}" for i in range(4000)]
    frac = 0.2
    flags = [is_eval_document(d, frac) for d in docs]
    # reference: first 8 bytes of sha256, big-endian, as a fraction of 2**64
    ref = [int(hashlib.sha256(d.encode()).hexdigest()[:16], 16) < frac * 2**64 for d in docs]
    assert flags == ref
    p = sum(flags) / len(flags)
    assert abs(p - frac) < 5 * (frac * (1 - frac) / len(docs)) ** 0.5
    assert not any(is_eval_document(d, 0.0) for d in docs[:100])
    assert all(is_eval_document(d, 1.0) for d in docs[:100])
    # nested: a document in the eval split at 0.1 is also eval at 0.3
    assert all(is_eval_document(d, 0.3) for d in docs if is_eval_document(d, 0.1))
    with pytest.raises(ValueError, match="eval_fraction"):
        is_eval_document("x", 1.5)


def _seqs_of(doc, tok, ctx_len):
    return list(packed_sequences([doc], tok, ctx_len, eval_fraction=0.0, split="train"))


@pytest.mark.parametrize("ctx_len", [2, 17, 64])
def test_packing_contiguous_slices_with_bos(tok, ctx_len):
    docs = tiny_corpus(n_files=5, max_chars=3000)
    # one document containing special-token strings: they must be split into ordinary tokens
    docs.append("x = '<s>' + '</s>' + '<pad>'\n" * 30)
    special = set(tok.all_special_ids)
    all_seqs = list(packed_sequences(docs, tok, ctx_len, eval_fraction=0.0, split="train"))
    expected = []
    for doc in docs:
        seqs = _seqs_of(doc, tok, ctx_len)
        expected += seqs
        body = [t for s in seqs for t in s[1:]]
        for s in seqs:
            assert len(s) == ctx_len and s[0] == tok.bos_token_id
            assert not special.intersection(s[1:])
        # the bodies are the document's token stream from its start; decoding gives its text back
        text = tok.decode(body)
        assert doc.startswith(text)
        rest = tok(doc[len(text):], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert len(rest) < ctx_len - 1 + 2  # only a dropped tail (< ctx_len-1 tokens, +merge slack)
        if "<s>" not in doc:  # plain text: exactly the tokenizer's ids of the document
            ids = tok(doc, add_special_tokens=False)["input_ids"]
            n = (len(ids) // (ctx_len - 1)) * (ctx_len - 1)
            assert body == ids[:n]
    assert all_seqs == expected  # documents are packed one after the other, never mixed


def test_packing_train_eval_disjoint(tok):
    rng = random.Random(random.randrange(2**31))
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", ":", "\n"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) + f" #{i}" for i in range(60)]
    frac = 0.4
    train = list(packed_sequences(docs, tok, 8, eval_fraction=frac, split="train"))
    ev = list(packed_sequences(docs, tok, 8, eval_fraction=frac, split="eval"))
    exp_train = [s for d in docs if not is_eval_document(d, frac) for s in _seqs_of(d, tok, 8)]
    exp_eval = [s for d in docs if is_eval_document(d, frac) for s in _seqs_of(d, tok, 8)]
    assert train == exp_train and ev == exp_eval
    assert len(train) > 0 and len(ev) > 0
    with pytest.raises(ValueError, match="split"):
        list(packed_sequences(docs, tok, 8, eval_fraction=frac, split="test"))
    with pytest.raises(ValueError, match="ctx_len"):
        list(packed_sequences(docs, tok, 1, eval_fraction=frac))
