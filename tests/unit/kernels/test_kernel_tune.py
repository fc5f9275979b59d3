"""`sae_dist.kernels.tune`: the encoder's launch candidates checked and timed, the measured table it
merges into and that `encoder_launch_config` reads, and the check that keeps a wrong candidate out."""

from __future__ import annotations

import json

import pytest
import torch

from sae_dist.kernels import encoder_topk as et
from sae_dist.kernels import tune


def _operands(B=40, d=24, n=200, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=g), torch.randn(d, n, generator=g) / d**0.5, 0.1 * torch.randn(n, generator=g)


@pytest.mark.parametrize("precision", [None, "tf32", "ieee"])
@pytest.mark.parametrize("k", [8, 32, 64, 128, 256])
def test_candidates_start_with_the_default_and_keep_what_the_splits_and_registers_need(k, precision):
    cands = et.encoder_candidates(k, precision)
    base = et.encoder_launch_config(768, k, precision)
    assert cands[0] == base and len(cands) == len({json.dumps(c, sort_keys=True) for c in cands}) >= 4
    for c in cands:
        assert base["BLOCK_N"] % c["BLOCK_N"] == 0  # the splits are aligned to the default's BLOCK_N
        assert c["BLOCK_B"] == base["BLOCK_B"] and c["K_PAD"] == base["K_PAD"] >= k
        assert c["BLOCK_B"] * c["K_PAD"] <= 8192 and c["num_warps"] in (4, 8) and 2 <= c["num_stages"] <= 4
        if base["num_warps"] == 8:
            assert c["num_warps"] == 8  # 4 warps spilled where the default takes 8
        if precision == "ieee":
            assert c["num_stages"] <= 3  # 4 stages spilled with IEEE dots


def test_sweep_checks_and_times_every_candidate(kernel_device):
    """`run` at a tiny shape (the interpreter on CPU): every candidate of both classes selects what the
    default selects and is timed; the fastest is one of them."""
    args = tune._parse(["--d-in", "24", "--n", "200", "--batch", "40", "--k", "4", "16", "--dtype", "fp32",
                        "--iters", "1", "--warmup", "0", "--device", kernel_device.type])
    seen, saved = [], []
    result = tune.run(args, emit=seen.append, save=lambda r: saved.append(len(r["classes"])))
    assert [c["k"] for c in result["classes"]] == [4, 16] and result["shape"] == {"d_in": 24, "n": 200, "batch": 40}
    assert saved == [1, 2]  # the result is saved after each class
    for c in result["classes"]:
        prec = {v: k for k, v in tune.PRECISION_LABELS.items()}[c["precision"]]
        assert prec == ("ieee" if kernel_device.type == "cpu" else None if c["dtype"] == "bf16" else "ieee")
        cands = et.encoder_candidates(c["k"], prec)
        assert [r["config"] for r in c["results"]] == cands
        assert c["complete"] and c["all_correct"] and c["best"] in cands and c["best_ms"] > 0
        assert c["default_ms"] == c["results"][0]["ms_median"]
    assert len(seen) == sum(len(c["results"]) for c in result["classes"]) and seen[0]["k"] == 4


def test_the_deadline_stops_candidates_and_timing(monkeypatch):
    """Past --stop-at no candidate starts ("not run", the class incomplete); timing that reaches the deadline
    stops after one round, and the class is then incomplete too, so --merge refuses it."""
    xc, W, be = _operands()
    cl = tune.tune_class(xc, W, be, 4, iters=3, warmup=0, deadline=0.0)
    assert {r["status"] for r in cl["results"]} == {"not run"} and not cl["complete"] and cl["best"] is None
    calls = []
    runs = [({"status": "checked"}, type("L", (), {"run": lambda self: calls.append(1)})()) for _ in range(2)]
    tune._time_runs(runs, iters=5, warmup=1, deadline=0.0, device=torch.device("cpu"))
    assert [r["rounds"] for r, _ in runs] == [1, 1] and len(calls) == 2 * (1 + 1)
    tune._time_runs(runs, iters=5, warmup=0, deadline=float("inf"), device=torch.device("cpu"))
    assert [r["rounds"] for r, _ in runs] == [5, 5]


