"""hf://ORG/REPO[/SUBFOLDER][@REVISION] SAE paths, offline: a hub cache laid out as huggingface_hub lays one
out (its folder naming, content-addressed blobs, snapshot symlinks and refs; `scan_cache_dir` must
recognise it) serves `load_sae`, `resolve_sae_path` with a revision, and `sae-eval sae_path=hf://...`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers.sae import perturb_topk_family
from huggingface_hub.file_download import repo_folder_name

import sae_dist
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae
from sae_dist.sae.hub import parse_hf_path, resolve_sae_path
from sae_dist.sae.registry import build_sae

REPO = "tiny-org/tiny-saes"


def _cache_repo(cache: Path, commit: str, files: dict[str, bytes], ref: str) -> Path:
    """Put `files` {path in repo: bytes} into the hub cache at `cache` as snapshot `commit`, pointed to by
    refs/`ref`: blobs named by content hash, relative symlinks from the snapshot. Returns the snapshot dir."""
    repo = cache / repo_folder_name(repo_id=REPO, repo_type="model")
    snap = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


def _sae_files(tmp_path: Path, seed: int, hook: str) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=32, d_sae=64, k=4, normalize="none"), generator=g)
    with torch.no_grad():
        perturb_topk_family(sae, g)
    out = export_sae(sae, tmp_path / f"export{seed}", hook_name=hook, model_name="tiny", normalize="none")
    return {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    main = {f"layer1/{k}": v for k, v in _sae_files(tmp_path, 1, "blocks.1.hook_resid_post").items()}
    v1 = {f"layer1/{k}": v for k, v in _sae_files(tmp_path, 2, "blocks.1.hook_resid_post").items()}
    snaps = {"main": _cache_repo(cache, "a" * 40, main, "main"), "v1": _cache_repo(cache, "b" * 40, v1, "v1")}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache, snaps


def test_hub_paths_load_from_the_cache_offline(hub_cache, tmp_path):
    cache, snaps = hub_cache
    (repo,) = huggingface_hub.scan_cache_dir(cache).repos  # huggingface_hub recognises the layout
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {"a" * 40, "b" * 40}
    assert resolve_sae_path(f"hf://{REPO}/layer1") == snaps["main"] / "layer1"
    assert resolve_sae_path(f"hf://{REPO}/layer1@v1") == snaps["v1"] / "layer1"
    sae = sae_dist.load_sae(f"hf://{REPO}/layer1")
    local = sae_dist.load_sae(snaps["main"] / "layer1")
    torch.testing.assert_close(sae.W_enc, local.W_enc, rtol=0, atol=0)
    assert not torch.equal(sae_dist.load_sae(f"hf://{REPO}/layer1@v1").W_enc, sae.W_enc)
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
        resolve_sae_path("hf://tiny-org/not-cached/layer1")
    assert resolve_sae_path(tmp_path) == tmp_path  # a local directory is itself


@pytest.mark.parametrize("bad", ["hf://only-org", "hf://org/repo@", "hf:///"])
def test_bad_hub_paths_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="hf://ORG/REPO\\[/SUBFOLDER\\]\\[@REVISION\\]"):
        parse_hf_path(bad)
    assert parse_hf_path("hf://o/r/a/b@dev") == ("o/r", "a/b", "dev")


def test_sae_eval_takes_a_hub_path(hub_cache, tiny_lm_dir, tmp_path, console_script):
    from helpers.synthetic import tiny_corpus

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(n_files=8)))
    proc = console_script("sae-eval", f"run_dir={tmp_path / 'e'}", f"sae_path=hf://{REPO}/layer1@v1", "device=cpu",
                          f"model.name={tiny_lm_dir}", "data.dataset=json", f"data.data_files={corpus}",
                          "data.ctx_len=16", "data.eval_fraction=0.5", "eval.eval_tokens=256", "eval.batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert ev["hook_name"] == "blocks.1.hook_resid_post" and 0 < ev["fvu"]


def _run_dir(tmp_path: Path) -> Path:
    """A run directory as sae-train leaves it: sae/ export + training_state.json, eval.json."""
    run = tmp_path / "run"
    files = _sae_files(tmp_path, 3, "blocks.1.hook_resid_post")
    (run / "sae").mkdir(parents=True)
    for name, data in files.items():
        (run / "sae" / name).write_bytes(data)
    (run / "sae" / "training_state.json").write_text(json.dumps(
        {"tokens_trained": 12345, "sae_cfg": {"d_sae": 64, "k": 4}, "trainer_cfg": {"lr": 0.001}, "seed": 7}))
    (run / "sae" / "tree.json").write_text('{"parents": [-1]}')  # an architecture's own file (sae=tree)
    (run / "eval.json").write_text(json.dumps({"fvu": 0.1234, "l0": 4.0, "ce_loss_score": 0.875, "model": "tiny"}))
    return run


def test_push_folder_and_model_card(tmp_path):
    from sae_dist.sae import hub

    run = _run_dir(tmp_path)
    folder = hub.push_folder(run, tmp_path / "up")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "cfg.json", "eval.json", "sae_weights.safetensors",
                                                       "training_state.json", "tree.json"]
    assert (folder / "tree.json").read_text() == (run / "sae" / "tree.json").read_text()
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens\n") and "| fvu | 0.1234 |" in card
    assert "| ce_loss_score | 0.875 |" in card and "| training tokens | 12345 |" in card and '"lr": 0.001' in card
    assert "blocks.1.hook_resid_post" in card
    torch.testing.assert_close(sae_dist.load_sae(folder).W_dec, sae_dist.load_sae(run / "sae").W_dec, rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        hub.push_folder(run, tmp_path / "up")
    with pytest.raises(ValueError, match="max_shard_size='60GB' is over the hub's 50 GB per file"):
        hub.push_folder(run, tmp_path / "big", max_shard_size="60GB")
    with pytest.raises(ValueError, match="cannot hold one latent"):  # 260 bytes a latent, 128 of b_dec
        hub.push_folder(run, tmp_path / "tiny", max_shard_size=387)
    assert not (tmp_path / "tiny").exists()  # nothing half-written is left


class _Api:
    """Records what `push` asks of huggingface_hub.HfApi (no network)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, folder_path, **kw):
        self.calls.append(("upload_folder", sorted(p.name for p in Path(folder_path).iterdir()), kw,
                           (Path(folder_path) / "README.md").read_text()))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()


