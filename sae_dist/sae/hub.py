"""SAEs on the Hugging Face hub: loading by ``hf://ORG/REPO[/SUBFOLDER][@REVISION]``, and `sae-push`.

`resolve_sae_path` turns such a path into a local directory through `huggingface_hub.snapshot_download`
(only the files under SUBFOLDER; its cache, revisions and offline mode: with ``HF_HUB_OFFLINE=1`` only the
cache is read). Every command and function that takes an SAE directory (`sae_dist.load_sae`, `sae-eval
sae_path=`, `sae-browse sae_path=`) accepts one.

`sae-push run_dir=DIR repo_id=ORG/NAME` (`push`) uploads a run's export with `huggingface_hub.HfApi`: the
folder `push_folder` lays out (cfg.json, sae_weights.safetensors, eval.json, training_state.json and a model
card whose front matter says ``library_name: saelens``). Weights files over the hub's 50 GB per-file limit
are refused: sharded uploads are not implemented.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["HF_PREFIX", "parse_hf_path", "resolve_sae_path", "push_folder", "model_card", "push", "push_main"]

HF_PREFIX = "hf://"


def parse_hf_path(path: str) -> tuple[str, str, str | None]:
    """(repo_id, subfolder ("" for the repository's root), revision or None) of ``hf://ORG/REPO[/SUB][@REV]``.
    ValueError naming the path when it has no ORG/REPO."""
    spec, at, revision = path.removeprefix(HF_PREFIX).partition("@")
    parts = [p for p in spec.split("/") if p]
    if len(parts) < 2 or (at and not revision):
        raise ValueError(f"{path!r}: a hub SAE path is hf://ORG/REPO[/SUBFOLDER][@REVISION], "
                         "e.g. hf://jbloom/GPT2-Small-SAEs-Reformatted/blocks.8.hook_resid_pre")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def resolve_sae_path(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory for the SAE at `path`: `path` itself, or for an ``hf://`` path the folder that
    `huggingface_hub.snapshot_download` returns (files under the subfolder only; `cache_dir`: the hub
    cache, default huggingface_hub's). Errors are huggingface_hub's (e.g. offline without a cached copy)."""
    s = os.fspath(path)
    if not s.startswith(HF_PREFIX):
        return Path(s)
    from huggingface_hub import snapshot_download

    repo_id, sub, revision = parse_hf_path(s)
    local = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                              allow_patterns=[f"{sub}/*"] if sub else None)
    return Path(local, sub) if sub else Path(local)


#: the files of a run directory a push carries, besides the export's cfg.json and weights
_RUN_FILES = ("eval.json", "sae/training_state.json")
#: the eval.json numbers the model card shows, in order
_CARD_METRICS = ("fvu", "explained_variance", "l0", "dead_fraction", "ce_loss_score", "kl_div", "ce_loss_clean",
                 "ce_loss_sae")
#: the hub's limit on one file; a bigger weights file is refused (sharded uploads: not yet)
HUB_MAX_FILE_BYTES = 50 * 10**9


def push_folder(run_dir: str | os.PathLike, out_dir: str | os.PathLike, repo_id: str = "ORG/NAME") -> Path:
    """Lay out in `out_dir` (a new directory) what `push` uploads to `repo_id` for the run `run_dir`: the export
    (`sae/cfg.json`, `sae/sae_weights.safetensors`), `eval.json` and `training_state.json` when present, and a
    model card `README.md` (front matter with ``library_name: saelens`` so the hub lists it as a SAELens SAE,
    the eval.json metrics, the training configuration, how to load it). FileNotFoundError without an export;
    ValueError for a weights file over the hub's 50 GB file limit. Returns `out_dir`."""
    import shutil

    run, out = Path(run_dir), Path(out_dir)
    sae = run / "sae"
    weights = sae / "sae_weights.safetensors"
    if not (sae / "cfg.json").is_file() or not weights.is_file():
        raise FileNotFoundError(f"{run}: no export under sae/ (cfg.json and sae_weights.safetensors); train first")
    if weights.stat().st_size > HUB_MAX_FILE_BYTES:
        raise ValueError(f"{weights} is {weights.stat().st_size / 1e9:.1f} GB, over the hub's 50 GB per file: "
                         "sharded uploads are not supported yet; upload the directory with git-xet or another store")
    out.mkdir(parents=True)
    for f in (sae / "cfg.json", weights, *(run / name for name in _RUN_FILES)):
        if f.is_file():
            shutil.copy2(f, out / f.name)
    (out / "README.md").write_text(model_card(out, repo_id))
    return out


def _json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def model_card(folder: Path, repo_id: str) -> str:
    """The hub model card (README.md) of a push folder for `repo_id`: front matter, metrics, configuration,
    usage."""
    from sae_dist.sae.sae_files import read_sae_cfg

    cfg = read_sae_cfg(folder)  # hook_name, model_name, ... at the top level, whatever the layout
    ev, st = _json_or_empty(folder / "eval.json"), _json_or_empty(folder / "training_state.json")
    base = cfg.get("model_name") or ""
    front = ["---", "library_name: saelens", "tags:", "- sae-dist", "- sparse-autoencoder", "- saelens"]
    if "/" in base and not base.startswith(("/", ".")):  # a hub model id
        front.append(f"base_model: {base}")
    front.append("---")
    about = {"architecture": cfg.get("architecture"), "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"),
             "k": cfg.get("k"), "model": base, "hook_name": cfg.get("hook_name"),
             "dataset": cfg.get("dataset_path"), "context_size": cfg.get("context_size"),
             "training tokens": st.get("tokens_trained", cfg.get("training_tokens"))}
    lines = [*front, "", f"# {cfg.get('architecture', 'SAE')} SAE on {base or 'an LM'} at {cfg.get('hook_name')}", "",
             "Trained with sae-dist. Files in SAELens' layout (`cfg.json`, "
             "`sae_weights.safetensors`).", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in about.items() if v is not None]
    if ev:
        lines += ["", "## Evaluation (eval.json)", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {ev[k]:.4g} |" for k in _CARD_METRICS if isinstance(ev.get(k), (int, float))]
    if st.get("trainer_cfg"):
        lines += ["", "## Training configuration", "", "```json", json.dumps(
            {"sae": st.get("sae_cfg"), "trainer": st.get("trainer_cfg"), "seed": st.get("seed")}, indent=2), "```"]
    lines += ["", "## Usage", "", "```python", "import sae_dist", f'sae = sae_dist.load_sae("hf://{repo_id}")', "```",
              "", "SAELens: `SAE.load_from_disk` on a download of this repository.", ""]
    return "\n".join(lines)


def push(run_dir: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         api=None) -> str:
    """Upload the run's export (`push_folder`) to the hub model repository `repo_id` (created if missing) with
    `huggingface_hub.HfApi` (`api`: another client, e.g. with a token); returns the commit URL."""
    import tempfile

    from huggingface_hub import HfApi

    api = api or HfApi()
    with tempfile.TemporaryDirectory(prefix="sae_push_") as d:
        folder = push_folder(run_dir, Path(d) / "upload", repo_id)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=f"sae-dist export of {Path(run_dir).name}")
    return str(getattr(info, "commit_url", info))


