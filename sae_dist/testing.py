"""Small, real-shaped fixtures for tests and examples: a tiny random Llama and a tiny corpus.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on the fly on a few
standard-library source files, the LM is a `LlamaForCausalLM` built from a config with random weights.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

__all__ = ["make_tiny_lm", "tiny_corpus"]


def tiny_corpus(n_files: int = 8, max_chars: int = 20_000) -> list[str]:
    """Return `n_files` real text documents: the first standard-library modules in sorted order.

    Each document is truncated to `max_chars` characters. Used to train the tiny tokenizer and as a
    small real corpus in tests.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 2000)[:n_files]
    return [p.read_text(encoding="utf-8", errors="replace")[:max_chars] for p in files]


def make_tiny_lm(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 32,
    n_layers: int = 3,
    n_heads: int = 4,
    vocab_size: int = 384,
    seed: int = 0,
) -> str:
    """Build a tiny random `LlamaForCausalLM` and its tokenizer and save both to `out_dir`.

    The directory loads with `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` and
    `AutoTokenizer.from_pretrained(out_dir)`, i.e. it exercises the "local directory" model path.
    The tokenizer is byte-level BPE with `<s>` (BOS), `</s>` (EOS) and `<pad>` special tokens.

    Returns the directory as a string.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    hf_tok.save_pretrained(out)

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=max(1, n_heads // 2),
        max_position_embeddings=256,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return str(out)
