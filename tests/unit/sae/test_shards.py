"""Latent-sharded weights (`sae_dist.sae.shards`): a JumpReLU export (d_in 8, d_sae 96, a per-latent threshold)
split into shards of at most 2000 bytes, checked against slices of the original file, read back by `load_sae`
to the same function exactly, and the errors for a missing shard, a gap in the index, an inconsistent shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae_dist
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae
from sae_dist.sae.registry import build_sae
from sae_dist.sae.shards import SHARD_INDEX_FILENAME, parse_shard_size, plan_shards, write_shards

D_IN, D_SAE = 8, 96
# bytes of one latent across W_enc's column, b_enc, W_dec's row and threshold (float32), and of b_dec
PER_LATENT, WHOLE = 4 * (D_IN + 1 + D_IN + 1), 4 * D_IN
LIMIT = 2000  # (2000 - 32) // 72 = 27 latents a shard -> ceil(96 / 27) = 4 shards of 24
FILES = [f"sae_weights-0000{i}-of-00004.safetensors" for i in range(1, 5)]


@pytest.fixture
def jumprelu_export(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    sae = build_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=None, normalize="none", architecture="jumprelu"), generator=g)
    with torch.no_grad():
        sae.log_threshold.copy_(0.5 * torch.randn(D_SAE, generator=g) - 1.0)  # a different threshold per latent
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(D_IN, generator=g))
    return export_sae(sae, tmp_path / "export", hook_name="blocks.0.hook_resid_post", model_name="tiny",
                      normalize="none")


def _sharded(export: Path, out: Path) -> Path:
    out.mkdir()
    shutil.copy2(export / "cfg.json", out / "cfg.json")
    write_shards(export / "sae_weights.safetensors", out, D_SAE, LIMIT)
    return out


def test_shards_hold_latent_slices_of_every_tensor_and_the_index_says_where(jumprelu_export, tmp_path):
    out = _sharded(jumprelu_export, tmp_path / "sharded")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", *FILES, SHARD_INDEX_FILENAME]
    full = load_file(jumprelu_export / "sae_weights.safetensors")
    assert sorted(full) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    assert json.loads((out / SHARD_INDEX_FILENAME).read_text()) == {
        "metadata": {"total_size": D_SAE * PER_LATENT + WHOLE, "d_sae": D_SAE, "format": "sae_dist-latent-shards",
                     "format_version": 1},
        "weight_map": {"b_dec": FILES[0]},
        "latent_axis": {"W_dec": 0, "W_enc": 1, "b_enc": 0, "threshold": 0},
        "latent_ranges": {f: [24 * i, 24 * (i + 1)] for i, f in enumerate(FILES)}}
    for i, f in enumerate(FILES):
        part, lat = load_file(out / f), slice(24 * i, 24 * (i + 1))
        assert sorted(part) == sorted(["W_dec", "W_enc", "b_enc", "threshold"] + (["b_dec"] if i == 0 else []))
        assert torch.equal(part["W_enc"], full["W_enc"][:, lat]) and torch.equal(part["W_dec"], full["W_dec"][lat])
        assert torch.equal(part["b_enc"], full["b_enc"][lat]) and torch.equal(part["threshold"], full["threshold"][lat])
        assert sum(t.numel() * 4 for t in part.values()) <= LIMIT
    assert torch.equal(load_file(out / FILES[0])["b_dec"], full["b_dec"])
    assert full["threshold"].unique().numel() == D_SAE  # the extra is per latent, so its slices are checked


def test_load_sae_of_shards_is_the_unsharded_sae(jumprelu_export, tmp_path):
    out = _sharded(jumprelu_export, tmp_path / "sharded")
    one, sharded = sae_dist.load_sae(jumprelu_export), sae_dist.load_sae(out)
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(1))
    z = one.encode(x)
    assert 0 < int((z > 0).sum()) < z.numel()  # the threshold cuts some latents, not all
    assert torch.equal(sharded.encode(x), z) and torch.equal(sharded.decode(z), one.decode(z))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(sharded, name), getattr(one, name)), name


def test_a_missing_shard_a_gap_or_an_inconsistent_shard_is_named(jumprelu_export, tmp_path):
    out = _sharded(jumprelu_export, tmp_path / "sharded")
    index_file = out / SHARD_INDEX_FILENAME
    index = json.loads(index_file.read_text())
    (out / FILES[2]).rename(tmp_path / "kept")
    with pytest.raises(FileNotFoundError, match=f"shard\\(s\\) \\['{FILES[2]}'\\]"):
        sae_dist.load_sae(out)
    (tmp_path / "kept").rename(out / FILES[2])
    gap = {**index, "latent_ranges": {f: r for f, r in index["latent_ranges"].items() if f != FILES[1]}}
    index_file.write_text(json.dumps(gap))
    with pytest.raises(ValueError, match=rf"latents \[24, 48\) are in no shard \(a gap between {FILES[0]} and "
                                         rf"{FILES[2]}"):
        sae_dist.load_sae(out)
    short = {**index, "latent_ranges": {f: r for f, r in index["latent_ranges"].items() if f != FILES[3]}}
    index_file.write_text(json.dumps(short))
    with pytest.raises(ValueError, match=r"latents \[72, 96\) are in no shard \(d_sae=96"):
        sae_dist.load_sae(out)
    newer = {**index, "metadata": {**index["metadata"], "format_version": 2}}  # a later release's layout
    index_file.write_text(json.dumps(newer))
    with pytest.raises(ValueError, match="format 'sae_dist-latent-shards' version 2; this release reads"):
        sae_dist.load_sae(out)
    index_file.write_text(json.dumps(index))
    part = load_file(out / FILES[1])
    save_file({n: t for n, t in part.items() if n != "threshold"}, out / FILES[1])
    with pytest.raises(ValueError, match=f"{FILES[1]}: holds tensors \\['W_dec', 'W_enc', 'b_enc'\\], the index says"):
        sae_dist.load_sae(out)
    save_file({**part, "W_dec": part["W_dec"][:20]}, out / FILES[1])
    with pytest.raises(ValueError, match=rf"{FILES[1]}: W_dec has shape \(20, 8\), but the index gives this shard "
                                         r"latents \[24, 48\)"):
        sae_dist.load_sae(out)


def test_shard_sizes_parse_and_a_shard_must_hold_one_latent(jumprelu_export):
    assert parse_shard_size("5GB") == 5 * 10**9 and parse_shard_size("1000") == 1000 and parse_shard_size(7) == 7
    for bad in ("5 gigs", 0, "-3KB", True):
        with pytest.raises(ValueError, match="max_shard_size="):
            parse_shard_size(bad)
    weights = jumprelu_export / "sae_weights.safetensors"
    with pytest.raises(ValueError, match=f"cannot hold one latent \\({PER_LATENT} bytes .* give at least "
                                         f"{PER_LATENT + WHOLE}"):
        plan_shards(weights, D_SAE, PER_LATENT + WHOLE - 1)
    one_each = plan_shards(weights, D_SAE, PER_LATENT + WHOLE)["latent_ranges"]
    assert len(one_each) == D_SAE and list(one_each.values())[-1] == [95, 96]
    assert list(plan_shards(weights, D_SAE, "1MB")["latent_ranges"].values()) == [[0, 96]]
    with pytest.raises(ValueError, match=r"W_dec has shape \[96, 8\], expected d_sae=95 on axis 0"):
        plan_shards(weights, 95, LIMIT)
