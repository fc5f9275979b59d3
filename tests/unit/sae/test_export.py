"""Export -> load round trip: the loaded SAE on RAW activations reproduces the training module's
reconstruction after denormalisation, and SAELens' own formulas on the files give the same x^."""

import json
import math

import pytest
import torch
from helpers.export import saelens_topk_forward
from safetensors.torch import load_file

import sae_dist
from sae_dist.sae import SAEConfig, TopKSAE, export_sae, load_sae
from sae_dist.store import denormalize, normalize


def _trained_like_sae(d, n, k, mode):
    sae = TopKSAE(SAEConfig(d_in=d, d_sae=n, k=k, normalize=mode),
                  generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.3)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    return sae


def _raw_acts(b, d):
    # LM-like: a large shared offset, heterogeneous per-token norms
    return (torch.randn(b, d) * torch.rand(b, 1) * 5 + 2.0 * torch.randn(d)).float()


def _reference_xhat(sae, x, mode, scale=None):
    x_n, ctx = normalize(x, mode, scale=scale)
    with torch.no_grad():
        return denormalize(sae(x_n), mode, ctx)


@pytest.mark.parametrize("mode", ["scalar", "layer_norm", "none"])
def test_export_load_round_trip(tmp_path, mode):
    d, n, k = 32, 128, 6
    sae = _trained_like_sae(d, n, k, mode)
    x = _raw_acts(200, d)
    scale = math.sqrt(d) / float(x.norm(dim=-1).mean()) if mode == "scalar" else None
    ref = _reference_xhat(sae, x, mode, scale)
    out = export_sae(sae, tmp_path / "sae", hook_name="blocks.1.hook_resid_post", model_name="tiny",
                     normalize=mode, scale=scale, extra_cfg={"context_size": 64, "dataset_path": "stdlib"})
    loaded = sae_dist.load_sae(out)
    with torch.no_grad():
        got = loaded(x)
        torch.testing.assert_close(got, ref, atol=2e-4 * float(x.abs().max()), rtol=1e-4)
        # dense and sparse API agree
        vals, idx = loaded.encode_sparse(x)
        assert vals.shape == (200, k) and idx.dtype == torch.int64
        z = loaded.encode(x)
        assert z.shape == (200, n) and ((z > 0).sum(-1) <= k).all()
        torch.testing.assert_close(loaded.decode(z), got, atol=1e-4, rtol=1e-4)
        # same latents as the training module (TopK selection unchanged by the folding)
        _, idx_train = sae.encode_sparse(normalize(x, mode, scale=scale)[0])
        assert (idx.sort(-1).values == idx_train.sort(-1).values).float().mean() > 0.99
        # leading dims
        torch.testing.assert_close(loaded(x.reshape(10, 20, d)).reshape(200, d), got)

    files = load_file(str(out / "sae_weights.safetensors"))
    assert files["W_enc"].shape == (d, n) and files["W_dec"].shape == (n, d)
    assert files["b_enc"].shape == (n,) and files["b_dec"].shape == (d,)
    torch.testing.assert_close(files["W_dec"].norm(dim=-1), torch.ones(n))
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == d and cfg["d_sae"] == n and cfg["k"] == k
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["model_name"] == "tiny"
    assert cfg["hook_layer"] == 1 and cfg["context_size"] == 64 and cfg["dtype"] == "float32"
    # what SAELens reads to rebuild the activations (top level and under "metadata", its 6.x place): BOS at
    # position 0 and not trained on, the LM's weights unprocessed, the corpus
    for c in (cfg, cfg["metadata"]):
        assert (c["prepend_bos"], c["seqpos_slice"], c["context_size"], c["dataset_path"]) == (True, [1, None], 64,
                                                                                               "stdlib")
        assert c["model_from_pretrained_kwargs"] == {"center_writing_weights": False}
    assert cfg["normalize_activations"] == ("layer_norm" if mode == "layer_norm" else "none")
    # SAELens' computation on the same files gives our x^ (layer_norm: up to SAELens' eps)
    y = saelens_topk_forward(files, cfg, x)
    torch.testing.assert_close(y.float(), ref, atol=1e-3 * float(x.abs().max()), rtol=1e-3)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json, sae_weights.safetensors"):
        load_sae(tmp_path)
    sae = _trained_like_sae(8, 16, 2, "none")
    export_sae(sae, tmp_path / "s", hook_name=None, model_name=None, normalize="none")
    (tmp_path / "s" / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        load_sae(tmp_path / "s")
    export_sae(sae, tmp_path / "s", hook_name=None, model_name=None, normalize="none")
    m = load_sae(tmp_path / "s")
    with pytest.raises(ValueError, match="activation width 9 != SAE d_in 8"):
        m(torch.randn(3, 9))
    with pytest.raises(ValueError, match="scale"):
        export_sae(sae, tmp_path / "t", hook_name=None, model_name=None, normalize="scalar")


def test_load_refuses_a_cuda_device_too_small_before_reading_weights(tmp_path, monkeypatch):
    """On CUDA, load_sae compares the float32 W_enc + W_dec (8 d_sae d_in bytes) with the device's free memory
    (torch.cuda.mem_get_info, stubbed here: no GPU) and raises MemoryError before reading the weights."""
    import sae_dist.sae.export as ex

    d, n = 8, 16
    export_sae(_trained_like_sae(d, n, 2, "none"), tmp_path / "s", hook_name=None, model_name=None, normalize="none")
    need, real_read = 8 * n * d, ex.read_sae_files
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: asked.append(dev) or (need - 1, 2**34))

    def no_read(path, cfg=None):
        raise AssertionError("weights read before the memory check")

    monkeypatch.setattr(ex, "read_sae_files", no_read)
    with pytest.raises(MemoryError, match=r"d_sae=16, d_in=8\) needs 0\.0 GiB .* on cuda:1, which has 0\.0 GiB free "
                                          r"of 16\.0 GiB: load it on the CPU"):
        load_sae(tmp_path / "s", device="cuda:1")
    assert asked == [torch.device("cuda:1")]
    # exactly enough passes the check (the weights are then read: here the stub's error)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (need, 2**34))
    with pytest.raises(AssertionError, match="weights read"):
        load_sae(tmp_path / "s", device="cuda:1")
    # the CPU is not checked
    monkeypatch.setattr(ex, "read_sae_files", real_read)
    assert load_sae(tmp_path / "s").W_dec.shape == (n, d)


