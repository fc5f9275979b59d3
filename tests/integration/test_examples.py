"""examples/sae_walkthrough.py, run on the tiny LM with an exported TopK SAE of random non-trivial weights:
the whole script runs and prints every section; its pieces agree with independent computations (the
clean loss with the LM's own, the top latents with the SAE's encoding of `output_hidden_states`), a
zero-strength steer is the plain generation, and a strong one changes it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers.sae import perturb_topk_family

from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae
from sae_dist.sae.registry import build_sae

ROOT = Path(__file__).resolve().parents[2]
HOOK = "blocks.1.hook_resid_post"


def _example():
    spec = importlib.util.spec_from_file_location("sae_walkthrough", ROOT / "examples" / "sae_walkthrough.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sae_dir(tiny_lm_dir, tmp_path_factory):
    g = torch.Generator().manual_seed(4)
    sae = build_sae(SAEConfig(d_in=32, d_sae=96, k=4, normalize="none"), generator=g)
    with torch.no_grad():
        perturb_topk_family(sae, g)
    out = tmp_path_factory.mktemp("ex") / "sae"
    export_sae(sae, out, hook_name=HOOK, model_name=tiny_lm_dir, normalize="none")
    (out.parent / "browser" / "latents").mkdir(parents=True)
    return out


def test_the_walkthrough_runs_and_its_parts_match_independent_computations(sae_dir, tiny_lm_dir, capsys):
    ex = _example()
    ex.main(["--sae", str(sae_dir), "--prompt", "def f(x):\n    return x", "--max-new-tokens", "6",
             "--alpha", "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"hook {HOOK}: next-token loss") and out[-2].startswith("generation:")
    assert out[-1].startswith("steered (")

    sae, lm, tok, hook = ex.load(sae_dir)
    assert hook == HOOK
    ids = ex.prompt_ids(tok, "def f(x):\n    return x")
    with torch.no_grad():
        logits = lm(ids).logits[0, :-1]
        hs = lm(ids, output_hidden_states=True).hidden_states[2][0, 1:]  # after decoder layer 1
    clean, spliced = ex.spliced_loss(lm, sae, hook, ids)
    assert clean == pytest.approx(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])), rel=1e-5)
    assert spliced != pytest.approx(clean, rel=1e-3)
    tops = ex.top_latents(sae, ex.hook_acts(lm, hook, ids), n=3)
    with torch.no_grad():
        z = sae.encode(hs)
    for t, row in enumerate(tops):
        assert len(row) >= 1 and [i for i, _ in row] == z[t].topk(len(row)).indices.tolist()
        assert all(v == pytest.approx(float(z[t, i]), rel=1e-5) for i, v in row)
    direction = sae.W_dec[5] / sae.W_dec[5].norm()
    plain = ex.generate(lm, tok, ids, 6)
    assert ex.generate(lm, tok, ids, 6, hook, direction, 0.0) == plain
    assert len(ex.generate(lm, tok, ids, 6, hook, direction, 40.0)) == 6
    base = ex.next_token_logits(lm, ids)
    torch.testing.assert_close(base, logits_last := lm(ids).logits[0, -1].detach(), rtol=0, atol=0)
    torch.testing.assert_close(ex.next_token_logits(lm, ids, hook, direction, 0.0), logits_last, rtol=0, atol=0)
    steered = ex.next_token_logits(lm, ids, hook, direction, 40.0)

    def add(_m, _a, out):  # the same shift by a plain torch hook on decoder layer 1's output
        return (out[0] + 40.0 * direction, *out[1:]) if isinstance(out, tuple) else out + 40.0 * direction

    handle = lm.model.layers[1].register_forward_hook(add)
    try:
        with torch.no_grad():
            want = lm(ids).logits[0, -1]
    finally:
        handle.remove()
    torch.testing.assert_close(steered, want, rtol=1e-5, atol=1e-5)
    assert (steered - base).abs().max() > 0.1
    page = sae_dir.parent / "browser" / "latents" / f"{tops[0][0][0]}.html"
    assert ex.browser_page(sae_dir.parent / "browser", tops[0][0][0]) == ""
    page.write_text("<html></html>")
    assert ex.browser_page(sae_dir.parent / "browser", tops[0][0][0]) == str(page)


def test_the_walkthrough_says_so_when_no_latent_fires(tiny_lm_dir, tmp_path, capsys):
    """An SAE whose latents never fire (b_enc far below any pre-activation): the walkthrough prints the
    losses and an empty row per token, then says no latent fired instead of steering; an empty prompt is a
    usage error."""
    sae = build_sae(SAEConfig(d_in=32, d_sae=96, k=4, normalize="none"), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)
    export_sae(sae, tmp_path / "sae", hook_name=HOOK, model_name=tiny_lm_dir, normalize="none")
    ex = _example()
    ex.main(["--sae", str(tmp_path / "sae"), "--prompt", "def f(x):\n    return x"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"hook {HOOK}: next-token loss") and out[-1].startswith("no latent fires on the prompt")
    with pytest.raises(SystemExit):
        ex.main(["--sae", str(tmp_path / "sae"), "--prompt", ""])
    assert "gives no token" in capsys.readouterr().err
