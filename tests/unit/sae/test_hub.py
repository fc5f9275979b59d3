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
    (run / "eval.json").write_text(json.dumps({"fvu": 0.1234, "l0": 4.0, "ce_loss_score": 0.875, "model": "tiny"}))
    return run


def test_push_folder_and_model_card(tmp_path, monkeypatch):
    from sae_dist.sae import hub

    run = _run_dir(tmp_path)
    folder = hub.push_folder(run, tmp_path / "up")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "cfg.json", "eval.json", "sae_weights.safetensors",
                                                       "training_state.json"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens\n") and "| fvu | 0.1234 |" in card
    assert "| ce_loss_score | 0.875 |" in card and "| training tokens | 12345 |" in card and '"lr": 0.001' in card
    assert "blocks.1.hook_resid_post" in card
    torch.testing.assert_close(sae_dist.load_sae(folder).W_dec, sae_dist.load_sae(run / "sae").W_dec, rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        hub.push_folder(run, tmp_path / "up")
    monkeypatch.setattr(hub, "HUB_MAX_FILE_BYTES", 1000)
    with pytest.raises(ValueError, match="over the hub's 50 GB per file"):
        hub.push_folder(run, tmp_path / "big")


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
    assert upload[1] == ["README.md", "cfg.json", "eval.json", "sae_weights.safetensors", "training_state.json"]
    assert upload[2]["repo_id"] == "me/tiny-sae" and 'load_sae("hf://me/tiny-sae")' in upload[3]
    proc = console_script("sae-push", f"run_dir={run}", "dry_run=true")
    assert proc.returncode == 0 and (run / "hub_upload" / "README.md").is_file(), proc.stderr
    proc = console_script("sae-push", f"run_dir={run}", "repo=me/x")
    assert proc.returncode == 2 and "unknown: ['repo']" in proc.stderr
    proc = console_script("sae-push", f"run_dir={run}", "repo_id=me/x", "me/y")  # a bare word is no option
    assert proc.returncode == 2 and "unknown: ['me/y']" in proc.stderr