def push_main(argv: list[str] | None = None) -> int:
    """`sae-push run_dir=DIR repo_id=ORG/NAME [private=true] [revision=BRANCH] [dry_run=true]`: upload a run's
    export with a model card (`push`); dry_run writes the folder to DIR/hub_upload instead."""
    import sys

    pairs = [a.partition("=") for a in (sys.argv[1:] if argv is None else argv)]
    args = {k: v for k, eq, v in pairs if eq}
    unknown = set(args) - {"run_dir", "repo_id", "private", "revision", "dry_run"} | {k for k, eq, _ in pairs if not eq}
    if unknown or "run_dir" not in args or ("repo_id" not in args and args.get("dry_run") != "true"):
        print("usage: sae-push run_dir=DIR repo_id=ORG/NAME [private=true] [revision=BRANCH] [dry_run=true]"
              + (f"; unknown: {sorted(unknown)}" if unknown else ""), file=sys.stderr)
        return 2
    if args.get("dry_run") == "true":
        folder = push_folder(args["run_dir"], Path(args["run_dir"]) / "hub_upload", args.get("repo_id", "ORG/NAME"))
        print(f"sae-push: wrote {folder} (dry run: nothing uploaded)")
        return 0
    url = push(args["run_dir"], args["repo_id"], private=args.get("private") == "true", revision=args.get("revision"))
    print(f"sae-push: {url}")
    return 0
