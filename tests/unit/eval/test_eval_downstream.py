"""downstream_loss and evaluate() on the tiny random Llama (tests/helpers/synthetic.py: make_tiny_lm).

References are independent of the code under test: splicing through our own `register_forward_hook`
on the decoder layer (not `splice_hook`), and cross entropy / KL recomputed in numpy float64 from the
logits.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from sae_dist.eval.downstream import downstream_loss

HOOK = "blocks.1.hook_resid_post"
LAYER = 1


def _sequences(tok, n=6, t=16, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    ids = torch.randint(3, len(tok), (n, t), generator=g)
    ids[:, 0] = tok.bos_token_id
    return ids


class IdentitySAE(nn.Module):
    def forward(self, x):
        return x.clone()


class ZeroSAE(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class RandomTopKSAE(nn.Module):
    """Stand-in with the export API: x^ = W_dec^T TopK(ReLU(W_enc^T (x - b_dec) + b_enc)) + b_dec."""

    def __init__(self, d_in, d_sae, k, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in))
        self.b_enc = nn.Parameter(torch.randn(d_sae, generator=g) * 0.1)
        self.W_dec = nn.Parameter(torch.randn(d_sae, d_in, generator=g))
        self.b_dec = nn.Parameter(torch.randn(d_in, generator=g) * 0.1)
        self.k = k

    def forward(self, x):
        assert x.dtype == torch.float32
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        v, i = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
        return z @ self.W_dec + self.b_dec


def _np_log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _manual_logits(model, ids, replace=None):
    """Full forward; if `replace` is given, decoder layer LAYER's output at positions >= 1 becomes
    replace(output[:, 1:]) via a plain forward hook (independent of sae_dist's splice_hook)."""
    handle = None
    if replace is not None:

        def hook(_mod, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[:, 1:] = replace(h[:, 1:])
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = model.model.layers[LAYER].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits.double().numpy()
    finally:
        if handle is not None:
            handle.remove()


def _manual_ce_kl(ids, logits_clean, logits_other):
    """CE (numpy float64) over logits at positions 1..T-2 -> targets 2..T-1, and KL(clean || other)."""
    tgt = ids[:, 2:].numpy()
    lp_c = _np_log_softmax(logits_clean[:, 1:-1])
    lp_o = _np_log_softmax(logits_other[:, 1:-1])
    ce_c = -np.take_along_axis(lp_c, tgt[..., None], -1).mean()
    ce_o = -np.take_along_axis(lp_o, tgt[..., None], -1).mean()
    kl = (np.exp(lp_c) * (lp_c - lp_o)).sum(-1).mean()
    return ce_c, ce_o, kl


def test_identity_sae_equals_clean(lm):
    model, tok = lm
    ids = _sequences(tok)
    out = downstream_loss(model, IdentitySAE(), HOOK, ids, batch_size=4, device="cpu")
    assert out["ce_loss_sae"] == pytest.approx(out["ce_loss_clean"], abs=1e-9)
    assert abs(out["kl_div"]) < 1e-9
    assert out["ce_loss_score"] == pytest.approx(1.0, abs=1e-7)
    assert out["ce_tokens"] == 6 * (16 - 2)
    assert out["ce_loss_zero_ablation"] != pytest.approx(out["ce_loss_clean"], abs=1e-4)


def test_zero_sae_equals_zero_ablation(lm):
    model, tok = lm
    ids = _sequences(tok)
    out = downstream_loss(model, ZeroSAE(), HOOK, ids, batch_size=3, device="cpu")
    assert out["ce_loss_sae"] == pytest.approx(out["ce_loss_zero_ablation"], abs=1e-9)
    assert out["ce_loss_score"] == pytest.approx(0.0, abs=1e-7)
    assert out["kl_div"] == pytest.approx(out["kl_div_zero_ablation"], abs=1e-9)
    assert out["kl_div"] > 0


def test_random_sae_matches_manual_splice(lm):
    model, tok = lm
    d = model.config.hidden_size
    sae = RandomTopKSAE(d, 64, 4, seed=int(torch.randint(0, 2**31, ()).item()))
    ids = _sequences(tok, n=5, t=12)
    out = downstream_loss(model, sae, HOOK, ids, batch_size=2, device="cpu")

    with torch.no_grad():
        clean = _manual_logits(model, ids)
        spliced = _manual_logits(model, ids, lambda h: sae(h.reshape(-1, d)).reshape(h.shape))
        zeroed = _manual_logits(model, ids, torch.zeros_like)
    ce_clean, ce_sae, kl = _manual_ce_kl(ids, clean, spliced)
    _, ce_zero, kl_zero = _manual_ce_kl(ids, clean, zeroed)

    assert out["ce_loss_clean"] == pytest.approx(ce_clean, rel=1e-5)
    assert out["ce_loss_sae"] == pytest.approx(ce_sae, rel=1e-5)
    assert out["ce_loss_zero_ablation"] == pytest.approx(ce_zero, rel=1e-5)
    assert out["kl_div"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert out["kl_div_zero_ablation"] == pytest.approx(kl_zero, rel=1e-4, abs=1e-7)
    assert out["ce_loss_score"] == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), rel=1e-4)
    assert abs(ce_sae - ce_clean) > 1e-4  # the random SAE really changes the loss


def test_batches_are_capped_by_the_vocabulary(lm, monkeypatch):
    """The fp32 [B, T, V] log-probs are bounded whatever batch_size asks (MAX_LOGPROB_ELEMENTS): with room
    for two 12-token contexts of this vocabulary, batch_size=32 runs forwards of at most 2 sequences, and
    gives the numbers of batch_size=2."""
    import sae_dist.train.heldout as heldout

    model, tok = lm
    ids = _sequences(tok, n=5, t=12, seed=3)
    sae = RandomTopKSAE(model.config.hidden_size, 64, 4, seed=4)
    ref = downstream_loss(model, sae, HOOK, ids, batch_size=2, device="cpu")
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(heldout, "MAX_LOGPROB_ELEMENTS", 2 * 12 * vocab + 1)
    rows = []
    handle = model.register_forward_pre_hook(lambda m, args, kw: rows.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        out = downstream_loss(model, sae, HOOK, ids, batch_size=32, device="cpu")
    finally:
        handle.remove()
    assert rows == [2] * 6 + [1] * 3  # clean, SAE and zero forwards of batches [0, 2), [2, 4), [4, 5)
    assert out == ref


def test_bad_sequences_raise(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="T=2"):
        downstream_loss(model, IdentitySAE(), HOOK, _sequences(tok, t=2), batch_size=2)
    with pytest.raises(ValueError, match="integer tensor"):
        downstream_loss(model, IdentitySAE(), HOOK, torch.zeros(2, 8), batch_size=2)


# ---------------------------------------------------------------------------------------------
# evaluate(): end to end with an SAE exported through the real export


def _export_random_sae(out_dir, d_in, d_sae=64, k=4, seed=0):
    from sae_dist.sae.config import SAEConfig
    from sae_dist.sae.export import export_sae
    from sae_dist.sae.topk import TopKSAE

    sae = TopKSAE(
        SAEConfig(d_in=d_in, d_sae=d_sae, k=k, normalize="none"),
        generator=torch.Generator().manual_seed(seed),
    )
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(seed + 1))
    export_sae(sae, out_dir, hook_name=HOOK, model_name="tiny-llama", normalize="none")
    return out_dir


def test_evaluate_end_to_end(lm, tmp_path):
    from helpers.synthetic import tiny_corpus

    from sae_dist.eval.evaluate import CONTRACT_KEYS, evaluate, write_eval_json
    from sae_dist.harvest.text import packed_sequences
    from sae_dist.sae.export import load_sae

    model, tok = lm
    d = model.config.hidden_size
    sae_dir = _export_random_sae(tmp_path / "sae", d, seed=int(torch.randint(0, 2**20, ()).item()))
    (sae_dir / "training_state.json").write_text(
        json.dumps({"tokens_trained": 12345, "dead_fraction": 0.25, "dead_fraction_window": "last 10 tokens"})
    )
    docs = tiny_corpus(n_files=4, max_chars=4000)
    ctx_len, eval_tokens = 16, 200
    res = evaluate(sae_path=sae_dir, model=model, tokenizer=tok, hook_name=HOOK, docs=docs, ctx_len=ctx_len,
                   eval_tokens=eval_tokens, eval_fraction=1.0, batch_size=5, progress=False)
    for key in CONTRACT_KEYS:
        assert key in res, key
        if key not in ("hook_name", "model"):
            assert isinstance(res[key], (int, float)) and math.isfinite(res[key]), (key, res[key])
    n_seq = math.ceil(eval_tokens / (ctx_len - 1))
    assert res["eval_tokens"] == n_seq * (ctx_len - 1)
    assert (res["tokens_trained"], res["dead_fraction"], res["dead_fraction_window"]) == (12345, 0.25, "last 10 tokens")
    assert (res["d_sae"], res["k"], res["d_in"], res["hook_name"], res["model"]) == (64, 4, d, HOOK, "tiny-llama")
    assert (res["n_latents"], res["hook"]) == (64, HOOK)  # the earlier names, kept for one release

    # independent reference: activations from output_hidden_states, numpy float64 fvu / l0
    seqs = []
    for s in packed_sequences(docs, tok, ctx_len, eval_fraction=1.0, split="eval"):
        seqs.append(s)
        if len(seqs) == n_seq:
            break
    ids = torch.tensor(seqs)
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][:, 1:].reshape(-1, d)
        sae = load_sae(sae_dir)
        x_hat = sae(h).double().numpy()
        l0 = (sae.encode(h) != 0).sum(1).double().mean().item()
    x = h.double().numpy()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert res["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert res["normalized_mse"] == pytest.approx(fvu, rel=1e-5)
    assert res["explained_variance"] == pytest.approx(1 - fvu, rel=1e-5, abs=1e-6)
    assert res["l0"] == pytest.approx(l0, rel=1e-9)
    down = downstream_loss(model, sae, HOOK, ids, batch_size=7)
    for key in ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero_ablation", "kl_div"):
        assert res[key] == pytest.approx(down[key], rel=1e-6), key

    path = write_eval_json(res, tmp_path / "out" / "eval.json")
    loaded = json.loads(open(path).read())
    assert set(CONTRACT_KEYS) <= set(loaded) and loaded["fvu"] == pytest.approx(res["fvu"], rel=1e-12)

    # without training_state.json: dead fraction measured on the eval tokens, and the window says so
    (sae_dir / "training_state.json").unlink()
    res2 = evaluate(sae_path=sae_dir, model=model, tokenizer=tok, hook_name=HOOK, docs=docs, ctx_len=ctx_len,
                    eval_tokens=60, eval_fraction=1.0, batch_size=4, progress=False)
    assert res2["dead_fraction"] == res2["dead_fraction_eval"]
    assert "eval tokens" in res2["dead_fraction_window"] and res2["tokens_trained"] is None


def test_evaluate_errors(lm, tmp_path):
    import copy

    from helpers.synthetic import tiny_corpus

    from sae_dist.eval.evaluate import evaluate

    model, tok = lm
    docs = tiny_corpus(n_files=3, max_chars=3000)
    narrow = _export_random_sae(tmp_path / "narrow", 16)
    with pytest.raises(ValueError, match=r"width 32.*d_in=16"):
        evaluate(sae_path=narrow, model=model, tokenizer=tok, hook_name=HOOK, docs=docs, ctx_len=16,
                 eval_tokens=30, eval_fraction=1.0, batch_size=2, progress=False)

    # NaN in one token's embedding -> the error names the batch / sequence range
    sae_dir = _export_random_sae(tmp_path / "sae", model.config.hidden_size)
    bad = copy.deepcopy(model)
    from sae_dist.harvest.text import packed_sequences

    seqs = list(packed_sequences(docs, tok, 16, eval_fraction=1.0, split="eval"))[:6]
    with torch.no_grad():
        bad.get_input_embeddings().weight[seqs[3][5]] = float("nan")
    first_bad = next(i for i, s in enumerate(seqs) if seqs[3][5] in s[1:])
    with pytest.raises(ValueError, match=rf"non-finite.*batch {first_bad // 2} \(sequences \[{first_bad // 2 * 2}, "):
        evaluate(sae_path=sae_dir, model=bad, tokenizer=tok, hook_name=HOOK, docs=docs, ctx_len=16,
                 eval_tokens=6 * 15, eval_fraction=1.0, batch_size=2, progress=False)