def test_after_train_refuses_before_training_an_sae_no_gpu_can_hold(monkeypatch, tmp_path):
    """sae-train eval.after_train=true checks, before training, that one GPU's total memory (stubbed: 80 GiB)
    can hold each point's fp32 W_enc + W_dec: 2^24 x 4096 (512 GiB) is refused naming the fix, 2^20 x 4096
    (32 GiB) passes, and the CPU is not checked."""
    from sae_dist.cli import _check_after_train_fits
    from sae_dist.train.trainer import GridPoint, TrainerConfig

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (2**30, 80 * 2**30))

    def points(*widths):
        return [GridPoint(tmp_path, SAEConfig(d_in=4096, d_sae=n, k=32), TrainerConfig()) for n in widths]

    refused = (r"eval.after_train=true cannot evaluate this run on one GPU: eval.after_train's SAE "
               r"\(d_sae=16777216, d_in=4096\) needs 512\.0 GiB .* Set eval.after_train=false")
    with pytest.raises(ValueError, match=refused):
        _check_after_train_fits(points(2**20, 2**24), "cuda:0")
    _check_after_train_fits(points(2**20), "cuda:0")  # 32 GiB <= 80 GiB total (whatever is free now)
    _check_after_train_fits(points(2**24), "cpu")


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
@pytest.mark.parametrize("mode", ["scalar", "layer_norm", "none"])
def test_exported_view_is_the_loaded_export_without_files(tmp_path, architecture, mode):
    """`exported_view` computes what `load_sae` of `export_sae`'s files computes, bit for bit, shares W_enc and
    W_dec with the training module (no copy) and so follows it after an update."""
    from sae_dist.sae.export import exported_view
    from sae_dist.sae.registry import build_sae

    d, n = 16, 48
    g = torch.Generator().manual_seed(5)
    sae = build_sae(SAEConfig(d_in=d, d_sae=n, k=4 if architecture == "topk" else None, normalize=mode,
                              architecture=architecture), generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=g)
        sae.b_dec.normal_(0, 0.5, generator=g)
        sae.W_enc.add_(0.2 * torch.randn(d, n, generator=g))
    x = _raw_acts(64, d)
    scale = math.sqrt(d) / float(x.norm(dim=-1).mean()) if mode == "scalar" else None
    view = exported_view(sae, normalize=mode, scale=scale)
    export_sae(sae, tmp_path / "sae", hook_name=None, model_name=None, normalize=mode, scale=scale)
    with torch.no_grad():
        assert torch.equal(view(x), load_sae(tmp_path / "sae")(x))
        assert view.W_enc.data_ptr() == sae.W_enc.data_ptr() and view.W_dec.data_ptr() == sae.W_dec.data_ptr()
        sae.W_dec.mul_(0.5)
        export_sae(sae, tmp_path / "sae2", hook_name=None, model_name=None, normalize=mode, scale=scale)
        assert torch.equal(view(x), load_sae(tmp_path / "sae2")(x))
    assert not view.training and type(view) is type(load_sae(tmp_path / "sae"))
