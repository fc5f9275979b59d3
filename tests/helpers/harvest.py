"""What the harvester tests (tests/unit/harvest/test_harvest.py, tests/integration/harvest/) share: the
harvest's shape on the tiny LM and tiny corpus (hook, context length, eval fraction, a small corpus), a
harvest with the tests' defaults, and reading a store back and comparing two stores."""

from __future__ import annotations

import numpy as np
import zarr

from sae_dist.harvest import harvest

HOOK = "blocks.1.hook_resid_post"
CTX = 16
BODY = CTX - 1
EVAL = 0.1
SMALL = dict(n_files=3, max_chars=4000)  # ~ a few hundred sequences of 16 tokens


def run_harvest(lm, path, docs, tokens, **kw):
    """`harvest` of `docs` with the (model, tokenizer) `lm` into `path`: HOOK, CTX, batches of 5 sequences,
    chunks of 4, shards of 16, EVAL held out, no progress bar; `kw` overrides any argument."""
    model, tok = lm
    args = dict(model=model, tokenizer=tok, hook_name=HOOK, docs=docs, store_path=str(path), tokens=tokens,
                ctx_len=CTX, batch_size=5, seqs_per_chunk=4, seqs_per_shard=16, eval_fraction=EVAL,
                progress=False, attrs={"dataset": "tiny"})
    args.update(kw)
    return harvest(**args)


def read_store(path, text_order: bool = True):
    """(the store's arrays activations, token_ids, seq_index, position as numpy, its attributes); with
    `text_order` the rows of a store with a shuffled row_order are sorted by (seq_index, position)."""
    g = zarr.open_group(str(path), mode="r")
    arrays = {k: g[k][:] for k in ("activations", "token_ids", "seq_index", "position")}
    if text_order and g.attrs.get("row_order", "text") != "text":
        order = np.lexsort((arrays["position"], arrays["seq_index"]))
        arrays = {k: v[order] for k, v in arrays.items()}
    return arrays, dict(g.attrs)


def assert_same_store(a, b):
    """The stores at `a` and `b` hold the same arrays (dtype, shape, values) and attributes (norm_stats
    to 9 decimals)."""
    (arr_a, at_a), (arr_b, at_b) = read_store(a), read_store(b)
    for k in arr_a:
        assert arr_a[k].dtype == arr_b[k].dtype and arr_a[k].shape == arr_b[k].shape, k
        np.testing.assert_array_equal(arr_a[k], arr_b[k], err_msg=k)
    at_a["norm_stats"] = {k: round(v, 9) for k, v in at_a["norm_stats"].items()}
    at_b["norm_stats"] = {k: round(v, 9) for k, v in at_b["norm_stats"].items()}
    assert at_a == at_b
