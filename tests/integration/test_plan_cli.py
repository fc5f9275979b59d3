"""The sae-plan Hydra CLI (sae_dist/plan.py): JSON output, exit codes, the refusal path, no files in
the cwd. The planner's numbers against hand counts and the code: tests/unit/test_plan.py."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from sae_dist.plan import (
    checkpoint_bytes,
    harvest_store_bytes,
    params_per_gpu,
    plan,
)

H100_8x8 = {"nodes": 8, "gpus_per_node": 8}


# ------------------------------------------------------------------------------------ CLI
def test_cli_json_refusal_and_no_output_dir(tmp_path, console_script, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
        """`sae-plan *args` (`python -m sae_dist.plan`) in `cwd`, run in this process (conftest.py)."""
        assert Path.cwd() == cwd
        return console_script("sae-plan", *args)

    big = ["sae.d_in=4096", "sae.d_sae=16777216", "trainer.batch_tokens=131072", "cluster.nodes=8"]
    p = _cli(big + ["parallel.tp=64", "output=json"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert r["shard_shapes"] == {"W_enc": [4096, 262144], "b_enc": [262144], "W_dec": [262144, 4096],
                                 "b_dec": [4096]}
    assert r["params_per_gpu"] == params_per_gpu(4096, 2**24, 64)
    assert r["memory_bytes"]["params"] == 4 * r["params_per_gpu"]
    assert r["fits"] and r["config"]["k_aux"] == 2048 and r["config"]["engine"] == "torch"
    # the Hydra glue passes every option through: same numbers as calling plan() directly (whose
    # defaults model the code; bf16 copies follow trainer.bf16 = true)
    direct = plan(d_in=4096, d_sae=2**24, k=32, batch_tokens=131072, tp=64, cluster=H100_8x8)
    assert r.pop("store") is None  # no harvest.tokens: no store sized
    # one checkpoint at the trainer's defaults (no EMA, the feature-density window on, 2 kept)
    assert r.pop("checkpoint") == json.loads(json.dumps({**checkpoint_bytes(4096, 2**24, tp=64, density=True),
                                                         "keep": 2}))
    assert r == json.loads(json.dumps(direct))
    c = r["config"]
    assert (c["topk_exchange"], c["decode_compact"], c["decode_scan_slots"], c["encoder_bwd_drop_zeros"],
            c["bf16_operand_copies"]) == ("alltoall", True, "compacted", True, True)

    p = _cli(big + ["parallel.tp=64", "harvest.tokens=2001", "harvest.dtype=bfloat16", "data.ctx_len=9",
                    "output=markdown"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| tokens stored (harvest.tokens=2,001) | 2,008 |" in p.stdout  # 251 sequences of 8 tokens
    total = harvest_store_bytes(2001, 4096, dtype="bfloat16", ctx_len=9)["total_bytes"]
    assert f"| total | {total / 2**20:,.2f} MiB |" in p.stdout
    p = _cli(big + ["parallel.tp=64", "harvest.tokens=1000000", "output=json"], tmp_path)
    assert json.loads(p.stdout)["store"] == json.loads(json.dumps(harvest_store_bytes(10**6, 4096)))
    # harvest.dtype is also the dtype the tp group's first rank broadcasts each batch in
    p = _cli(big + ["parallel.tp=64", "harvest.dtype=float32", "output=json"], tmp_path)
    sent = {x["name"]: x["size_bytes"] for x in json.loads(p.stdout)["comm"]}
    assert sent["batch_broadcast"] == 131072 * 4096 * 4 == 2 * {x["name"]: x["size_bytes"] for x in r["comm"]}[
        "batch_broadcast"]

    p = _cli(big + ["parallel.tp=64", "trainer.bf16=false", "estimate.encoder_bwd_drop_zeros=false",
                    "estimate.decode_scan_slots=full", "estimate.dead_fraction=0.1", "output=json"], tmp_path)
    fp32 = json.loads(p.stdout)  # fp32 operands: 4-byte values in the AuxK dead pass, 0.9 GiB over
    assert p.returncode == (0 if fp32["fits"] else 1), p.stderr[-3000:]
    c = fp32["config"]
    assert c["bf16_operand_copies"] is False and c["encoder_bwd_drop_zeros"] is False
    assert c["decode_scan_slots"] == "full" and c["decode_scan_width"]["auxk_decode"] == 2048
    assert c["dead_fraction"] == 0.1 and c["dead_latents_per_gpu"] == round(0.1 * 262144)

    p = _cli(big + ["parallel.tp=8", "trainer.engine=deepspeed", "trainer.zero_stage=2"], tmp_path)
    assert p.returncode != 0
    assert "GiB more than cluster.gpu_memory_gib=79.6" in p.stderr and "parallel.tp=" in p.stderr
    assert "memory per GPU" in p.stdout and "REFUSED" in p.stdout

    p = _cli(["sae.d_sae=4096"], tmp_path)  # no d_in: nothing to read it from
    assert p.returncode != 0 and "sae.d_in" in p.stderr

    p = _cli(big + ["compare.tp=[16,64]", "compare.zero_stage=[0,2]", "output=json"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    plans = json.loads(p.stdout)["plans"]
    assert [(x["config"]["tp"], x["config"]["engine"], x["config"]["zero_stage"]) for x in plans] == [
        (16, "torch", 0), (16, "deepspeed", 2), (64, "torch", 0), (64, "deepspeed", 2)]

    assert list(tmp_path.iterdir()) == []  # Hydra wrote no outputs/, .hydra/ or log file here
    assert not math.isnan(plans[0]["step_time_s"])


def test_cli_counts_the_heldout_lm_only_when_the_evaluation_runs(tmp_path, console_script, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["sae.d_in=4096", "sae.d_sae=4194304", "trainer.batch_tokens=163840", "cluster.nodes=2", "parallel.tp=16",
            "estimate.heldout_lm_gib=14.9", "output=json"]
    on = console_script("sae-plan", *args)  # trainer.eval_every_steps defaults to 1000: counted, does not fit
    assert on.returncode == 1, on.stderr[-3000:]
    r_on = json.loads(on.stdout)
    assert r_on["memory_bytes"]["heldout_lm"] == round(14.9 * 2**30) and not r_on["fits"]
    assert r_on["suggestions"][0]["overrides"] == "trainer.eval_every_steps=0"
    off = console_script("sae-plan", *args, "trainer.eval_every_steps=0")
    assert off.returncode == 0, off.stderr[-3000:]
    r_off = json.loads(off.stdout)
    assert r_off["memory_bytes"]["heldout_lm"] == 0 and r_off["fits"]
    assert r_on["memory_bytes"]["total"] - r_off["memory_bytes"]["total"] == round(14.9 * 2**30)
