"""Probe loss (sae_dist.eval.probes; Gao et al. 2024 sec. 4.3): labelling rules against hand-written
examples, the vectorised 1-D logistic fit against scipy.optimize, a planted latent, skipped tasks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sae_dist.eval.metrics import LatentCodes
from sae_dist.eval.probes import TASKS, char_states, fit_logistic_1d, label_spans, probe_loss, token_spans


def _spans(pieces):
    ends = np.cumsum([len(p) for p in pieces]).tolist()
    return "".join(pieces), list(zip([0, *ends[:-1]], ends, strict=True))


def _positives(pieces):
    text, spans = _spans(pieces)
    labels, valid = label_spans(text, spans)
    assert valid.all()
    return {t: {i for i in np.flatnonzero(v)} for t, v in labels.items()}


CODE = ['import', ' os', '\n', 'x', ' =', ' os', '.', 'path', '.', 'join', '("', 'a', ',', ' b', '",', ' MAX',
        '_LEN', ')', '  #', ' the', ' Camel', 'Case', ' note', '\n', 'if', ' (', 'y2', ')', ':']
CODE_EXPECTED = {
    "in_string": {11, 12, 13, 14},
    "in_comment": {18, 19, 20, 21, 22},
    "in_brackets": {11, 12, 13, 14, 15, 16, 26},
    "has_digit": {26},
    "camel_case": {20, 21},
    "all_caps": {15, 16},
    "python_keyword": {0, 24},
    "stop_word": {11, 19, 24},
    "line_start": {0, 3, 24},
    "space_before": {1, 3, 4, 5, 13, 15, 18, 19, 20, 22, 24, 25},
    "punctuation": {4, 6, 8, 10, 12, 14, 17, 18, 25, 27, 28},
    "attribute": {7, 9},
    "newline": {2, 23},
}

PROSE = ['The', ' cat', "'s", ' toy', ' (', 'a', ' red', ' ball', ')', ' costs', ' 5', ' USD', '.', '\n', 'It', ' is',
         ' here', '.']
PROSE_EXPECTED = {
    "in_string": set(),
    "in_comment": set(),
    "in_brackets": {5, 6, 7},
    "has_digit": {10},
    "camel_case": set(),
    "all_caps": {11},
    "python_keyword": {15},
    "stop_word": {0, 5, 14, 15},
    "line_start": {0, 14},
    "space_before": {1, 3, 4, 6, 7, 9, 10, 11, 14, 15, 16},
    "punctuation": {4, 8, 12, 17},
    "attribute": set(),
    "newline": {13},
}


@pytest.mark.parametrize("pieces,expected", [(CODE, CODE_EXPECTED), (PROSE, PROSE_EXPECTED)], ids=["code", "prose"])
def test_label_rules_hand_written(pieces, expected):
    assert set(expected) == set(TASKS)
    got = _positives(pieces)
    for task in TASKS:
        assert got[task] == expected[task], (task, sorted(got[task]), [pieces[i] for i in sorted(got[task])])


def test_char_states_strings_comments_brackets():
    # (segment, in_string, in_comment, in_brackets): the text is the concatenation of the segments
    segments = [
        ("x = f", 0, 0, 0), ('"a#b"', 1, 0, 0), (" + rb", 0, 0, 0), ("'c'", 1, 0, 0), (" ", 0, 0, 0),
        ("# z (", 0, 1, 0),  # a bracket inside a comment does not count
        ("\n", 0, 0, 0), ('"""d\n# e"""', 1, 0, 0),  # no comment inside a string
        ("\ns = ", 0, 0, 0), ("'open", 1, 0, 0),  # an unterminated single-quoted string ends at the newline
        ("\nt = (", 0, 0, 0), ("1, [2]", 0, 0, 1), (")", 0, 0, 0),
        (" don't", 0, 0, 0),  # an apostrophe inside a word opens no string
    ]
    text = "".join(seg for seg, *_ in segments)
    flags = np.array([f for seg, *f in segments for _ in seg], dtype=bool)
    in_str, in_com, in_br = char_states(text)
    for k, (name, got) in enumerate((("in_string", in_str), ("in_comment", in_com), ("in_brackets", in_br))):
        bad = np.flatnonzero(got != flags[:, k])
        assert bad.size == 0, (name, [(int(i), text[i]) for i in bad])


def test_token_spans_fast_path_and_fallback(tiny_lm_dir):
    from helpers.synthetic import tiny_corpus
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    seed = int(torch.randint(0, 2**31, ()).item())
    doc = tiny_corpus(n_files=2, max_chars=3000)[1]
    start = np.random.default_rng(seed).integers(0, 2000)
    ids = tok(doc[start : start + 600], add_special_tokens=False)["input_ids"][:80]
    text, spans = token_spans(ids, tok)
    assert "".join(text[s:e] for s, e in spans) == text, seed
    assert [text[s:e] for s, e in spans] == [tok.decode([i]) for i in ids], seed

    class SentencePieceLike:
        """decode strips the leading space of its output, as SentencePiece decoders do."""

        vocab = {0: "▁def", 1: "▁foo", 2: "(", 3: "x", 4: "):"}

        def decode(self, ids, **kw):
            return "".join(self.vocab[i] for i in ids).replace("▁", " ").lstrip(" ")

    text, spans = token_spans([0, 1, 2, 3, 4], SentencePieceLike())
    assert text == "def foo(x):"
    assert spans == [(0, 3), (3, 7), (7, 8), (8, 9), (9, 11)]


