"""Hook points mean what they mean in TransformerLens in every supported family: tiny random models built
from each family's transformers config (GPT-2, GPT-NeoX parallel and sequential, Llama, Mistral, Qwen2,
Gemma 2, Gemma 3, Phi-3, OLMo 2, Bloom, MPT). The checks are the residual-stream identities the names stand
for (resid_post = resid_pre + attn_out + mlp_out, resid_mid = resid_pre + attn_out) against the model's own
`output_hidden_states`, which fail when attn_out / mlp_out read a sublayer before its post-norm (Gemma 2,
Gemma 3, OLMo 2) or a branch module that adds the residual itself (Bloom, MPT's MLP: those hooks are
refused), and splicing resid_mid, which must hand f(resid_mid) to the MLP branch and the residual stream."""

from __future__ import annotations

import re

import pytest
import torch
import transformers as tf

from sae_dist.harvest.hooks import (
    decoder_layers,
    resolve_hook,
    run_to_hook,
    run_to_hooks,
    splice_hook,
    valid_hook_names,
)

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
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=64, hidden_size=16, n_layer=2, n_head=2)),
    "mpt": ("MptConfig", "MptForCausalLM",
            dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, expansion_ratio=2, max_seq_len=32)),
}
POST_NORM = {"gemma2", "gemma3", "olmo2"}  # families whose branches end in a post-sublayer norm
PARALLEL = {"gpt_neox"}  # attention and MLP both read resid_pre: no resid_mid
# branch modules that add the residual inside their forward: Bloom's attention and MLP, MPT's MLP
REFUSED = {"bloom": ("attn_out", "mlp_out", "resid_mid"), "mpt": ("mlp_out",)}


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
    kinds = [k for k in kinds if k not in REFUSED.get(family, ())]
    assert sorted(valid_hook_names(model)) == sorted(f"blocks.{L}.hook_{k}" for L in range(n) for k in kinds)
    with torch.inference_mode():
        hs = model(ids, output_hidden_states=True).hidden_states
        for L in range(n):
            got = dict(zip(kinds, run_to_hooks(model, [f"blocks.{L}.hook_{k}" for k in kinds], ids), strict=True))
            torch.testing.assert_close(got["resid_pre"], hs[L], rtol=0, atol=0)
            if L < n - 1:  # HF applies the final norm to the last hidden state
                torch.testing.assert_close(got["resid_post"], hs[L + 1], rtol=0, atol=0)
            if "mlp_out" in got:
                torch.testing.assert_close(got["resid_pre"] + got["attn_out"] + got["mlp_out"], got["resid_post"],
                                           rtol=1e-5, atol=1e-5)
                assert got["mlp_out"].abs().sum() > 0
            if "resid_mid" in got:
                torch.testing.assert_close(got["resid_pre"] + got["attn_out"], got["resid_mid"], rtol=0, atol=0)
            if "attn_out" in got:  # also where there is no resid_mid (parallel residual)
                assert got["attn_out"].abs().sum() > 0
    if family in POST_NORM:  # the MLP module's own output is not what the branch adds
        layer = decoder_layers(model)[0]
        assert resolve_hook(model, "blocks.0.hook_mlp_out").module is layer.post_feedforward_layernorm
        assert resolve_hook(model, "blocks.0.hook_attn_out").module is layer.post_attention_layernorm


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - PARALLEL - {"bloom"}))
def test_splicing_resid_mid(family):
    """Splicing resid_mid -> f(resid_mid) hands f(clean resid_mid) to the MLP branch and to the residual stream
    (resid_post - mlp_out), for f = 0.5 a and f = 0, which a splice ignoring the layer's input would miss;
    adding v to resid_mid and adding v to attn_out change the logits the same way; the identity splice leaves
    them unchanged."""
    model = _model(family, seed=12)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    mid_hook, post_hooks = "blocks.0.hook_resid_mid", ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"]
    has_mlp_out = "mlp_out" not in REFUSED.get(family, ())
    with torch.inference_mode():
        base, clean = model(ids).logits, run_to_hook(model, mid_hook, ids)
        for f in (lambda a: 0.5 * a, torch.zeros_like):
            with splice_hook(model, mid_hook, f):
                seen = run_to_hook(model, mid_hook, ids)  # the input of the MLP branch's first module
                post, mlp = run_to_hooks(model, post_hooks, ids) if has_mlp_out else (None, None)
            torch.testing.assert_close(seen, f(clean), rtol=1e-5, atol=1e-5)
            if has_mlp_out:
                torch.testing.assert_close(post - mlp, f(clean), rtol=1e-5, atol=1e-5)
        with splice_hook(model, mid_hook, lambda a: a):
            same = model(ids).logits
        with splice_hook(model, mid_hook, lambda a: a + v):
            mid = model(ids).logits
        with splice_hook(model, "blocks.0.hook_attn_out", lambda a: a + v):
            attn = model(ids).logits
        after = model(ids).logits
    assert clean.abs().max() > 1e-2
    torch.testing.assert_close(same, base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mid, attn, rtol=1e-5, atol=1e-5)
    assert (mid - base).abs().max() > 1e-3
    torch.testing.assert_close(after, base, rtol=0, atol=0)  # the hooks are gone


@pytest.mark.parametrize(("family", "kind", "module"), [
    ("bloom", "attn_out", "self_attention"), ("bloom", "mlp_out", "mlp"), ("bloom", "resid_mid", "self_attention"),
    ("mpt", "mlp_out", "ffn")])
def test_branches_that_add_the_residual_refuse_their_hooks(family, kind, module):
    """Bloom's attention and MLP and MPT's MLP add the residual inside their forward (their output is the
    residual stream after the branch, checked here), so their branch hooks are refused with the reason and
    the valid names; resid_pre / resid_post still work (test_hook_points_add_up_to_the_residual_stream)."""
    model = _model(family, seed=13)
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(8))
    branch = getattr(decoder_layers(model)[0], module)
    out = []
    handle = branch.register_forward_hook(lambda _m, _a, o: out.append(o[0] if isinstance(o, tuple) else o))
    with torch.inference_mode():
        hs = model(ids, output_hidden_states=True).hidden_states
    handle.remove()
    if kind == "mlp_out":  # the MLP module's output is already resid_post
        torch.testing.assert_close(out[0], hs[1], rtol=0, atol=0)
    valid = "blocks.{0..1}.hook_{resid_pre,resid_post}" if family == "bloom" else \
        "blocks.{0..1}.hook_{resid_pre,resid_mid,resid_post,attn_out}"
    with pytest.raises(ValueError, match=rf"blocks\.0\.hook_{kind}'.*{module} \(\w+\) adds the residual stream "
                                         rf"inside its forward.*valid names for this model: {re.escape(valid)}"):
        resolve_hook(model, f"blocks.0.hook_{kind}")


def test_parallel_residual_layers_have_no_resid_mid():
    model = _model("gpt_neox", seed=1)
    with pytest.raises(ValueError, match=r"blocks.0.hook_resid_mid.*no residual stream between attention and MLP"):
        resolve_hook(model, "blocks.0.hook_resid_mid")
