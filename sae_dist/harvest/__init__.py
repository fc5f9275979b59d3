"""sae_dist.harvest: LM loading, hook points, the text pipeline and the activation harvester.

    load_lm / embedded_default_lm            (lm.py)      transformers: HF name, local dir, GGUF
    resolve_hook / run_to_hook(s) / splice_hook (hooks.py) blocks.{L}.hook_{resid_pre,resid_mid,resid_post,...}
    iter_documents / packed_sequences        (text.py)    HF datasets -> [BOS] + (ctx_len-1) tokens
    harvest / hook_store_path                (harvester.py) deterministic, resumable, multi-worker, multi-hook
"""

from sae_dist.harvest.harvester import HarvestError, harvest, hook_store_path, sequence_order, shard_row_permutation
from sae_dist.harvest.hooks import (
    HookSpec,
    decoder_layers,
    default_hook_name,
    resolve_hook,
    run_to_hook,
    run_to_hooks,
    splice_hook,
    valid_hook_names,
)
from sae_dist.harvest.lm import embedded_default_lm, load_lm, model_display_name
from sae_dist.harvest.text import (
    bos_token_id,
    is_eval_document,
    iter_documents,
    packed_sequences,
    stdlib_corpus_files,
    tokenize_document,
)

__all__ = [
    "HarvestError", "HookSpec", "bos_token_id", "decoder_layers", "default_hook_name",
    "embedded_default_lm", "harvest", "hook_store_path", "is_eval_document", "iter_documents", "load_lm",
    "model_display_name", "packed_sequences", "resolve_hook", "run_to_hook", "run_to_hooks",
    "sequence_order", "shard_row_permutation", "splice_hook", "stdlib_corpus_files", "tokenize_document",
    "valid_hook_names",
]
