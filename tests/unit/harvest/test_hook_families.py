"""Hook points mean what they mean in TransformerLens in every supported family: tiny random models built
from each family's transformers config (GPT-2, GPT-NeoX parallel and sequential, Llama, Mistral, Qwen2,
Gemma 2, Gemma 3, Phi-3, OLMo 2). The checks are the residual-stream identities the names stand for
(resid_post = resid_pre + attn_out + mlp_out, resid_mid = resid_pre + attn_out) against the model's own
`output_hidden_states`, which fail when attn_out / mlp_out read a sublayer before its post-norm (Gemma 2,
Gemma 3, OLMo 2), and splicing resid_mid, which must equal splicing attn_out with the same shift."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from sae_dist.harvest.hooks import decoder_layers, resolve_hook, run_to_hooks, splice_hook, valid_hook_names

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {  # family: (config class, model class, config kwargs)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 {**SMALL, "num_key_value_heads": 2, "use_parallel_residual": True}),
    "gpt_neox_sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                            {**SMALL, "num_key_value_heads": 2, "use_parallel_residual": False}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", SMALL),
    "mistral": ("MistralConfig", "MistralForCausalLM", SMALL),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SMALL),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**SMALL, "head_dim": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**SMALL, "head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", SMALL),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", SMALL),
}
POST_NORM = {"gemma2", "gemma3", "olmo2"}  # families whose branches end in a post-sublayer norm
PARALLEL = {"gpt_neox"}  # attention and MLP both read resid_pre: no resid_mid


def _model(family: str, seed: int) -> torch.nn.Module:
    cfg_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    return getattr(tf, model_cls)(getattr(tf, cfg_cls)(**kw)).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hook_points_add_up_to_the_residual_stream(family):
    model = _model(family, seed=11)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    n = len(decoder_layers(model))
    kinds = ["resid_pre", "attn_out", "mlp_out", "resid_post"] + ([] if family in PARALLEL else ["resid_mid"])
    assert sorted(valid_hook_names(model)) == sorted(f"blocks.{L}.hook_{k}" for L in range(n) for k in kinds)
    with torch.inference_mode():
        hs = model(ids, output_hidden_states=True).hidden_states
        for L in range(n):
            got = dict(zip(kinds, run_to_hooks(model, [f"blocks.{L}.hook_{k}" for k in kinds], ids), strict=True))
            torch.testing.assert_close(got["resid_pre"], hs[L], rtol=0, atol=0)
            if L < n - 1:  # HF applies the final norm to the last hidden state
                torch.testing.assert_close(got["resid_post"], hs[L + 1], rtol=0, atol=0)
            torch.testing.assert_close(got["resid_pre"] + got["attn_out"] + got["mlp_out"], got["resid_post"],
                                       rtol=1e-5, atol=1e-5)
            if "resid_mid" in got:
                torch.testing.assert_close(got["resid_pre"] + got["attn_out"], got["resid_mid"], rtol=0, atol=0)
            assert got["attn_out"].abs().sum() > 0 and got["mlp_out"].abs().sum() > 0
    if family in POST_NORM:  # the MLP module's own output is not what the branch adds
        layer = decoder_layers(model)[0]
        assert resolve_hook(model, "blocks.0.hook_mlp_out").module is layer.post_feedforward_layernorm
        assert resolve_hook(model, "blocks.0.hook_attn_out").module is layer.post_attention_layernorm


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - PARALLEL))
def test_splicing_resid_mid_equals_shifting_attn_out(family):
    """Adding v to resid_mid and adding v to attn_out change the model's logits the same way; the identity
    splice of resid_mid leaves them unchanged."""
    model = _model(family, seed=12)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        base = model(ids).logits
        with splice_hook(model, "blocks.0.hook_resid_mid", lambda a: a):
            same = model(ids).logits
        with splice_hook(model, "blocks.0.hook_resid_mid", lambda a: a + v):
            mid = model(ids).logits
        with splice_hook(model, "blocks.0.hook_attn_out", lambda a: a + v):
            attn = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(same, base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mid, attn, rtol=1e-5, atol=1e-5)
    assert (mid - base).abs().max() > 1e-3
    torch.testing.assert_close(after, base, rtol=0, atol=0)  # the hooks are gone


def test_parallel_residual_layers_have_no_resid_mid():
    model = _model("gpt_neox", seed=1)
    with pytest.raises(ValueError, match=r"blocks.0.hook_resid_mid.*no residual stream between attention and MLP"):
        resolve_hook(model, "blocks.0.hook_resid_mid")
