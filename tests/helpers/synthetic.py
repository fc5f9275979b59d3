"""Small, real-shaped fixtures for the tests: a tiny random Llama, a tiny corpus, a training run on a synthetic
dictionary.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on the fly on a few
standard-library source files, the LM is a `LlamaForCausalLM` built from a config with random weights.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

__all__ = ["make_tiny_lm", "tiny_corpus", "train_on_synthetic"]


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
    arch: str = "llama",
) -> str:
    """Build a tiny random `LlamaForCausalLM` (`arch="gpt2"`: `GPT2LMHeadModel`) and its tokenizer and save
    both to `out_dir`.

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
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        gpt2 = GPT2Config(vocab_size=len(hf_tok), n_embd=hidden_size, n_layer=n_layers, n_head=n_heads,
                          n_positions=256, bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                          pad_token_id=hf_tok.pad_token_id)
        GPT2LMHeadModel(gpt2).save_pretrained(out)
        return str(out)
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


def train_on_synthetic(tmp_path, sae_cfg, *, dictionary=None, n_store_tokens: int = 32768,
                       tokens: int = 300_000, batch_tokens: int = 1024, seed: int | None = None,
                       wandb_cfg: dict | None = None, **trainer_kw):
    """Train `sae_cfg` (any architecture) through the real trainer on activations drawn from a
    `sae_dist.eval.synthetic.SyntheticDictionary` and load the export back.

    Args: tmp_path: a fresh directory. sae_cfg: SAEConfig (its d_in must be the dictionary's d).
      dictionary: a SyntheticDictionary (default: d=sae_cfg.d_in, 64 features, p_active 0.05).
      n_store_tokens: samples written to the store; tokens / batch_tokens: training length;
      seed: data-order / init seed (default: fresh random); wandb_cfg: `train`'s (default: wandb off);
      trainer_kw: more TrainerConfig fields.
    Returns (dictionary, train() result dict, loaded exported SAE (`sae_dist.load_sae`)).
    """
    import torch

    from sae_dist.eval.synthetic import SyntheticDictionary
    from sae_dist.sae.export import load_sae
    from sae_dist.store import write_store
    from sae_dist.train.trainer import TrainerConfig, train

    tmp_path = Path(tmp_path)
    seed = int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed
    sd = dictionary or SyntheticDictionary(sae_cfg.d_in, 64, p_active=0.05, seed=seed)
    x, _ = sd.sample(n_store_tokens)
    write_store(tmp_path / "s.zarr", x, attrs={"hook_name": "synthetic", "model": "synthetic"})
    kw = dict(tokens=tokens, batch_tokens=batch_tokens, keep_checkpoints=0, log_every_steps=50)
    kw.update(trainer_kw)
    res = train(store_path=tmp_path / "s.zarr", out_dir=tmp_path / "run", sae_cfg=sae_cfg, seed=seed,
                trainer_cfg=TrainerConfig(**kw), progress=False, wandb_cfg=wandb_cfg or {"enabled": False})
    return sd, res, load_sae(tmp_path / "run" / "sae")