def test_push_uploads_the_folder_and_sae_push_checks_its_arguments(tmp_path, console_script):
    from sae_dist.sae.hub import push

    run, api = _run_dir(tmp_path), _Api()
    assert push(run, "me/tiny-sae", private=True, api=api) == "https://huggingface.co/me/tiny-sae/commit/abc"
    (create, upload) = api.calls
    assert create == ("create_repo", "me/tiny-sae", {"repo_type": "model", "private": True, "exist_ok": True})
    assert upload[1] == ["README.md", "cfg.json", "eval.json", "sae_weights.safetensors", "training_state.json",
                         "tree.json"]
    assert upload[2]["repo_id"] == "me/tiny-sae" and 'load_sae("hf://me/tiny-sae")' in upload[3]
    proc = console_script("sae-push", f"run_dir={run}", "dry_run=true")
    assert proc.returncode == 0 and (run / "hub_upload" / "README.md").is_file(), proc.stderr
    proc = console_script("sae-push", f"run_dir={run}", "repo=me/x")
    assert proc.returncode == 2 and "unknown: ['repo']" in proc.stderr
    proc = console_script("sae-push", f"run_dir={run}", "repo_id=me/x", "me/y")  # a bare word is no option
    assert proc.returncode == 2 and "unknown: ['me/y']" in proc.stderr


# _run_dir's export: d_in 32, d_sae 64 (float32): 260 bytes a latent, b_dec 128 bytes, 16768 in all; at most 5000
# bytes a shard: (5000 - 128) // 260 = 18 latents -> 4 shards of 16
SHARDS = [f"sae_weights-0000{i}-of-00004.safetensors" for i in range(1, 5)]
SHARDED_UPLOAD = ["README.md", "cfg.json", "eval.json", *SHARDS, "sae_weights.safetensors.index.json",
                  "training_state.json", "tree.json"]


def test_a_big_export_is_pushed_as_shards_that_load_sae_reads(tmp_path, capsys):
    from sae_dist.sae.hub import push, push_main

    run, api = _run_dir(tmp_path), _Api()
    push(run, "me/big-sae", api=api, max_shard_size="5KB")
    (_, (_, names, _, card)) = api.calls
    assert names == SHARDED_UPLOAD
    assert "library_name" not in card and "sharded along the latents into 4 files" in card
    assert "SAELens reads a single `sae_weights.safetensors` only" in card and 'load_sae("hf://me/big-sae")' in card
    assert push_main([f"run_dir={run}", "repo_id=me/big-sae", "dry_run=true", "max_shard_size=5000"]) == 0
    folder = run / "hub_upload"
    assert sorted(p.name for p in folder.iterdir()) == SHARDED_UPLOAD and (folder / "README.md").read_text() == card
    index = json.loads((folder / "sae_weights.safetensors.index.json").read_text())
    assert index["latent_ranges"] == {f: [16 * i, 16 * (i + 1)] for i, f in enumerate(SHARDS)}
    assert index["weight_map"] == {"b_dec": SHARDS[0]} and index["metadata"]["total_size"] == 16768
    one, sharded = sae_dist.load_sae(run / "sae"), sae_dist.load_sae(folder)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    z = one.encode(x)
    assert torch.equal(sharded.encode(x), z) and torch.equal(sharded.decode(z), one.decode(z))
    assert push_main([f"run_dir={run}", "dry_run=true", "max_shard_size=5 gigs"]) == 2
    assert "max_shard_size='5 gigs': give bytes" in capsys.readouterr().err


def test_sharded_weights_load_from_the_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub.utils import filter_repo_objects

    from sae_dist.sae import hub

    folder = hub.push_folder(_run_dir(tmp_path), tmp_path / "up", max_shard_size=5000)
    files = {f"big/{p.name}": p.read_bytes() for p in folder.iterdir()}
    cache = tmp_path / "hub"
    snap = _cache_repo(cache, "c" * 40, {**files, "other/cfg.json": b"{}"}, "main")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    sae, local = sae_dist.load_sae(f"hf://{REPO}/big"), sae_dist.load_sae(tmp_path / "run" / "sae")
    assert resolve_sae_path(f"hf://{REPO}/big") == snap / "big"
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(local, name)), name
    # the patterns snapshot_download filters the repository's files with, by huggingface_hub's own filter
    assert sorted(filter_repo_objects(list(files) + ["other/cfg.json", "big2/cfg.json"],
                                      allow_patterns=hub._allow_patterns("big"))) == sorted(files)
