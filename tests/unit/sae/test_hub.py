"""hf://ORG/REPO[/SUBFOLDER][@REVISION] SAE paths: huggingface_hub's `snapshot_download` fills a hub cache in a
temp dir from a local stand-in for the hub (tests/helpers/hub_server.py: a repository with revisions main and
v1 and a sharded SAE, served over HTTP on 127.0.0.1), only the subfolder's files; `load_sae` returns the
served SAEs exactly; then, offline and with the server stopped, the same paths load from that cache alone
(`scan_cache_dir` recognises it) and `sae-eval sae_path=hf://...` runs off it. Also `sae-push`'s folder,
model card, shards and calls to `HfApi` (through a recorder, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers.hub_server import LocalHub, use_local_hub
from helpers.sae import perturb_topk_family
from huggingface_hub.file_download import repo_folder_name

import sae_dist
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae
from sae_dist.sae.hub import parse_hf_path, push_folder, resolve_sae_path
from sae_dist.sae.registry import build_sae

REPO = "tiny-org/tiny-saes"


def _export(out: Path, seed: int) -> Path:
    """An exported SAE (d_in 32, d_sae 64, k 4; seed `seed`) at blocks.1.hook_resid_post in `out`."""
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=32, d_sae=64, k=4, normalize="none"), generator=g)
    with torch.no_grad():
        perturb_topk_family(sae, g)
    return export_sae(sae, out, hook_name="blocks.1.hook_resid_post", model_name="tiny", normalize="none")


def _in(sub: str, folder: Path) -> dict[str, bytes]:
    """{f"{sub}/{name}": bytes} of the files in `folder`."""
    return {f"{sub}/{p.name}": p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """REPO on a local hub with huggingface_hub pointed at it, online, its cache in tmp_path/hub. At main: an SAE
    in layer1/ (seed 1), `_run_dir`'s SAE in big/ as 4 shards + index (`push_folder`), a big2/cfg.json that
    big/'s allow_patterns must not take; at v1 and v2: another SAE in layer1/ (seed 2). Yields the LocalHub
    and {hf:// path: the unsharded export it serves}."""
    run = _run_dir(tmp_path)
    sharded = push_folder(run, tmp_path / "up", max_shard_size=5000)
    main, v1 = _export(tmp_path / "main", 1), _export(tmp_path / "v1", 2)
    files = {"main": {**_in("layer1", main), **_in("big", sharded), "big2/cfg.json": b"{}"}, "v1": _in("layer1", v1)}
    server = LocalHub({REPO: {**files, "v2": files["v1"]}})
    use_local_hub(monkeypatch, server.endpoint, tmp_path / "hub")
    yield server, {f"hf://{REPO}/layer1": main, f"hf://{REPO}/layer1@v1": v1, f"hf://{REPO}/big": run / "sae"}
    server.stop()


def _assert_same_sae(a, b, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"{what}: {name}"


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_hub_paths_download_into_the_cache_then_load_offline(hub, tmp_path, monkeypatch):
    server, served = hub
    cache = tmp_path / "hub"
    assert not torch.equal(sae_dist.load_sae(served[f"hf://{REPO}/layer1"]).W_enc,
                           sae_dist.load_sae(served[f"hf://{REPO}/layer1@v1"]).W_enc)  # the revisions differ
    for path, local in served.items():  # online: snapshot_download fills the cache
        _assert_same_sae(sae_dist.load_sae(path), sae_dist.load_sae(local), path)
    with pytest.raises(huggingface_hub.errors.RevisionNotFoundError):
        resolve_sae_path(f"hf://{REPO}/layer1@v3")
    commits = server.commits[REPO]
    snaps = {rev: cache / repo_folder_name(repo_id=REPO, repo_type="model") / "snapshots" / commits[rev]
             for rev in ("main", "v1")}
    main_files = server.repos[REPO]["main"]
    assert _files_under(snaps["main"]) == sorted(p for p in main_files if not p.startswith("big2/"))
    assert _files_under(snaps["v1"]) == sorted(server.repos[REPO]["v1"])
    (repo,) = huggingface_hub.scan_cache_dir(cache).repos  # huggingface_hub's own view of what it wrote
    assert repo.repo_id == REPO and {(r.commit_hash, *r.refs) for r in repo.revisions} == {
        (commits["main"], "main"), (commits["v1"], "v1")}

    server.stop()
    use_local_hub(monkeypatch, server.endpoint, cache, offline=True)
    for path, local in served.items():
        _assert_same_sae(sae_dist.load_sae(path), sae_dist.load_sae(local), f"offline {path}")
    assert resolve_sae_path(f"hf://{REPO}/layer1") == snaps["main"] / "layer1"
    assert resolve_sae_path(f"hf://{REPO}/layer1@v1") == snaps["v1"] / "layer1"
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
        resolve_sae_path(f"hf://{REPO}/layer1@v2")  # on the hub, never fetched
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
        resolve_sae_path("hf://tiny-org/not-cached/layer1")
    assert resolve_sae_path(tmp_path) == tmp_path  # a local directory is itself


@pytest.mark.parametrize("bad", ["hf://only-org", "hf://org/repo@", "hf:///"])
def test_bad_hub_paths_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="hf://ORG/REPO\\[/SUBFOLDER\\]\\[@REVISION\\]"):
        parse_hf_path(bad)
    assert parse_hf_path("hf://o/r/a/b@dev") == ("o/r", "a/b", "dev")


def test_sae_eval_takes_a_hub_path(hub, tiny_lm_dir, tmp_path, console_script, monkeypatch):
    from helpers.synthetic import tiny_corpus

    server, _ = hub
    resolve_sae_path(f"hf://{REPO}/layer1@v1")  # into the cache, then offline from it
    server.stop()
    use_local_hub(monkeypatch, server.endpoint, tmp_path / "hub", offline=True)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(n_files=8)))
    proc = console_script("sae-eval", f"run_dir={tmp_path / 'e'}", f"sae_path=hf://{REPO}/layer1@v1", "device=cpu",
                          f"model.name={tiny_lm_dir}", "data.dataset=json", f"data.data_files={corpus}",
                          "data.ctx_len=16", "data.eval_fraction=0.5", "eval.eval_tokens=256", "eval.batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert ev["hook_name"] == "blocks.1.hook_resid_post" and 0 < ev["fvu"]


def _run_dir(tmp_path: Path) -> Path:
    """A run directory as sae-train leaves it: sae/ export (seed 3) + training_state.json, eval.json."""
    run = tmp_path / "run"
    _export(run / "sae", 3)
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
    # 16768 bytes of tensors fit one file of that size (the file's header aside): no shards, SAELens can read it
    folder = hub.push_folder(run, tmp_path / "one", max_shard_size=16768)
    assert (folder / "sae_weights.safetensors").is_file()
    assert not (folder / "sae_weights.safetensors.index.json").exists()
    assert (run / "sae" / "sae_weights.safetensors").stat().st_size > 16768


def test_push_keeps_every_file_within_the_hubs_limit_headers_included(tmp_path, monkeypatch):
    """At max_shard_size = the hub's per-file limit, the tensor data alone fits one file, its header does not: the
    weights go as shards, each file (header included) within the limit, and load as the export."""
    from safetensors.torch import load_file

    from sae_dist.sae import hub

    run = _run_dir(tmp_path)
    weights = run / "sae" / "sae_weights.safetensors"
    data = sum(t.numel() * t.element_size() for t in load_file(weights).values())
    assert data < weights.stat().st_size  # the header
    monkeypatch.setattr(hub, "HUB_MAX_FILE_BYTES", data)
    folder = push_folder(run, tmp_path / "up", max_shard_size=data)
    shards = sorted(folder.glob("sae_weights-*.safetensors"))
    assert len(shards) == 2 and not (folder / "sae_weights.safetensors").exists()
    assert max(p.stat().st_size for p in folder.iterdir()) <= data
    torch.testing.assert_close(sae_dist.load_sae(folder).W_enc, sae_dist.load_sae(run / "sae").W_enc, rtol=0, atol=0)


class _Api:
    """Records what `push` asks of huggingface_hub.HfApi (no network)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, *, folder_path, **kw):
        weights = Path(folder_path) / "sae_weights.safetensors"
        self.folder, self.inodes = Path(folder_path), (weights.stat().st_ino,) if weights.is_file() else ()
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
    # built inside the run directory (its file system), so the uploaded weights are the export's file itself (a
    # hard link), not a copy; nothing is left behind
    assert run in api.folder.parents
    assert api.inodes == ((run / "sae" / "sae_weights.safetensors").stat().st_ino,)
    assert not list(run.glob(".sae_push_*"))
    api = _Api()  # a branch is created (from the default one) before the upload to it
    push(run, "me/tiny-sae", revision="v1", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[1][2] == {"branch": "v1", "repo_type": "model", "exist_ok": True}
    assert api.calls[2][2]["revision"] == "v1"
    proc = console_script("sae-push", f"run_dir={run}", "dry_run=true")
    assert proc.returncode == 0 and (run / "hub_upload" / "README.md").is_file(), proc.stderr
    proc = console_script("sae-push", f"run_dir={run}", "dry_run=true")  # the folder exists: refused, kept
    assert proc.returncode == 2 and "hub_upload" in proc.stderr and (run / "hub_upload" / "README.md").is_file()
    proc = console_script("sae-push", f"run_dir={run}", "repo_id=me/x", "private=ture")  # never read as false
    assert proc.returncode == 2 and "private='ture': give true or false" in proc.stderr
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
