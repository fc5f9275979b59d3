"""SAEs on the Hugging Face hub: loading by ``hf://ORG/REPO[/SUBFOLDER][@REVISION]``, and `sae-push`.

`resolve_sae_path` turns such a path into a local directory through `huggingface_hub.snapshot_download`
(only the files under SUBFOLDER; its cache, revisions and offline mode: with ``HF_HUB_OFFLINE=1`` only the
cache is read). Every command and function that takes an SAE directory (`sae_dist.load_sae`, `sae-eval
sae_path=`, `sae-browse sae_path=`) accepts one.

`sae-push run_dir=DIR repo_id=ORG/NAME` (`push`) uploads a run's export with `huggingface_hub.HfApi`: the
folder `push_folder` lays out (cfg.json, sae_weights.safetensors, eval.json, training_state.json and a model
card whose front matter says ``library_name: saelens``). Weights over `max_shard_size` (default
`sae_dist.sae.shards.DEFAULT_MAX_SHARD_SIZE`; at most the hub's 50 GB per-file limit) are uploaded as
latent-range shards with an index (`sae_dist.sae.shards`), which `sae_dist.load_sae` reads and SAELens
does not (its loader opens sae_weights.safetensors only); the model card then says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sae_dist.sae.shards import (
    DEFAULT_MAX_SHARD_SIZE,
    SHARD_INDEX_FILENAME,
    parse_shard_size,
    plan_shards,
    write_shards,
)

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
    local = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=_allow_patterns(sub))
    return Path(local, sub) if sub else Path(local)


def _allow_patterns(sub: str) -> list[str] | None:
    """snapshot_download's allow_patterns for the SAE in `sub`: every file under it (cfg.json, the weights
    or all the shards and their index, tree.json, ...); None (the whole repository) for the root."""
    return [f"{sub}/*"] if sub else None


#: the files of a run directory a push carries besides its export's (sae/: cfg.json, weights, training_state.json)
_RUN_FILES = ("eval.json",)
#: the eval.json numbers the model card shows, in order
_CARD_METRICS = ("fvu", "explained_variance", "l0", "dead_fraction", "ce_loss_score", "kl_div", "ce_loss_clean",
                 "ce_loss_sae")
#: the hub's limit on one file: the largest max_shard_size
HUB_MAX_FILE_BYTES = 50 * 10**9


def push_folder(run_dir: str | os.PathLike, out_dir: str | os.PathLike, repo_id: str = "ORG/NAME",
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Lay out in `out_dir` (a new directory) what `push` uploads to `repo_id` for the run `run_dir`: the export
    (`sae/cfg.json`, `sae/sae_weights.safetensors` and the architecture's other files, e.g. a tree's
    `tree.json`), `eval.json` and `training_state.json` when present, and a
    model card `README.md` (front matter with ``library_name: saelens`` so the hub lists it as a SAELens SAE,
    the eval.json metrics, the training configuration, how to load it).

    max_shard_size: bytes or "20GB"-like (`sae_dist.sae.shards.parse_shard_size`) of tensor data per file, at
    most the hub's 50 GB per file; near that limit the files' headers count too, so no file exceeds it. Weights
    whose tensors need more than one file of that size are written as latent-range shards +
    `sae_weights.safetensors.index.json` (`sae_dist.sae.shards.write_shards`, streamed from the export one shard
    at a time) instead of one file; the model card then says the weights load with `sae_dist.load_sae` (SAELens
    reads a single file only). The other files are hard links to the run's (copies across file systems).
    FileNotFoundError without an export; FileExistsError when `out_dir` exists; ValueError for a max_shard_size
    over 50 GB or below one latent's bytes (nothing is left in `out_dir` then). Returns `out_dir`."""
    import shutil

    from sae_dist.sae.sae_files import WEIGHTS_FILENAME, read_sae_cfg

    run, out = Path(run_dir), Path(out_dir)
    sae = run / "sae"
    weights = sae / WEIGHTS_FILENAME
    if not (sae / "cfg.json").is_file() or not weights.is_file():
        raise FileNotFoundError(f"{run}: no export under sae/ (cfg.json and sae_weights.safetensors); train first")
    limit = parse_shard_size(max_shard_size)
    if limit > HUB_MAX_FILE_BYTES:
        raise ValueError(f"max_shard_size={max_shard_size!r} is over the hub's 50 GB per file; give at most 50GB "
                         f"(default {DEFAULT_MAX_SHARD_SIZE})")
    out.mkdir(parents=True)
    try:
        export_files = [f for f in sae.iterdir() if f.is_file() and not f.name.startswith(WEIGHTS_FILENAME)]
        for f in (*export_files, *(run / name for name in _RUN_FILES)):
            if f.is_file() and not f.name.endswith(".tmp"):
                _link_or_copy(f, out / f.name)
        d_sae = int(read_sae_cfg(sae)["d_sae"])
        cap = min(limit, HUB_MAX_FILE_BYTES - _header_bytes(weights))  # every file, header included, <= 50 GB
        if len(plan_shards(weights, d_sae, cap)["latent_ranges"]) > 1:
            write_shards(weights, out, d_sae, cap)
        else:
            _link_or_copy(weights, out / weights.name)
        (out / "README.md").write_text(model_card(out, repo_id))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _header_bytes(weights: Path) -> int:
    """Bytes of the safetensors file `weights` before its tensor data (the 8-byte length and the JSON header). A
    shard's header is no longer: it names the same tensors or fewer, with no larger shapes or offsets and no
    metadata."""
    with open(weights, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (no second copy of a weights file of up to 50 GB), else a copy."""
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _weights_note(folder: Path) -> tuple[list[str], str]:
    """(front matter lines naming the library, the model card's sentence on the weights files) of a push
    folder: SAELens' for one sae_weights.safetensors; for shards, sae-dist's reader only."""
    index = _json_or_empty(folder / SHARD_INDEX_FILENAME)
    if not index:
        return (["library_name: saelens", "tags:", "- sae-dist", "- sparse-autoencoder", "- saelens"],
                "Files in SAELens' layout (`cfg.json`, `sae_weights.safetensors`).")
    files = list(index["latent_ranges"])
    return (["tags:", "- sae-dist", "- sparse-autoencoder"],
            f"Files: `cfg.json` in SAELens' layout; the weights are sharded along the latents into {len(files)} "
            f"files (`{files[0]}` ... `{files[-1]}`, index `{SHARD_INDEX_FILENAME}`: each file holds a "
            "contiguous latent range of every tensor) and load with `sae_dist.load_sae` (below). SAELens reads "
            "a single `sae_weights.safetensors` only.")


def model_card(folder: Path, repo_id: str) -> str:
    """The hub model card (README.md) of a push folder for `repo_id`: front matter, metrics, configuration,
    usage; for sharded weights (`_weights_note`) neither ``library_name: saelens`` nor SAELens' usage."""
    from sae_dist.sae.sae_files import read_sae_cfg

    cfg = read_sae_cfg(folder)  # hook_name, model_name, ... at the top level, whatever the layout
    ev, st = _json_or_empty(folder / "eval.json"), _json_or_empty(folder / "training_state.json")
    base = cfg.get("model_name") or ""
    library, files_note = _weights_note(folder)
    front = ["---", *library]
    if "/" in base and not base.startswith(("/", ".")):  # a hub model id
        front.append(f"base_model: {base}")
    front.append("---")
    about = {"architecture": cfg.get("architecture"), "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"),
             "k": cfg.get("k"), "model": base, "hook_name": cfg.get("hook_name"),
             "dataset": cfg.get("dataset_path"), "context_size": cfg.get("context_size"),
             "training tokens": st.get("tokens_trained", cfg.get("training_tokens"))}
    lines = [*front, "", f"# {cfg.get('architecture', 'SAE')} SAE on {base or 'an LM'} at {cfg.get('hook_name')}", "",
             f"Trained with sae-dist. {files_note}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in about.items() if v is not None]
    if ev:
        lines += ["", "## Evaluation (eval.json)", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {ev[k]:.4g} |" for k in _CARD_METRICS if isinstance(ev.get(k), (int, float))]
    if st.get("trainer_cfg"):
        lines += ["", "## Training configuration", "", "```json", json.dumps(
            {"sae": st.get("sae_cfg"), "trainer": st.get("trainer_cfg"), "seed": st.get("seed")}, indent=2), "```"]
    lines += ["", "## Usage", "", "```python", "import sae_dist", f'sae = sae_dist.load_sae("hf://{repo_id}")', "```",
              ""]
    if not (folder / SHARD_INDEX_FILENAME).is_file():
        lines += ["SAELens: `SAE.load_from_disk` on a download of this repository.", ""]
    return "\n".join(lines)


def push(run_dir: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, api=None) -> str:
    """Upload the run's export (`push_folder`, weights sharded above `max_shard_size`) to the hub model
    repository `repo_id` (created if missing) with `huggingface_hub.HfApi` (`api`: another client, e.g. with a
    token); `revision`: a branch, created from the default branch when missing. Returns the commit URL."""
    import tempfile

    from huggingface_hub import HfApi

    api = api or HfApi()
    # inside the run directory, on its file system, so that the weights are hard-linked, not copied (up to 50 GB)
    here = run_dir if os.access(run_dir, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix=".sae_push_", dir=here) as d:
        folder = push_folder(run_dir, Path(d) / "upload", repo_id, max_shard_size)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=f"sae-dist export of {Path(run_dir).name}")
    return str(getattr(info, "commit_url", info))


_USAGE = ("usage: sae-push run_dir=DIR repo_id=ORG/NAME [private=true] [revision=BRANCH] [max_shard_size=20GB] "
          "[dry_run=true]")


def _flag(args: dict, name: str) -> bool:
    """The boolean option `name` of `args` (true/false, 1/0, yes/no, any case; missing: false); ValueError
    naming it otherwise."""
    v = args.get(name, "false").strip().lower()
    if v not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{name}={args[name]!r}: give true or false")
    return v in ("true", "1", "yes")


def push_main(argv: list[str] | None = None) -> int:
    """`sae-push run_dir=DIR repo_id=ORG/NAME [private=true] [revision=BRANCH] [max_shard_size=SIZE]
    [dry_run=true]`: upload a run's export with a model card (`push`); dry_run writes the folder to
    DIR/hub_upload instead. max_shard_size: bytes or e.g. "20GB" (default `DEFAULT_MAX_SHARD_SIZE`), the
    size above which the weights are uploaded as shards. Exit status 2 (the reason on stderr) for bad
    arguments, a run without an export, or an existing DIR/hub_upload."""
    import sys

    pairs = [a.partition("=") for a in (sys.argv[1:] if argv is None else argv)]
    args = {k: v for k, eq, v in pairs if eq}
    known = {"run_dir", "repo_id", "private", "revision", "max_shard_size", "dry_run"}
    unknown = set(args) - known | {k for k, eq, _ in pairs if not eq}
    try:
        dry_run, private = _flag(args, "dry_run"), _flag(args, "private")
    except ValueError as e:
        print(f"sae-push: {e}", file=sys.stderr)
        return 2
    if unknown or "run_dir" not in args or ("repo_id" not in args and not dry_run):
        print(_USAGE + (f"; unknown: {sorted(unknown)}" if unknown else ""), file=sys.stderr)
        return 2
    shard = args.get("max_shard_size", DEFAULT_MAX_SHARD_SIZE)
    try:
        if dry_run:
            folder = push_folder(args["run_dir"], Path(args["run_dir"]) / "hub_upload",
                                 args.get("repo_id", "ORG/NAME"), shard)
            print(f"sae-push: wrote {folder} (dry run: nothing uploaded)")
            return 0
        url = push(args["run_dir"], args["repo_id"], private=private, revision=args.get("revision"),
                   max_shard_size=shard)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"sae-push: {e}", file=sys.stderr)
        return 2
    print(f"sae-push: {url}")
    return 0