def test_a_candidate_that_fails_is_its_own_error(monkeypatch):
    xc, W, be = _operands()
    real = tune._select

    def select(xc, W, be, k, cfg):
        if cfg["num_stages"] == 2:
            raise RuntimeError("out of\nshared memory")
        return real(xc, W, be, k, cfg)

    monkeypatch.setattr(tune, "_select", select)
    cl = tune.tune_class(xc, W, be, 4, iters=1, warmup=0, deadline=float("inf"))
    by = {r["config"]["num_stages"]: r for r in cl["results"] if r["config"]["BLOCK_D"] == cl["results"][0]["config"][
        "BLOCK_D"] and r["config"]["BLOCK_N"] == cl["results"][0]["config"]["BLOCK_N"]}
    assert by[2]["status"] == "error" and by[2]["error"] == "RuntimeError: out of shared memory"
    assert by[3]["status"] == "timed" and not cl["all_correct"] and not cl["complete"]


def test_a_wrong_selection_is_caught():
    xc, W, be = _operands(B=200)
    pre = xc @ W + be
    ref_v, ref_i = pre.topk(6, dim=1)
    assert tune.check_values(xc, W, be, ref_v, ref_i) is None and tune.check_selection(ref_v, ref_v) is None
    # a lower-ranked latent in place of a top one, its own value kept: the ids carry their values, the
    # selection is not the top-k (a tile skipped, say)
    v, i = ref_v.clone(), ref_i.clone()
    sorted_v, sorted_i = pre[3].sort(descending=True)
    v[3, 0], i[3, 0] = sorted_v[10], sorted_i[10]
    assert tune.check_values(xc, W, be, v, i) is None
    assert "differ from the reference candidate's" in tune.check_selection(ref_v, v)
    # the right values under wrong ids, in a row of the last token block (the checked rows span the batch)
    i = ref_i.clone()
    i[199] = i[199].roll(1)
    assert "pre-activations at their ids" in tune.check_values(xc, W, be, ref_v, i)
    i = ref_i.clone()
    i[0, 1] = i[0, 0]
    assert "repeated" in tune.check_values(xc, W, be, ref_v, i)
    i[0, 1] = W.shape[1]
    assert "out of range" in tune.check_values(xc, W, be, ref_v, i)


def _result(device="NVIDIA H100 80GB HBM3", best=None, k=32):
    base = et.encoder_candidates(k, None)
    best = base[2] if best is None else best
    return {"device": device, "triton": "3.9.0", "torch": "2.13.0", "date": "2026-12-07T00:00:00Z",
            "shape": {"d_in": 768, "n": 2**18, "batch": 32768},
            "classes": [{"precision": "16-bit", "K_PAD": base[0]["K_PAD"], "k": k, "dtype": "bf16",
                         "best": best, "best_ms": 20.0, "default_ms": 22.0, "all_correct": True, "complete": True}]}


def test_merged_table_sets_the_launch_configuration_of_that_gpu(tmp_path, monkeypatch):
    table = tmp_path / "encoder_tuned.json"
    monkeypatch.setattr(tune, "TABLE_PATH", table)
    name = "NVIDIA H100 80GB HBM3"
    default = et.encoder_launch_config(768, 32, None, device_name=name)
    assert default == et.encoder_candidates(32, None)[0]  # no table: the offline choice
    written = tune.merge(_result())
    assert written[0]["config"] == et.encoder_candidates(32, None)[2] and written[0]["default_ms"] == 22.0
    assert et.encoder_launch_config(768, 32, None, device_name=name) == et.encoder_candidates(32, None)[2]
    assert et.encoder_launch_config(4096, 20, None, device_name=name) == et.encoder_candidates(20, None)[2]  # K_PAD 32
    # other GPUs, precisions and K_PAD, and the interpreter, keep the offline choice
    assert et.encoder_launch_config(768, 32, None, device_name="NVIDIA H200") == default
    assert et.encoder_launch_config(768, 32, "tf32", device_name=name) == et.encoder_candidates(32, "tf32")[0]
    assert et.encoder_launch_config(768, 64, None, device_name=name) == et.encoder_candidates(64, None)[0]
    assert et.encoder_launch_config(768, 32, None, interpret=True, device_name=name)["BLOCK_N"] == 32
    # a second merge replaces the entry of the same class and keeps the others
    tune.merge(_result(device="NVIDIA H200", best=et.encoder_candidates(32, None)[1]))
    tune.merge(_result(best=et.encoder_candidates(32, None)[3]))
    entries = json.loads(table.read_text())["entries"]
    assert [(e["device"], e["config"]) for e in entries] == [
        (name, et.encoder_candidates(32, None)[3]), ("NVIDIA H200", et.encoder_candidates(32, None)[1])]
    # an entry whose configuration is no longer a candidate is ignored
    entries[0]["config"] = {**entries[0]["config"], "BLOCK_N": 512}
    table.write_text(json.dumps({"entries": entries}))
    tune._table.cache_clear()
    assert et.encoder_launch_config(768, 32, None, device_name=name) == default


