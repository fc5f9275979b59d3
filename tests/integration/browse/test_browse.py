"""sae-browse end to end: tiny random LM + store made from real text + a tiny TopK SAE, browser built
through the Hydra config, pages loaded in a REAL headless Chromium (JS sorting included) and checked
against numbers recomputed here in numpy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import torch
import zarr
from helpers.seeds import numpy_seed
from torch import nn

from sae_dist.browse.build import BrowseOptions, build_browser, final_norm_weight, logit_effects
from sae_dist.sae.export import export_sae
from sae_dist.store import write_store

CHROMIUM_HINT = ("headless Chromium is needed for the browser tests: install it with `apt-get install chromium` "
                 "(Debian/Ubuntu) so that `chromium` is on PATH")
SEQ_LEN, N_SEQ, D_SAE, K = 24, 50, 40, 3


def chromium_dom(url: str) -> str:
    """DOM after JS ran (virtual time budget) of `url` in a fresh headless Chromium profile."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(CHROMIUM_HINT)
    with tempfile.TemporaryDirectory() as prof:
        res = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={prof}", "--virtual-time-budget=2000", "--dump-dom", url],
            capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "<html" in res.stdout, f"chromium failed on {url}: {res.stderr[-2000:]}"
    return res.stdout


class _TinyTopK(nn.Module):
    def __init__(self, W_dec):
        super().__init__()
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(W_dec.shape[0]))
        self.b_dec = nn.Parameter(torch.zeros(W_dec.shape[1]))
        self.k = K


@pytest.fixture(scope="module")
def setup(tiny_lm_dir, tmp_path_factory):
    from helpers.synthetic import tiny_corpus
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seed = numpy_seed()
    rng = np.random.default_rng(seed)
    tmp = tmp_path_factory.mktemp("browse")
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    ids = np.concatenate([tok(t)["input_ids"] for t in tiny_corpus(n_files=4, max_chars=6000)])
    start = int(rng.integers(0, len(ids) - SEQ_LEN * N_SEQ))
    token_ids = ids[start:start + SEQ_LEN * N_SEQ].astype(np.int64)
    seq_index = np.repeat(np.arange(N_SEQ), SEQ_LEN)
    position = np.tile(np.arange(1, SEQ_LEN + 1), N_SEQ)
    E = lm.get_input_embeddings().weight.detach().numpy().astype(np.float64)
    E = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)
    prev = np.r_[token_ids[0], token_ids[:-1]]
    x = 3 * E[token_ids] + 0.5 * E[prev] + 0.1 * rng.standard_normal((len(token_ids), E.shape[1]))
    # SAE: decoder rows = embedding directions of the most frequent tokens + random directions
    vals, counts = np.unique(token_ids, return_counts=True)
    freq = vals[np.argsort(-counts)][: D_SAE - 8]
    W_dec = np.concatenate([E[freq], rng.standard_normal((8, E.shape[1]))])
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    sae_dir = export_sae(_TinyTopK(torch.tensor(W_dec, dtype=torch.float32)), tmp / "sae",
                         hook_name="blocks.1.hook_resid_post", model_name=tiny_lm_dir, normalize="none")
    store = write_store(tmp / "acts.zarr", x.astype(np.float32), token_ids=token_ids, seq_index=seq_index,
                        position=position, attrs={"model": tiny_lm_dir, "hook_name": "blocks.1.hook_resid_post"},
                        chunk_tokens=256, shard_tokens=512)
    # independent reference: TopK(ReLU) of x @ W_enc (b_enc = b_dec = 0)
    pre = x.astype(np.float32).astype(np.float64) @ W_dec.T
    kth = np.sort(pre, axis=1)[:, -K][:, None]
    z = np.where((pre >= kth) & (pre > 0), pre, 0.0)
    return dict(seed=seed, tmp=tmp, tok=tok, lm=lm, sae_dir=str(sae_dir), store=store, z=z, W_dec=W_dec,
                token_ids=token_ids, seq_index=seq_index, lm_dir=tiny_lm_dir)


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from sae_dist.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        base = compose(config_name="config", overrides=["run_dir=/tmp/unused"])
        extra = [] if "browse" in base else ["+browse=default"]
        return compose(config_name="config", overrides=extra + overrides)


@pytest.fixture(scope="module")
def built(setup):
    from sae_dist.browse.cli import run_browse

    s = setup
    out = s["tmp"] / "run"
    cfg = _compose([f"run_dir={out}", f"sae_path={s['sae_dir']}", f"store.path={s['store']}", "model=hf",
                    f"model.name={s['lm_dir']}", "model.dtype=float32", "device=cpu", "browse.latents_top=10",
                    "browse.latents_random=5", f"browse.latent_ids=[{D_SAE - 1}]", "browse.top_contexts=5",
                    "browse.random_contexts=3", "browse.window_before=6", "browse.window_after=2",
                    "browse.logit_k=7", "browse.tokens=100000", "browse.batch_tokens=300"])
    summary = run_browse(cfg, lm=(s["lm"], s["tok"]), progress=False)
    return summary, out / "browser"


