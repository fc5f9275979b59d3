"""README's "On one GPU": its three commands (sae-harvest, sae-train with eval.after_train, sae-browse), read
from README itself and run in this process with the shipped configs model=gpt2 and data=fineweb, offline:
the hub names are replaced by a tiny random GPT-2 (nine layers, so that blocks.8 exists) and a local JSON
lines file, and the sizes by small ones. Every other argument is README's."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from helpers.synthetic import make_tiny_lm, tiny_corpus

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[list[str]]:
    """The argument lists of the `.venv/bin/sae-*` lines of README's "On one GPU" code block."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## On one GPU"):]
    block = section[section.index("```bash") + 7:section.index("```", section.index("```bash") + 7)]
    return [shlex.split(line) for line in block.splitlines() if line.startswith(".venv/bin/sae-")]


@pytest.mark.slow
def test_the_one_gpu_quickstart_runs_offline_at_toy_size(tmp_path, console_script, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    lm_dir = make_tiny_lm(tmp_path / "gpt2", arch="gpt2", hidden_size=16, n_layers=9, n_heads=2)
    corpus = tmp_path / "fineweb.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(n_files=12)))
    # README's values that are sizes or hardware, here small and on the CPU; everything else as written
    small = {"harvest.tokens": "6000", "sae.d_sae": "64", "sae.k": "4", "trainer.tokens": "12000", "device": "cpu"}
    offline = [f"model.name={lm_dir}", "data.dataset=json", f"data.data_files={corpus}", "data.name=null",
               "data.eval_fraction=0.3", "harvest.batch_size=8", "trainer.batch_tokens=512", "eval.eval_tokens=1024",
               "eval.batch_size=4", "browse.tokens=4000", "browse.batch_tokens=512", "browse.latents_top=5",
               "browse.latents_random=2"]
    commands = _readme_commands()
    assert [c[0].rsplit("/", 1)[1] for c in commands] == ["sae-harvest", "sae-train", "sae-browse"]
    for cmd in commands:
        assert {"model=gpt2", "data=fineweb"} <= set(cmd[1:])
        args = [f"{k}={small[k]}" if (k := a.split("=", 1)[0]) in small else a for a in cmd[1:]]
        proc = console_script(cmd[0].rsplit("/", 1)[1], *args, *offline)
        assert proc.returncode == 0, (cmd[0], proc.stderr[-3000:])
    run = tmp_path / "runs" / "gpt2"
    attrs = json.loads((run / "activations.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["hook_name"] == "blocks.8.hook_resid_post" and attrs["d_in"] == 16
    ev = json.loads((run / "topk_32k" / "eval.json").read_text())
    assert 0 < ev["fvu"] < 2 and ev["l0"] <= 4 + 1e-9
    assert (run / "topk_32k" / "browser" / "index.html").is_file()