@pytest.mark.parametrize("slow_first", [True, False])
def test_merge_keeps_the_faster_of_two_classes_of_one_key(slow_first, tmp_path):
    # k = 20 and k = 32 share K_PAD 32 (and bf16 / fp16 share the 16-bit precision): the faster wins
    r = _result()
    slow = {**r["classes"][0], "k": 20, "best": et.encoder_candidates(20, None)[1], "best_ms": 30.0}
    r["classes"].insert(0 if slow_first else 1, slow)
    (e,) = tune.merge(r, tmp_path / "t.json")
    assert e["k"] == 32 and e["ms"] == 20.0 and e["config"] == et.encoder_candidates(32, None)[2]


def test_merge_refuses_results_with_nothing_to_keep(tmp_path):
    table = tmp_path / "t.json"
    with pytest.raises(ValueError, match="interpreter"):
        tune.merge(_result(device=tune.CPU_DEVICE), table)
    tiny = {**_result(), "shape": {"d_in": 32, "n": 256, "batch": 64}}  # a dry gpu-check on a GPU
    with pytest.raises(ValueError, match="batch=64, n=256.*--force"):
        tune.merge(tiny, table)
    for change in ({"best": None}, {"default_ms": None}, {"all_correct": False}, {"complete": False}):
        r = _result()
        r["classes"][0].update(change)
        with pytest.raises(ValueError, match="no complete class"):
            tune.merge(r, table)
    assert not table.exists()
    assert tune.merge(tiny, table, force=True)[0]["shape"]["batch"] == 64
    partial = _result()
    partial["classes"][0]["complete"] = False  # --force takes a class cut short, if nothing in it failed
    assert tune.merge(partial, table, force=True)[0]["ms"] == 20.0
    assert tune.main(["--merge", str(tmp_path / "missing.json"), "--table", str(table)]) == 2


def _check_only_candidates(table) -> int:
    """Assert that every entry of the table file is a current candidate of its class and keys are unique;
    returns the number of entries."""
    entries = json.loads(table.read_text())["entries"]
    assert len({(e["device"], e["precision"], e["K_PAD"]) for e in entries}) == len(entries)
    for e in entries:
        prec = {"16-bit": None, "tf32": "tf32", "ieee": "ieee"}[e["precision"]]
        assert e["config"] in et.encoder_candidates(e["k"], prec), e
    return len(entries)


def test_shipped_table_holds_only_candidates(tmp_path):
    """Every entry of the committed table is a current candidate of its class (else it would be ignored). The
    table ships empty until a GPU run is merged, so the same check also reads a table `merge` wrote."""
    _check_only_candidates(tune.TABLE_PATH)
    table = tmp_path / "t.json"
    tune.merge(_result(), table)
    tune.merge(_result(device="NVIDIA H200", best=et.encoder_candidates(32, None)[1]), table)
    assert _check_only_candidates(table) == 2


def test_bad_arguments_exit_2_naming_the_value(capsys):
    for argv, words in ((["--k", "0"], "--k [0]"), (["--n", "0"], "--n must be >= 1"),
                        (["--warmup", "-1"], "--warmup must be >= 0")):
        with pytest.raises(SystemExit) as e:
            tune._parse(argv + ["--device", "cpu"])
        assert e.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize(("dtype", "want"), [("fp32", "ieee"), ("tf32", "tf32")])
def test_fp32_classes_set_torch_matmul_precision_for_the_run_only(dtype, want, monkeypatch):
    """--dtype fp32 / tf32 set torch's fp32 matmul precision while their classes run (what `dot_precision`
    reads on CUDA) and restore it after."""
    m = torch.backends.cuda.matmul
    before = m.fp32_precision
    seen = []
    monkeypatch.setattr(tune, "tune_class", lambda *a, **kw: seen.append(m.fp32_precision) or {"k": 4, "results": []})
    args = tune._parse(["--n", "64", "--batch", "8", "--d-in", "8", "--k", "4", "--dtype", dtype, "--device", "cpu"])
    result = tune.run(args)
    assert seen == [want] and m.fp32_precision == before
    assert result["classes"] == [{"dtype": dtype, "k": 4, "results": []}]