def _rows(dom):
    return [(int(a), float(b), float(c)) for a, b, c in
            re.findall(r'<tr data-latent="(\d+)" data-density="([^"]+)"[^>]*data-f1="([^"]+)"', dom)]


def test_index_table_and_sorting_in_chromium(setup, built):
    s, (summary, out) = setup, built
    z = s["z"]
    n = z.shape[0]
    density = (z > 0).sum(0) / n
    alive = [i for i in range(D_SAE) if density[i] > 0]
    top10 = sorted(alive, key=lambda i: (-density[i], i))[:10]
    written = sorted(int(p.stem) for p in (out / "latents").glob("*.html"))
    msg = f"seed={s['seed']}"
    assert set(top10) <= set(written) and (D_SAE - 1) in written, msg
    expect_n = len(set(top10) | {D_SAE - 1}) + min(5, len(alive) - len(set(top10)))
    assert len(written) == expect_n == summary["latents_written"], msg
    assert summary["tokens_scanned"] == n and summary["alive"] == len(alive), msg

    url = (out / "index.html").resolve().as_uri()
    dom0 = chromium_dom(url)
    rows0 = _rows(dom0)
    assert [r[0] for r in rows0] == written, msg  # static order, one row per written latent
    for i, d, _ in rows0:
        assert d == pytest.approx(density[i], rel=1e-5), f"{msg}: latent {i} density {d} vs {density[i]}"
    assert '<svg class="hist"' in dom0 and "N2G F1" in dom0

    dom = chromium_dom(url + "#sort=density&dir=desc")
    rows = _rows(dom)
    assert 'data-sorted="density:desc"' in dom, f"{msg}: the sort script did not run"
    assert [r[0] for r in rows] == sorted(written, key=lambda i: (-density[i], i)), msg
    assert 'class="sortable sorted-desc" data-key="density"' in dom or re.search(
        r'data-key="density"[^>]*class="[^"]*sorted-desc', dom), msg

    dom = chromium_dom(url + "#sort=f1&dir=asc")
    f1 = [r[2] for r in _rows(dom)]
    assert 'data-sorted="f1:asc"' in dom, msg
    finite = [v for v in f1 if not np.isnan(v)]
    assert finite == sorted(finite) and all(np.isnan(v) for v in f1[len(finite):]), f"{msg}: {f1}"
    # f1 values in the table are those of browser.json
    recs = {r["latent"]: r for r in json.loads((out / "browser.json").read_text())["latents"]}
    for i, _, v in _rows(dom):
        ref = recs[i]["n2g_f1"]
        assert (np.isnan(v) and ref is None) or v == pytest.approx(ref, rel=1e-5), msg


def test_latent_page_in_chromium(setup, built):
    s, (_, out) = setup, built
    z, seq = s["z"], s["seq_index"]
    density = (z > 0).mean(0)
    i = int(np.argmax(density))
    msg = f"seed={s['seed']} latent={i}"
    dom = chromium_dom((out / "latents" / f"{i}.html").resolve().as_uri())
    top = dom.split('<div id="top">', 1)[1].split('<div id="random">', 1)[0]
    ctxs = re.findall(r'<div class="ctx">(.*?)</div>', top)
    assert len(ctxs) == min(5, len(np.unique(seq[z[:, i] > 0]))), msg
    # first top context: window around the global argmax, highlighted where the latent fires
    r = int(np.argmax(z[:, i]))
    lo = max(r - 6, int(np.flatnonzero(seq == seq[r])[0]))
    hi = min(r + 3, int(np.flatnonzero(seq == seq[r])[-1]) + 1)
    spans = re.findall(r'<span class="(tok[^"]*)"( style="[^"]*")? title="([^"]*)" data-act="([^"]+)">', ctxs[0])
    assert len(spans) == hi - lo, msg
    for (cls, style, title, act), row in zip(spans, range(lo, hi), strict=True):
        assert float(act) == pytest.approx(z[row, i], rel=1e-4, abs=1e-6), f"{msg} row {row}"
        assert ("act" in cls.split()) == (z[row, i] > 0), msg
        if z[row, i] > 0:
            assert "background-color: rgba(" in style and f"{z[row, i]:.4g}" in title, msg
        assert ("max" in cls.split()) == (row == r), msg
    assert ctxs[0].count('class="tok act') >= 1
    assert '<svg class="hist"' in dom.split('<div id="hist">', 1)[1], msg
    assert '<div id="n2g">' in dom and ("held out: precision" in dom or "not scored" in dom), msg
    # logit effects vs numpy: (W_dec[i] * norm weight) @ W_U^T
    W_U = s["lm"].get_output_embeddings().weight.detach().numpy().astype(np.float64)
    g = s["lm"].model.norm.weight.detach().numpy().astype(np.float64)
    eff = (s["W_dec"][i] * g) @ W_U.T
    pos_table = dom.split('id="logits-pos"', 1)[1].split("</table>")[0]
    neg_table = dom.split('id="logits-neg"', 1)[1].split("</table>")[0]
    pos = [int(t) for t in re.findall(r'data-token-id="(\d+)"', pos_table)]
    neg = [int(t) for t in re.findall(r'data-token-id="(\d+)"', neg_table)]
    assert pos == list(np.argsort(-eff)[:7]) and neg == list(np.argsort(eff)[:7]), msg


