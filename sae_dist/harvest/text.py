"""Text pipeline: documents through HF datasets, a stable train/eval split, packed ctx_len sequences.

Packing (docs/internals.md): each sequence is [BOS] + (ctx_len - 1) consecutive tokens of ONE
document; the tail of a document shorter than ctx_len - 1 tokens is dropped. Position 0 (BOS) is the
attention sink and is never stored, so every sequence contributes exactly ctx_len - 1 activation rows.
The paper (Gao et al. 2024, Sec. 2.1 / App. A) uses context length 64 and excludes the first
position(s) of each context from training.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Sequence

__all__ = [
    "STDLIB_DATASET",
    "stdlib_corpus_files",
    "load_documents",
    "iter_documents",
    "is_eval_document",
    "bos_token_id",
    "tokenize_document",
    "packed_sequences",
    "pack_document",
]

STDLIB_DATASET = "stdlib"


def stdlib_corpus_files() -> list[str]:
    """The running interpreter's standard-library `*.py` files (recursive), sorted by path.

    `site-packages` (and `dist-packages`) trees are excluded, so installed packages never leak into the
    corpus. The list (and hence the corpus order) is deterministic for a given Python installation.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    files = [
        p for p in root.rglob("*.py") if p.is_file() and not skip.intersection(p.relative_to(root).parts)
    ]
    return sorted(str(p) for p in files)


def _check_text_field(columns: Sequence[str] | None, text_field: str, dataset: str) -> None:
    if columns is not None and text_field not in columns:
        raise ValueError(
            f"dataset {dataset!r} has no column {text_field!r}; its columns are {list(columns)}. "
            "Set the text field (data.text_field=...) to one of them."
        )


def load_documents(
    dataset: str,
    *,
    split: str = "train",
    text_field: str = "text",
    data_files=None,
    streaming: bool = True,
    name: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """(HF datasets Dataset or IterableDataset, its text column) of a dataset, in its deterministic order.

    Args:
        dataset: "stdlib" (the embedded default: `stdlib_corpus_files()` read with the datasets "text"
            builder, one document per file), a hub dataset name, a local dataset directory, or a
            builder name such as "text"/"json"/"parquet" together with `data_files`.
        split: dataset split.
        text_field: column holding the text.
        data_files: passed to `datasets.load_dataset` (local files).
        streaming: stream instead of downloading/materialising the whole dataset.
        name: dataset configuration name (e.g. "sample-10BT").
        revision: hub revision (branch, tag or commit) of the dataset.
        trust_remote_code: run the dataset's loading script (datasets < 4 only).

    Raises: ValueError when `text_field` is not a column (the message lists the columns) or
    trust_remote_code is asked of a datasets release that runs no dataset scripts.
    """
    from datasets import load_dataset

    if dataset == STDLIB_DATASET:
        files = stdlib_corpus_files()
        if not files:
            raise FileNotFoundError(
                f"no standard-library .py files under {sysconfig.get_paths()['stdlib']!r}"
            )
        ds = load_dataset("text", data_files={"train": files}, split="train", sample_by="document",
                          encoding_errors="replace", streaming=streaming, keep_linebreaks=True)
        text_field = "text"
    else:
        ds = load_dataset(dataset, name, split=split, data_files=data_files, streaming=streaming,
                          revision=revision, **_remote_code_kwargs(trust_remote_code))
    _check_text_field(getattr(ds, "column_names", None), text_field, dataset)
    return ds, text_field


def _remote_code_kwargs(trust_remote_code: bool) -> dict:
    """{"trust_remote_code": True} for a datasets release that still runs dataset scripts (< 4); {} when
    not asked; ValueError when asked of a release without scripts (the message says what to do instead)."""
    import inspect

    from datasets import load_dataset

    if not trust_remote_code:
        return {}
    if "trust_remote_code" in inspect.signature(load_dataset).parameters:
        return {"trust_remote_code": True}
    import datasets

    raise ValueError(f"data.trust_remote_code=true, but datasets {datasets.__version__} runs no dataset scripts; "
                     "load the dataset's data files instead (data.revision=refs/convert/parquet on the hub, or "
                     "data.dataset=parquet with data.data_files=...), and set data.trust_remote_code=false")


def iter_documents(dataset: str, **load_kwargs) -> Iterator[str]:
    """Yield documents (strings) from a dataset, in the dataset's deterministic order, via HF datasets;
    empty documents are skipped. `load_kwargs`: the keyword arguments of `load_documents` (split,
    text_field, data_files, streaming (default True), name, revision, trust_remote_code).

    Raises: ValueError as `load_documents` does, and when the first record has no `text_field`.
    """
    ds, text_field = load_documents(dataset, **load_kwargs)
    for i, row in enumerate(ds):
        if i == 0:
            _check_text_field(list(row.keys()), text_field, dataset)
        text = row[text_field]
        if text:
            yield text


def is_eval_document(text: str, eval_fraction: float) -> bool:
    """Stable train/eval split by document: True if the document belongs to the eval split.

    Uses the first 8 bytes of SHA-256(text, UTF-8) as a uniform number u in [0, 1); the document is
    eval iff u < eval_fraction. Stable across processes, machines and Python versions (unlike hash()).

    Raises:
        ValueError: eval_fraction outside [0, 1].
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction!r}")
    h = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < eval_fraction


def bos_token_id(tokenizer) -> int:
    """The id put at position 0 of every sequence: tokenizer.bos_token_id, else eos_token_id.

    Raises:
        ValueError: the tokenizer has neither.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "eos_token_id", None)
    if bos is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has neither a BOS nor an EOS token; set "
            "tokenizer.bos_token before harvesting"
        )
    return int(bos)


def tokenize_document(text: str, tokenizer) -> list[int]:
    """Token ids of one document, without added special tokens and with special-token strings in the
    text split into ordinary tokens (`split_special_tokens=True`), so no special id appears inside."""
    enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)
    return list(enc["input_ids"])


def packed_sequences(
    docs: Iterable[str],
    tokenizer,
    ctx_len: int = 64,
    *,
    eval_fraction: float,
    split: str = "train",
) -> Iterator[list[int]]:
    """Pack documents into sequences of exactly `ctx_len` token ids.

    Each sequence is [BOS] + ids[j*(ctx_len-1) : (j+1)*(ctx_len-1)] for one document's ids
    (`tokenize_document`), j = 0, 1, ...; a document's final piece shorter than ctx_len - 1 is dropped.
    Documents are assigned to "train" or "eval" by `is_eval_document(text, eval_fraction)`; only the
    requested split is yielded. The order is deterministic given the document order.

    Raises:
        ValueError: ctx_len < 2 or split not in {"train", "eval"}.
    """
    if int(ctx_len) < 2:
        raise ValueError(f"ctx_len must be >= 2 (BOS + at least one stored token), got {ctx_len!r}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    want_eval = split == "eval"
    bos = bos_token_id(tokenizer)
    for text in docs:
        if is_eval_document(text, eval_fraction) == want_eval:
            yield from pack_document(text, tokenizer, int(ctx_len), bos)


def pack_document(text: str, tokenizer, ctx_len: int, bos: int) -> list[list[int]]:
    """One document's sequences: [bos] + ids[j*(ctx_len-1) : (j+1)*(ctx_len-1)] for j = 0, 1, ... over its
    token ids (`tokenize_document`); the final piece shorter than ctx_len - 1 is dropped."""
    body = ctx_len - 1
    ids = tokenize_document(text, tokenizer)
    return [[bos, *ids[start : start + body]] for start in range(0, len(ids) - body + 1, body)]