def _scipy_fit(z, y):
    from scipy.optimize import minimize

    def f(p):
        u = p[0] * z + p[1]
        return np.mean(np.logaddexp(0, u) - y * u)

    def g(p):
        r = 1 / (1 + np.exp(-(p[0] * z + p[1]))) - y
        return np.array([np.mean(r * z), np.mean(r)])

    res = minimize(f, np.zeros(2), jac=g, method="BFGS", options={"gtol": 1e-12, "maxiter": 10_000})
    return res.fun, res.x


def test_fit_matches_scipy_and_planted_latent():
    seed = int(torch.randint(0, 2**31, ()).item())
    g = torch.Generator().manual_seed(seed)
    n, d = 2000, 40
    fires = torch.rand(n, d, generator=g) < 0.15
    z = torch.rand(n, d, generator=g).mul(3).mul(fires)
    y = torch.rand(n, generator=g) < 0.3
    # latents 1..3 weakly informative (fire more on positives), latent 5 = the label exactly (separable)
    for j, strength in ((1, 0.5), (2, 1.0), (3, 2.0)):
        z[:, j] = z[:, j] + strength * y * torch.rand(n, generator=g)
    planted = 5
    z[:, planted] = y.float() * 1.7
    codes = LatentCodes.from_dense(z)
    fit = fit_logistic_1d(*codes.tensors(), y, d)
    for j in (0, 1, 2, 3, 7):
        ref_loss, (ref_a, ref_b) = _scipy_fit(z[:, j].double().numpy(), y.double().numpy())
        assert float(fit["loss"][j]) == pytest.approx(ref_loss, rel=1e-6, abs=1e-9), (seed, j)
        assert float(fit["a"][j]) == pytest.approx(ref_a, rel=1e-3, abs=1e-3), (seed, j)
        assert float(fit["b"][j]) == pytest.approx(ref_b, rel=1e-3, abs=1e-3), (seed, j)
    assert float(fit["loss"][planted]) < 1e-3, seed
    assert int(torch.argmin(fit["loss"])) == planted
    assert torch.equal(fit["fired"], (z != 0).sum(0).double())

    ybar = float(y.double().mean())
    entropy = -(ybar * math.log(ybar) + (1 - ybar) * math.log(1 - ybar))
    res = probe_loss(codes, {"planted": y, "noise": torch.rand(n, generator=g) < 0.5, "rare": torch.arange(n) < 5},
                     min_count=20)
    task = res["probe_loss_per_task"]["planted"]
    assert task["best_latent"] == planted and task["loss"] < 1e-3
    assert task["baseline"] == pytest.approx(entropy, rel=1e-12)
    assert (task["positives"], task["n"]) == (int(y.sum()), n)
    noise = res["probe_loss_per_task"]["noise"]
    assert noise["loss"] <= noise["baseline"] + 1e-12 and noise["loss"] > 0.9 * noise["baseline"], (seed, noise)
    assert list(res["probe_tasks_skipped"]) == ["rare"] and "5 positives" in res["probe_tasks_skipped"]["rare"]
    assert res["probe_loss"] == pytest.approx((task["loss"] + noise["loss"]) / 2, rel=1e-12)


def test_valid_mask_and_errors():
    seed = int(torch.randint(0, 2**31, ()).item())
    g = torch.Generator().manual_seed(seed)
    n, d = 600, 8
    z = torch.rand(n, d, generator=g) * (torch.rand(n, d, generator=g) < 0.3)
    y = torch.rand(n, generator=g) < 0.4
    valid = torch.rand(n, generator=g) < 0.7
    res = probe_loss(LatentCodes.from_dense(z), {"t": y}, valid, min_count=5)["probe_loss_per_task"]["t"]
    direct = fit_logistic_1d(*LatentCodes.from_dense(z[valid]).tensors(), y[valid], d)
    assert res["loss"] == pytest.approx(float(direct["loss"].min()), rel=1e-12), seed
    assert res["n"] == int(valid.sum())
    with pytest.raises(ValueError, match="probe_min_count"):
        probe_loss(LatentCodes.from_dense(z), {"t": y}, min_count=0)
    with pytest.raises(ValueError, match="labels"):
        probe_loss(LatentCodes.from_dense(z), {"t": y[:-1]})
    with pytest.raises(ValueError, match="binary"):
        fit_logistic_1d(*LatentCodes.from_dense(z).tensors(), y.float() * 2, d)