def test_neuronpedia_batches_load_with_saedashboard_and_match_the_scan(setup, built):
    """browser/neuronpedia/batch-0.json loads with SAEDashboard's own NeuronpediaDashboardBatch (and writes back
    the same dict), and holds, for every written latent, the density, the histogram, the top / random examples
    (whole stored sequences) and the logit effects recomputed here in numpy."""
    np_dash = pytest.importorskip("sae_dashboard.neuronpedia.neuronpedia_dashboard",
                                  reason="SAEDashboard is not installed: pip install --no-deps sae-dashboard==0.8.0")
    s, (summary, out) = setup, built
    z, seq, ids, tok = s["z"], s["seq_index"], s["token_ids"], s["tok"]
    raw = json.loads((out / "neuronpedia" / "batch-0.json").read_text())
    assert summary["neuronpedia_files"] == ["neuronpedia/batch-0.json"]
    batch = np_dash.NeuronpediaDashboardBatch(**raw)
    assert batch.to_dict() == raw  # exactly the library's keys and nesting
    assert (batch.model_id, batch.layer, batch.sae_set) == (s["lm_dir"], 1, "sae-dist")
    written = sorted(int(p.stem) for p in (out / "latents").glob("*.html"))
    assert [f.feature_index for f in batch.features] == written
    W_U = s["lm"].get_output_embeddings().weight.detach().numpy().astype(np.float64)
    eff_all = (s["W_dec"] * s["lm"].model.norm.weight.detach().numpy()) @ W_U.T
    texts = [(rows, [tok.decode([t]) for t in ids[rows]]) for rows in (np.flatnonzero(seq == q) for q in range(N_SEQ))]
    for f in batch.features:
        i, msg = f.feature_index, f"seed={s['seed']} latent={f.feature_index}"
        fires = z[:, i] > 0
        assert f.frac_nonzero == pytest.approx(fires.mean(), rel=1e-6), msg
        assert sum(f.freq_hist_data_bar_heights) == fires.sum() and len(f.freq_hist_data_bar_values) == 30, msg
        assert (f.n_prompts_total, f.n_tokens_in_prompt, f.dataset) == (N_SEQ, SEQ_LEN, ""), msg
        eff = eff_all[i]
        assert f.pos_str == [tok.decode([t]) for t in np.argsort(-eff)[:7]], msg
        assert f.neg_str == [tok.decode([t]) for t in np.argsort(eff)[:7]], msg
        np.testing.assert_allclose(f.pos_values, np.sort(eff)[::-1][:7], atol=2e-3, err_msg=msg)
        top = [a for a in f.activations if a.bin_min == -1]
        rnd = [a for a in f.activations if a.bin_min == 0]
        assert len(top) == min(5, len(np.unique(seq[fires]))) and len(top) + len(rnd) == len(f.activations), msg
        assert len(rnd) == min(3, fires.sum() - len(top)), msg
        ex_rows = [_example_row(a, texts, z[:, i]) for a in top + rnd]
        assert None not in ex_rows, f"{msg}: an example is no stored sequence of the scan: {ex_rows}"
        assert all(a.bin_max == pytest.approx(z[:, i].max(), abs=6e-4) for a in f.activations), msg
        assert (z[ex_rows, i] > 0).all() and len(set(ex_rows)) == len(ex_rows), msg
        assert ex_rows[0] == int(np.argmax(z[:, i])), msg  # the first top example: the latent's max
        top_vals = list(z[ex_rows[:len(top)], i])
        assert top_vals == sorted(top_vals, reverse=True), msg


