"""sae-eval knows where an SAE came from: without model / data overrides it evaluates on the model, text and
context length of the SAE's cfg.json; an override that differs is used with a warning naming both; a
cfg.json naming local files that the command line does not give is refused by name."""

from __future__ import annotations

import json

import torch
from helpers.sae import perturb_topk_family
from helpers.synthetic import tiny_corpus

from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae
from sae_dist.sae.registry import build_sae

HOOK = "blocks.1.hook_resid_post"


def _export(tmp_path, model_name: str, ctx: int) -> str:
    g = torch.Generator().manual_seed(2)
    sae = build_sae(SAEConfig(d_in=32, d_sae=64, k=4, normalize="none"), generator=g)
    with torch.no_grad():
        perturb_topk_family(sae, g)
    out = tmp_path / "sae"
    export_sae(sae, out, hook_name=HOOK, model_name=model_name, normalize="none",
               extra_cfg={"context_size": ctx, "dataset_path": "json"})
    return str(out)


def test_eval_defaults_to_the_sae_s_model_and_context_and_warns_on_other_ones(tiny_lm_dir, tmp_path,
                                                                                console_script):
    sae = _export(tmp_path, tiny_lm_dir, ctx=24)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(n_files=8)))
    common = [f"sae_path={sae}", "device=cpu", "data.dataset=json", f"data.data_files={corpus}",
              "data.eval_fraction=0.5", "eval.eval_tokens=512", "eval.batch_size=4"]
    proc = console_script("sae-eval", f"run_dir={tmp_path / 'a'}", *common)  # no model, no ctx_len given
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"sae-eval: model.name={tiny_lm_dir} (from the SAE's cfg.json: model_name)" in proc.stderr
    assert "sae-eval: data.ctx_len=24 (from the SAE's cfg.json: context_size)" in proc.stderr
    assert "trained with" not in proc.stderr
    ev = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert ev["model"] == tiny_lm_dir and ev["hook_name"] == HOOK and ev["ctx_len"] == 24

    proc = console_script("sae-eval", f"run_dir={tmp_path / 'b'}", *common, f"model.name={tiny_lm_dir}",
                          "data.ctx_len=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("the SAE was trained with context_size=24 (the SAE's cfg.json), but data.ctx_len=16 is used: the results "
            "are for another text than it was trained on") in proc.stderr
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["ctx_len"] == 16

    proc = console_script("sae-eval", f"run_dir={tmp_path / 'c'}", f"sae_path={sae}", "device=cpu")
    assert proc.returncode != 0
    assert "trained on local files (dataset_path='json'); name them with data.dataset=json" in proc.stderr
    assert not (tmp_path / "c" / "eval.json").exists()
