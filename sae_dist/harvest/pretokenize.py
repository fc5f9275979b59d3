"""Pretokenised text: the packed train sequences of a dataset, tokenised once in parallel and saved to disk.

`pretokenize` runs `datasets.Dataset.map(num_proc=...)` over the documents (each process packs a contiguous
slice of them; `datasets` keeps the order), so the saved sequences are exactly `text.packed_sequences` of the
same documents, tokenizer, ctx_len and eval_fraction, in the same order. `sae-harvest
data.pretokenized=DIR` then reads sequence i from the memory-mapped Arrow files instead of tokenising: each
worker reads only the sequences of its own shards, and a resumed harvest starts at its first unfinished
shard. SAELens' pretokenise runner plays the same role.

A pretokenised dataset is a directory written by `datasets.Dataset.save_to_disk` (one int32 column
`input_ids` of ctx_len ids per row) with one more file, ``sae_dist_pretokenized.json``: dataset, name,
revision, split, text_field, tokenizer, ctx_len, eval_fraction, n_seqs, n_documents.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["pretokenize", "PretokenizedSequences", "INFO_FILE"]

INFO_FILE = "sae_dist_pretokenized.json"


def _pack_batch(batch: dict, *, tokenizer, text_field: str, ctx_len: int, eval_fraction: float, bos: int) -> dict:
    """`Dataset.map` function: the packed train sequences of a batch of documents (empty ones skipped)."""
    from .text import is_eval_document, pack_document

    out: list[list[int]] = []
    for text in batch[text_field]:
        if text and not is_eval_document(text, eval_fraction):
            out.extend(pack_document(text, tokenizer, ctx_len, bos))
    return {"input_ids": out}


def pretokenize(*, dataset: str, tokenizer, out_dir, ctx_len: int, eval_fraction: float, split: str = "train",
                text_field: str = "text", data_files=None, name: str | None = None, revision: str | None = None,
                trust_remote_code: bool = False, num_proc: int | None = None, max_sequences: int | None = None,
                tokenizer_name: str = "", progress: bool = True) -> dict[str, Any]:
    """Tokenise and pack the train split of a dataset in parallel and save it to `out_dir`.

    Args:
        dataset, split, text_field, data_files, name, revision, trust_remote_code: the documents, as for
            `text.iter_documents` (loaded without streaming: `map` needs the whole split).
        tokenizer: the LM's tokenizer (picklable: it is sent to the worker processes).
        out_dir: output directory (must not exist yet; written through a temporary sibling and renamed).
        ctx_len: tokens per sequence, BOS included (>= 2). eval_fraction: held-out document fraction
            (`text.is_eval_document`); only train documents are packed.
        num_proc: tokenising processes (None: all CPUs, at most 32; 1: in this process).
        max_sequences: keep only the first this many sequences (None: all).
        tokenizer_name: recorded in the info file (e.g. the model's name).
        progress: datasets' progress bars.

    Returns: the info dict written to ``out_dir/sae_dist_pretokenized.json``.
    Raises: FileExistsError when out_dir exists; ValueError for ctx_len < 2, max_sequences < 1, a missing
        text column, or a corpus without one train sequence.
    """
    import datasets

    from .text import bos_token_id, load_documents

    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} exists; pretokenize writes a new directory (delete it or choose another)")
    if int(ctx_len) < 2 or (max_sequences is not None and int(max_sequences) < 1):
        raise ValueError(f"ctx_len={ctx_len!r} must be >= 2 and max_sequences={max_sequences!r} >= 1 (or None)")
    ds, text_field = load_documents(dataset, split=split, text_field=text_field, data_files=data_files,
                                    streaming=False, name=name, revision=revision,
                                    trust_remote_code=trust_remote_code)
    n_proc = min(32, os.cpu_count() or 1) if num_proc is None else int(num_proc)
    bars_were_on = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        packed = ds.map(_pack_batch, batched=True, batch_size=64, remove_columns=ds.column_names,
                        num_proc=n_proc if n_proc > 1 else None, desc="pretokenize",
                        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
                        fn_kwargs=dict(tokenizer=tokenizer, text_field=text_field, ctx_len=int(ctx_len),
                                       eval_fraction=float(eval_fraction), bos=bos_token_id(tokenizer)))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if max_sequences is not None and len(packed) > max_sequences:
        packed = packed.select(range(int(max_sequences)))
    if len(packed) == 0:
        raise ValueError(f"dataset {dataset!r} gave no train sequence of ctx_len={ctx_len} tokens")
    info = {"dataset": dataset, "name": name, "revision": revision, "split": split, "text_field": text_field,
            "tokenizer": tokenizer_name, "ctx_len": int(ctx_len), "eval_fraction": float(eval_fraction),
            "n_seqs": len(packed), "n_documents": len(ds)}
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    packed.save_to_disk(tmp)
    with open(os.path.join(tmp, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, out_dir)
    return info


class PretokenizedSequences:
    """Random access to a pretokenised dataset: ``seqs[i]`` is sequence i (a list of ctx_len token ids).

    Args: path (a `pretokenize` output directory); ctx_len and eval_fraction the harvest uses.
    Raises: FileNotFoundError without the info file; ValueError when ctx_len or eval_fraction differ from
        the ones the sequences were packed with (naming both).
    """

    def __init__(self, path, *, ctx_len: int, eval_fraction: float):
        import datasets

        self.path = os.fspath(path)
        info_file = os.path.join(self.path, INFO_FILE)
        if not os.path.isfile(info_file):
            raise FileNotFoundError(f"{self.path} is not a pretokenised dataset (no {INFO_FILE}); make one with "
                                    f"sae-pretokenize data.pretokenized={self.path}")
        with open(info_file) as f:
            self.info = json.load(f)
        for key, want in (("ctx_len", int(ctx_len)), ("eval_fraction", float(eval_fraction))):
            if self.info[key] != want:
                raise ValueError(f"{self.path} was pretokenised with {key}={self.info[key]}, but this harvest uses "
                                 f"data.{key}={want}; use the same value or pretokenise again")
        self._ds = datasets.load_from_disk(self.path).with_format("numpy")

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> list[int]:
        return self._ds[int(i)]["input_ids"].tolist()