def _example_row(a, texts, zi):
    """The scan row of a Neuronpedia example `a`: the row at its qualifying token in the stored sequence (`texts`:
    (rows, decoded tokens) of each) whose tokens and activations (3 decimals) it shows; None when none matches."""
    for rows, text in texts:
        if text == a.tokens and np.allclose(a.values, zi[rows], atol=6e-4):
            return int(rows[a.qualifying_token_index])
    return None


def test_logit_effects_through_norm():
    seed = numpy_seed()
    g = torch.Generator().manual_seed(seed)
    W_dec, W_U, w = torch.randn(5, 16, generator=g), torch.randn(50, 16, generator=g), torch.rand(16, generator=g) + 0.5
    tv, ti, bv, bi = logit_effects(W_dec, W_U, 4, w, chunk=2)
    ref = (W_dec.double() * w.double()) @ W_U.double().T
    assert torch.equal(ti, ref.argsort(dim=1, descending=True)[:, :4]), f"seed={seed}"
    assert torch.equal(bi, ref.argsort(dim=1)[:, :4]), f"seed={seed}"
    assert torch.allclose(tv.double(), ref.gather(1, ti), atol=1e-4), f"seed={seed}"

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.norm = nn.LayerNorm(16)

        @property
        def base_model(self):
            return self.model

    assert final_norm_weight(M()) is not None and final_norm_weight(nn.Linear(2, 2)) is None


def test_clear_errors(setup, tmp_path):
    from sae_dist.sae.export import load_sae

    s = setup
    sae = load_sae(s["sae_dir"])
    rng = np.random.default_rng(numpy_seed())
    bad = write_store(tmp_path / "d16.zarr", rng.standard_normal((64, 16)).astype(np.float32),
                      token_ids=np.arange(64))
    with pytest.raises(ValueError, match=r"d_in=16.*d_in=32"):
        build_browser(sae, bad, tmp_path / "o1", progress=False)
    notext = write_store(tmp_path / "notext.zarr", rng.standard_normal((64, 32)).astype(np.float32))
    with pytest.raises(ValueError, match="no token_ids.*contexts cannot be shown"):
        build_browser(sae, notext, tmp_path / "o2", progress=False)
    with pytest.raises(ValueError, match=r"browse.window_before=-1"):
        build_browser(sae, s["store"], tmp_path / "o3", opts=BrowseOptions(window_before=-1), progress=False)
    with pytest.raises(ValueError, match=r"browse.neuronpedia_sae_set=''; must be a non-empty name"):
        build_browser(sae, s["store"], tmp_path / "o5", opts=BrowseOptions(neuronpedia_sae_set=""), progress=False)
    with pytest.raises(ValueError, match=r"latent_ids.*outside"):
        build_browser(sae, s["store"], tmp_path / "o4", opts=BrowseOptions(latent_ids=[D_SAE]), progress=False)


def test_scan_of_rows_shuffled_within_shards_is_the_text_order_scan(setup, tmp_path):
    """The setup's rows shuffled within each shard of 512 (row_order "shuffled_in_shard", as sae-harvest
    writes by default) scan to the ScanResult of the rows in text order, also when the scan ends inside a
    shard."""
    from sae_dist import load_sae
    from sae_dist.browse.build import scan_store
    from sae_dist.store import write_store

    s = setup
    g = zarr.open_group(str(s["store"]), mode="r")
    a = {k: g[k][:] for k in ("activations", "token_ids", "seq_index", "position")}
    n = len(a["token_ids"])
    perm = np.concatenate([lo + np.random.default_rng(lo).permutation(min(512, n - lo)) for lo in range(0, n, 512)])
    shuffled = write_store(tmp_path / "shuffled.zarr", a["activations"][perm], token_ids=a["token_ids"][perm],
                           seq_index=a["seq_index"][perm], position=a["position"][perm],
                           attrs={**dict(g.attrs), "row_order": "shuffled_in_shard"}, chunk_tokens=256,
                           shard_tokens=512)
    sae = load_sae(s["sae_dir"])
    for tokens in (n, 700):
        want = scan_store(sae, s["store"], tokens=tokens, progress=False)
        got = scan_store(sae, shuffled, tokens=tokens, progress=False)
        assert got.n_tokens == want.n_tokens == min(n, tokens)
        for name in ("token_ids", "seq_start", "rows", "latents"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
        np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-6)


def test_no_neuronpedia_files_for_a_hook_without_a_block(tmp_path, capsys):
    # Neuronpedia files a dashboard under the hook's block: a hook with none gets no files (not a layer 0)
    from sae_dist.browse.build import _write_neuronpedia

    assert _write_neuronpedia(tmp_path, None, [], [], None, BrowseOptions(), {"hook_name": "hook_embed"}, {}) == []
    assert "hook_name='hook_embed' names no block" in capsys.readouterr().err
    assert not (tmp_path / "neuronpedia").exists()
