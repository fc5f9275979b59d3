"""Sparse TopK decode x^ = sum_j v_j W_dec[i_j] (+ b_dec) and its sparse backward; the AuxK loss, the
same sparse decode of the dead latents against the residual (second half of this module).

The decoder of a TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", section 2.1
eq. 2 with the TopK code of section 2.3) touches only k rows of W_dec per token; the paper's systems
appendix describes sparse TopK decoder kernels of this kind (the design below is our own):

    forward          x^[b]           = sum_j v[b, j] * W_dec[i[b, j]] (+ b_dec)          [B, d]
    backward values  dL/dv[b, j]     = <dL/dx^[b], W_dec[i[b, j]]>   (gathered dot products)
    backward W_dec   dL/dW_dec[r]    = sum_{(b, j): i[b, j] = r} v[b, j] * dL/dx^[b]
                                       (sparse-transpose x dense)
    backward b_dec   dL/db_dec       = sum_b dL/dx^[b]

Two implementations with one signature:
- torch (CPU, and the reference): `F.embedding_bag(indices, W_dec, per_sample_weights=values,
  mode="sum")`, whose native backward is already sparse (per-sample-weight dot products and a
  sorted segment sum into W_dec). Never builds a [B, n] or [B, k, d] tensor. Measured on 2 CPU cores
  (quiet machine), fp32, B=4096, k=32, n=16384, d=576: forward 13-17 ms, forward + both gradients
  56 ms, against 656 ms for one dense encoder matmul of the same shape. Alternatives measured in the
  same run were slower: forward by chunked gather + bmm 421 ms; grad of values by chunked gather + bmm
  468 ms; grad of W_dec by chunked index_add_ 910 ms, by CSR sparse @ dense 308 ms, by a row-sorted
  embedding_bag 264 ms (a stable CPU sort alone costs 192 ms).
- triton (CUDA; CPU under TRITON_INTERPRET=1): three kernels, fp32 accumulation throughout:
  `_fwd` (one program per [BLOCK_B tokens x BLOCK_D features] tile, looping over the k codes),
  `_grad_values` (one program per [BLOCK_B tokens x BLOCK_K codes], looping over d), and for W_dec either
  `_grad_wdec_atomic` (fp32 atomic adds: fast, summation order not fixed) or, with
  deterministic=True, `_grad_wdec_rows` (the (row, token) pairs sorted by row once with a stable
  sort, one program per [W_dec row x BLOCK_D] summing its pairs in sorted order: bit-identical across
  runs on the same device and shapes).

Determinism of the torch path: embedding_bag with mode="sum" is deterministic on CPU, and on CUDA its
backward is sort-based (PyTorch's reproducibility notes list only mode="max" as non-deterministic), so
`deterministic` only changes the Triton path.

AuxK (`auxk_loss`, `decode_aux`): the auxiliary loss on dead latents (Gao et al. 2024, section 2.4.1
"Auxiliary loss" and Appendix A.2).

Given the residual of the main reconstruction e = x - x^ (detached) and the top-k_aux dead latents of
each token (values v_aux >= 0 after ReLU, indices i_aux; produced by `encode_topk(..., dead_mask,
k_aux)`), the dead latents reconstruct the residual through the decoder WITHOUT b_dec:

    e^[b]  = sum_j v_aux[b, j] W_dec[i_aux[b, j]]
    L_aux  = sum_b ||e[b] - e^[b]||^2 / sum_b ||e[b] - mean_b(e)||^2      (normalised MSE)

NaN/Inf (e.g. a zero-variance residual) are replaced by 0, as in the paper's reference code; the
loss is 0 when there is no AuxK term (k_aux == 0 or no dead latents: the encoder returns None).
Implementations (`backend`):
- triton (CUDA; CPU under TRITON_INTERPRET=1): `sparse_decode`'s forward kernel decodes e^ (fp32,
  no b_dec); e - e^ (kept for the backward) and its sum of squares are torch ops. The backward feeds
  -2 (e - e^) * dL/dnum to `sparse_decode`'s gradient kernels (values: gathered dot products;
  W_dec: fp32 atomic scatter).
- torch (CPU): embedding_bag, or, when the batch's aux latents span few distinct rows u, a dense
  [B, u] code block times W_dec[u] (`_common.dense_rows_block`; never [B, n]).
The denominator sum_b ||e_b - mean(e)||^2 is a torch fp32 reduction over [B, d] in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import Launch, check_sparse_codes, csr_offsets, dense_rows_block, drop_padding, resolve_backend

try:  # a module global, because Triton 3.3 resolves the kernels' `tl.constexpr` annotations in it
    import triton.language as tl  # noqa: F401
except Exception:  # the module (and the torch path) works without Triton
    tl = None

__all__ = ["sparse_decode", "sparse_decode_reference", "auxk_loss", "auxk_loss_reference", "decode_aux",
           "safe_ratio"]

# Tile sizes (powers of two). Tests pick shapes that cross these boundaries.
BLOCK_B = 16
BLOCK_D = 64
BLOCK_K = 8  # codes per program of the grad-values kernel (one grad_out load serves BLOCK_K codes)
BLOCK_P = 16  # (row, token) pairs per inner step of the deterministic W_dec-gradient kernel


def _check(values, indices, W_dec, b_dec):
    has_pad = check_sparse_codes(values, indices, W_dec)
    if b_dec is not None and (b_dec.dim() != 1 or b_dec.shape[0] != W_dec.shape[1]):
        raise ValueError(
            f"b_dec must be [d_in={W_dec.shape[1]}], got shape {tuple(b_dec.shape)}"
        )
    return has_pad


def sparse_decode_reference(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch sparse decode (plain autograd; the CPU path): sum_j values[b,j] W_dec[indices[b,j]] + b_dec.

    Args:
      values [B, k] float: TopK activations (cast to W_dec's dtype).
      indices [B, k] int64 (int32 accepted) in [0, d_sae), or -1 for padding (no latent; its
        value is ignored and gets zero gradient).
      W_dec [d_sae, d_in] float.
      b_dec [d_in] or None: added to every row (Gao et al. 2024, eq. 2).
    Returns x_hat [B, d_in] in W_dec's dtype. Differentiable w.r.t. values, W_dec and b_dec; never
    materialises [B, d_sae] or [B, k, d_in] (F.embedding_bag, mode="sum").
    Raises ValueError on mismatched shapes, non-integer indices, indices out of range (CPU), or
    tensors on different devices.
    """
    values, indices = drop_padding(values, indices, _check(values, indices, W_dec, b_dec))
    x = F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
    if b_dec is not None:
        x = (x + b_dec).to(W_dec.dtype)
    return x


# ----------------------------------------------------------------------------------------- Triton
_KERNELS = None


def _kernels():
    """(triton, _fwd, _grad_values, _grad_wdec_atomic, _grad_wdec_rows): the Triton kernels, defined on first
    use (so importing this module never needs Triton), one factory per kernel. Every pointer offset is int64
    (d_sae x d_in and B x k_aux can reach 2^31)."""
    global _KERNELS
    if _KERNELS is None:
        import triton

        _KERNELS = (triton, _fwd_kernel(), _grad_values_kernel(), _grad_wdec_atomic_kernel(),
                    _grad_wdec_rows_kernel())
    return _KERNELS


def _fwd_kernel():
    """The forward kernel: one program per [BB tokens x BD features] tile of OUT [B, D], summing V[b, j] *
    W[IDX[b, j]] over the K codes (index -1 or >= N: padding, skipped) plus BP when HAS_BP; fp32 accumulation."""
    import triton
    import triton.language as tl

    @triton.jit
    def _fwd(V, IDX, W, BP, OUT, B, K, D, N, s_vb, s_ib, s_wn, s_ob,
             HAS_BP: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr):
        rb = tl.program_id(0) * BB + tl.arange(0, BB)
        rd = tl.program_id(1) * BD + tl.arange(0, BD)
        mb = rb < B
        md = rd < D
        m2 = mb[:, None] & md[None, :]
        rb, rd = rb.to(tl.int64), rd.to(tl.int64)
        acc = tl.zeros((BB, BD), dtype=tl.float32)
        for j in range(0, K):
            idx = tl.load(IDX + (rb * s_ib + j), mask=mb, other=-1).to(tl.int64)
            ok = (idx >= 0) & (idx < N)  # -1 = padding: contributes nothing
            v = tl.load(V + (rb * s_vb + j), mask=ok, other=0.0).to(tl.float32)
            w = tl.load(W + idx[:, None] * s_wn + rd[None, :], mask=ok[:, None] & md[None, :],
                        other=0.0).to(tl.float32)
            acc += v[:, None] * w
        if HAS_BP:
            acc += tl.load(BP + rd, mask=md, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + rb[:, None] * s_ob + rd[None, :], acc.to(OUT.dtype.element_ty), mask=m2)

    return _fwd


def _grad_values_kernel():
    """The values-gradient kernel: one program per [BB tokens x BK codes] tile of GV [B, K], the dot
    products <GO[b], W[IDX[b, j]]> over D in steps of BD (padding codes get 0); fp32 accumulation."""
    import triton
    import triton.language as tl

    @triton.jit
    def _grad_values(GO, IDX, W, GV, B, K, D, N, s_gb, s_ib, s_wn, s_vb,
                     BB: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
        # One program: BB tokens x BK codes; each grad_out tile is loaded once for BK codes.
        rb = tl.program_id(0) * BB + tl.arange(0, BB)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        mb = rb < B
        mbk = mb[:, None] & (rk < K)[None, :]
        rb, rk = rb.to(tl.int64), rk.to(tl.int64)
        idx = tl.load(IDX + rb[:, None] * s_ib + rk[None, :], mask=mbk, other=-1).to(tl.int64)
        ok = (idx >= 0) & (idx < N)
        acc = tl.zeros((BB, BK), dtype=tl.float32)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            md = rd < D
            rd = rd.to(tl.int64)
            g = tl.load(GO + rb[:, None] * s_gb + rd[None, :],
                        mask=mb[:, None] & md[None, :], other=0.0).to(tl.float32)
            w = tl.load(W + idx[:, :, None] * s_wn + rd[None, None, :],
                        mask=ok[:, :, None] & md[None, None, :], other=0.0).to(tl.float32)
            acc += tl.sum(g[:, None, :] * w, axis=2)
        tl.store(GV + rb[:, None] * s_vb + rk[None, :], acc.to(GV.dtype.element_ty), mask=mbk)

    return _grad_values


def _grad_wdec_atomic_kernel():
    """The atomic W_dec-gradient kernel: one program per [BB tokens x BD features] tile of GO, adding
    V[b, j] * GO[b] into GW's row IDX[b, j] with fp32 atomic adds (summation order not fixed)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _grad_wdec_atomic(GO, IDX, V, GW, B, K, D, N, s_gb, s_ib, s_vb, s_wn, s_wd,
                          BB: tl.constexpr, BD: tl.constexpr):
        rb = tl.program_id(0) * BB + tl.arange(0, BB)
        rd = tl.program_id(1) * BD + tl.arange(0, BD)
        mb = rb < B
        md = rd < D
        rb, rd = rb.to(tl.int64), rd.to(tl.int64)
        g = tl.load(GO + rb[:, None] * s_gb + rd[None, :], mask=mb[:, None] & md[None, :], other=0.0)
        g = g.to(tl.float32)
        for j in range(0, K):
            idx = tl.load(IDX + (rb * s_ib + j), mask=mb, other=-1).to(tl.int64)
            ok = (idx >= 0) & (idx < N)
            v = tl.load(V + (rb * s_vb + j), mask=ok, other=0.0).to(tl.float32)
            # relaxed: a sum needs atomicity, not ordering against other memory operations
            tl.atomic_add(GW + (idx[:, None] * s_wn + rd[None, :] * s_wd), v[:, None] * g,
                          mask=ok[:, None] & md[None, :], sem="relaxed")

    return _grad_wdec_atomic


def _grad_wdec_rows_kernel():
    """The deterministic W_dec-gradient kernel: one program per [GW row r x BD features] tile, summing
    WT[p] * GO[TOK[p]] over the row's (row, token) pairs p in [OFFS[r], OFFS[r + 1]) in sorted order, BP at a time."""
    import triton
    import triton.language as tl

    @triton.jit
    def _grad_wdec_rows(GO, TOK, WT, OFFS, GW, D, s_gb, s_wn,
                        BP: tl.constexpr, BD: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        rd = tl.program_id(1) * BD + tl.arange(0, BD)
        md = rd < D
        rd = rd.to(tl.int64)
        start = tl.load(OFFS + r)
        end = tl.load(OFFS + (r + 1))
        acc = tl.zeros((BD,), dtype=tl.float32)
        for p0 in range(start, end, BP):
            rp = p0 + tl.arange(0, BP).to(tl.int64)
            mp = rp < end
            tok = tl.load(TOK + rp, mask=mp, other=0).to(tl.int64)
            w = tl.load(WT + rp, mask=mp, other=0.0).to(tl.float32)
            g = tl.load(GO + tok[:, None] * s_gb + rd[None, :], mask=mp[:, None] & md[None, :],
                        other=0.0)
            acc += tl.sum(w[:, None] * g.to(tl.float32), axis=0)
        tl.store(GW + r * s_wn + rd, acc.to(GW.dtype.element_ty), mask=md)

    return _grad_wdec_rows


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _empty(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output buffer of the Triton path (tests replace it with a NaN-filled one to check
    that every element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


# Launches (`_common.Launch`): what runs, what `sae_dist.kernels.report` compiles offline.
def forward_launch(values, indices, W_dec, b_dec, out) -> Launch:
    """out [B, d] = sum_j values[b, j] W_dec[indices[b, j]] (+ b_dec), fp32 accumulation."""
    B, K = values.shape
    D = W_dec.shape[1]
    bp = b_dec if b_dec is not None else W_dec  # dummy pointer when HAS_BP is False
    return Launch("fwd", _kernels()[1], (_cdiv(B, BLOCK_B), _cdiv(D, BLOCK_D)),
                  (values, indices, W_dec, bp, out, B, K, D, W_dec.shape[0],
                   values.stride(0), indices.stride(0), W_dec.stride(0), out.stride(0)),
                  dict(HAS_BP=b_dec is not None, BB=BLOCK_B, BD=BLOCK_D))


def grad_values_launch(grad_out, indices, W_dec, gv) -> Launch:
    """gv [B, k] = <grad_out[b], W_dec[indices[b, j]]>."""
    B, K = indices.shape
    return Launch("grad_values", _kernels()[2], (_cdiv(B, BLOCK_B), _cdiv(K, BLOCK_K)),
                  (grad_out, indices, W_dec, gv, B, K, W_dec.shape[1], W_dec.shape[0], grad_out.stride(0),
                   indices.stride(0), W_dec.stride(0), gv.stride(0)),
                  dict(BB=BLOCK_B, BK=BLOCK_K, BD=BLOCK_D))


def grad_wdec_atomic_launch(grad_out, indices, values, gw) -> Launch:
    """gw [n, d] (fp32, zeroed; any strides, e.g. the transposed view of a [d, n] W_enc gradient)
    += values[b, j] grad_out[b] at rows indices[b, j], by atomic adds."""
    B, K = indices.shape
    D = grad_out.shape[1]
    return Launch("grad_wdec_atomic", _kernels()[3], (_cdiv(B, BLOCK_B), _cdiv(D, BLOCK_D)),
                  (grad_out, indices, values, gw, B, K, D, gw.shape[0],
                   grad_out.stride(0), indices.stride(0), values.stride(0), gw.stride(0), gw.stride(1)),
                  dict(BB=BLOCK_B, BD=BLOCK_D))


def grad_wdec_rows_launch(grad_out, tok, wt, offs, gw) -> Launch:
    """gw [n, d]: row r sums wt[p] grad_out[tok[p]] over its pairs p in [offs[r], offs[r + 1])."""
    n, D = gw.shape
    return Launch("grad_wdec_rows", _kernels()[4], (n, _cdiv(D, BLOCK_D)),
                  (grad_out, tok, wt, offs, gw, D, grad_out.stride(0), gw.stride(0)),
                  dict(BP=BLOCK_P, BD=BLOCK_D))


def triton_decode_forward(values, indices, W_dec, b_dec, out_dtype=None):
    """Forward kernel only (no autograd): x_hat [B, d] in `out_dtype` (default W_dec's dtype), fp32
    accumulation."""
    B = values.shape[0]
    out = _empty((B, W_dec.shape[1]), out_dtype or W_dec.dtype, W_dec.device)
    if B:
        forward_launch(values, indices, W_dec, b_dec, out).run()
    return out


def triton_grad_values(grad_out, indices, W_dec, values_dtype):
    """grad_values[b, j] = <grad_out[b], W_dec[indices[b, j]]>, [B, k] in values_dtype."""
    B, K = indices.shape
    gv = _empty((B, K), values_dtype, W_dec.device)
    if B == 0 or K == 0:
        return gv.zero_()
    grad_values_launch(grad_out, indices, W_dec, gv).run()
    return gv


def triton_grad_wdec(grad_out, indices, values, d_sae, out_dtype, deterministic):
    """grad_W_dec [n, d] = sparse-transpose scatter of values[b, j] * grad_out[b] into rows indices[b, j].

    deterministic=False: fp32 atomic adds (summation order varies between runs).
    deterministic=True: stable sort of the pairs by row, one program per row and feature tile,
    summing in sorted order (bit-identical across runs).
    """
    B, K = indices.shape
    D = grad_out.shape[1]
    dev = grad_out.device
    if not deterministic:
        gw = torch.zeros((d_sae, D), dtype=torch.float32, device=dev)
        if B and K:
            grad_wdec_atomic_launch(grad_out, indices, values, gw).run()
        return gw.to(out_dtype)
    flat = indices.reshape(-1).long()
    flat = torch.where((flat >= 0) & (flat < d_sae), flat, d_sae)  # padding -> sentinel row n
    rows_sorted, perm = torch.sort(flat, stable=True)
    tok = torch.div(perm, K, rounding_mode="floor").contiguous()
    wt = values.reshape(-1)[perm].contiguous()
    offs = csr_offsets(rows_sorted, d_sae)  # the sentinel rows (d_sae) left out
    gw = _empty((d_sae, D), out_dtype, dev)
    if d_sae:
        grad_wdec_rows_launch(grad_out, tok, wt, offs, gw).run()
    return gw


class _SparseDecodeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec, deterministic):
        values = values.contiguous()
        indices = indices.contiguous()
        W_dec_c = W_dec.contiguous()
        b_dec_c = None if b_dec is None else b_dec.contiguous()
        out = triton_decode_forward(values, indices, W_dec_c, b_dec_c)
        ctx.save_for_backward(values, indices, W_dec_c)
        ctx.deterministic = deterministic
        ctx.b_dec_dtype = None if b_dec is None else b_dec.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        gv = gw = gb = None
        if ctx.needs_input_grad[0]:
            gv = triton_grad_values(grad_out, indices, W_dec, values.dtype)
        if ctx.needs_input_grad[2]:
            gw = triton_grad_wdec(grad_out, indices, values, W_dec.shape[0], W_dec.dtype,
                                  ctx.deterministic)
        if ctx.needs_input_grad[3]:
            gb = grad_out.sum(0, dtype=torch.float32).to(ctx.b_dec_dtype)
        return gv, None, gw, gb, None


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    deterministic: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Sparse TopK decode x^ = sum_j values[b,j] W_dec[indices[b,j]] + b_dec (Gao et al. 2024, eq. 2,
    sparse decoder kernel of the paper's systems appendix).

    Args:
      values [B, k] float: the TopK activations.
      indices [B, k] int64 (int32 accepted) in [0, d_sae); repeats within or across rows are
        allowed (they add up); -1 marks padding (no latent, value ignored, zero gradient). On CUDA
        the range is not checked: the Triton kernels skip any index outside [0, d_sae).
      W_dec [d_sae, d_in] float (fp32, bf16 or fp16).
      b_dec [d_in] or None.
      deterministic: Triton only: grad of W_dec by a row-sorted segment sum instead of atomic adds,
        bit-identical across runs (the torch path is always deterministic). Also switched on by
        `torch.use_deterministic_algorithms(True)`.
      backend: "auto" (Triton when the tensors are on CUDA and Triton imports, else torch),
        "triton" (forced; on CPU only with TRITON_INTERPRET=1), or "torch".
    Returns x_hat [B, d_in] in W_dec's dtype (Triton accumulates in fp32, then casts).
    Differentiable w.r.t. values, W_dec and b_dec; the backward never materialises [B, d_sae].
    Raises ValueError on bad shapes/dtypes/devices, indices out of range (checked on CPU), or an unknown
    backend; RuntimeError when Triton is forced but unavailable.
    """
    which = resolve_backend(backend, values, indices, W_dec, b_dec)
    if which == "torch":
        return sparse_decode_reference(values, indices, W_dec, b_dec)
    _check(values, indices, W_dec, b_dec)
    det = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    return _SparseDecodeTriton.apply(values, indices, W_dec, b_dec, det)


# ========================================================================================= AuxK

def _zero_loss(W_dec: torch.Tensor) -> torch.Tensor:
    # An exact 0 that stays in W_dec's graph (the sum over an empty slice), so `.backward()` on it,
    # alone or summed into the main loss, works and contributes zero gradient.
    return W_dec[:0].sum().float()


def _validate(aux_values, aux_indices, W_dec, residual):
    if (aux_values is None) != (aux_indices is None):
        raise ValueError(
            "aux_values and aux_indices must both be tensors or both be None, got "
            f"{type(aux_values).__name__} and {type(aux_indices).__name__}"
        )
    if not residual.is_floating_point() or residual.device != W_dec.device:
        raise ValueError(
            f"residual must be a floating tensor on W_dec's device ({W_dec.device}), got "
            f"{residual.dtype} on {residual.device}"
        )
    if residual.dim() != 2 or residual.shape[1] != W_dec.shape[1]:
        raise ValueError(
            f"residual must be [B, d_in={W_dec.shape[1]}], got shape {tuple(residual.shape)}"
        )
    if aux_values is None:
        return True
    check_sparse_codes(aux_values, aux_indices, W_dec, names=("aux_values", "aux_indices"))
    if aux_values.shape[0] != residual.shape[0]:
        raise ValueError(
            f"aux_values has B={aux_values.shape[0]} rows but residual has B={residual.shape[0]}"
        )
    return aux_values.shape[1] == 0 or aux_values.shape[0] == 0


def _normalised_mse(residual: torch.Tensor, e_hat: torch.Tensor) -> torch.Tensor:
    # mse_loss: one fused pass forward and backward (2.7 ms against 6.7 for sub/pow/sum at [4096, 576])
    sse = F.mse_loss(e_hat.float(), residual.detach().float(), reduction="sum")
    return safe_ratio(sse, _residual_ss(residual))


def _decode_aux_torch(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                      sparse_grad: bool = False) -> torch.Tensor:
    """e^ [B, d] = sum_j values[b, j] W_dec[indices[b, j]] on the torch path: a dense [B, u] code block
    times W_dec[u] when the codes span few distinct latents u (`_common.dense_rows_block`), else
    embedding_bag."""
    if not W_dec.is_cuda:
        v, i = drop_padding(values, indices, bool((indices < 0).any()))
        block = dense_rows_block(v, i.long(), W_dec.shape[0], W_dec.dtype)
        if block is not None:
            rows, Z = block
            if sparse_grad:
                return _DenseRowsDecode.apply(Z, W_dec, rows)
            return Z @ W_dec[rows]
    return sparse_decode_reference(values, indices, W_dec, None)


def _mm_padded_t(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [B, d] @ w[u, d].t() -> [B, u], with w zero-padded to a multiple of 16 rows for the product
    (returned as a [B, u] view): CPU BLAS is ~1.4x slower at an odd output width (measured 29 ms at
    u=819 against 21 ms at u=832 for B=4096, d=576, fp32, 2 threads)."""
    u = w.shape[0]
    pad = -u % 16
    if pad == 0:
        return a @ w.t()
    return (a @ F.pad(w, (0, 0, 0, pad)).t())[:, :u]


class _DenseRowsDecode(torch.autograd.Function):
    """Z [B, u] @ W_dec[rows] [u, d] whose W_dec gradient is a row-sparse COO tensor (the u rows):
    autograd adds it into the main decode's dense W_dec gradient, instead of materialising and adding
    a second zero-filled [n, d] gradient (measured ~13 ms less per step at n=16384, d=576, u=859).
    Only for callers whose W_dec also gets a dense gradient in the same backward (else W_dec.grad
    would end up sparse): `auxk_loss(..., sparse_grad=True)`."""

    @staticmethod
    def forward(ctx, Z, W_dec, rows):
        W_rows = W_dec.index_select(0, rows)
        ctx.save_for_backward(Z, W_rows, rows)
        ctx.n_rows = W_dec.shape[0]
        return Z @ W_rows

    @staticmethod
    def backward(ctx, grad):
        Z, W_rows, rows = ctx.saved_tensors
        grad = grad.to(W_rows.dtype)  # the forward may have run under autocast
        gZ = _mm_padded_t(grad, W_rows).to(Z.dtype) if ctx.needs_input_grad[0] else None
        gW = None
        if ctx.needs_input_grad[1]:
            gW = torch.sparse_coo_tensor(rows.unsqueeze(0), Z.t() @ grad, (ctx.n_rows, W_rows.shape[1]),
                                         is_coalesced=True, check_invariants=False)
        return gZ, gW, None


# ----------------------------------------------------------------------------------------- Triton
class _AuxSSETriton(torch.autograd.Function):
    """sum_b ||e_b - e^_b||^2 (0-d fp32) with e^ the sparse decode of (values, indices) by Triton."""

    @staticmethod
    def forward(ctx, values, indices, W_dec, residual, deterministic):
        values, indices = values.contiguous(), indices.contiguous()
        W_dec = W_dec.contiguous()
        e = residual.detach().contiguous()
        # e^ by sparse_decode's forward kernel (fp32 output, no b_dec), then e - e^ and its sum of
        # squares in torch: one [B, d] fp32 buffer more than a fused kernel, and no second decode loop.
        e_hat = triton_decode_forward(values, indices, W_dec, None, out_dtype=torch.float32)
        diff = e.float() - e_hat
        ctx.save_for_backward(values, indices, W_dec, diff)
        ctx.deterministic = deterministic
        return diff.pow(2).sum()

    @staticmethod
    def backward(ctx, grad):
        values, indices, W_dec, diff = ctx.saved_tensors
        g_ehat = diff * (-2.0 * grad.float())  # d(sum ||e - e^||^2)/d e^ = -2 (e - e^)
        gv = gw = None
        if ctx.needs_input_grad[0]:
            gv = triton_grad_values(g_ehat, indices, W_dec, values.dtype)
        if ctx.needs_input_grad[2]:
            gw = triton_grad_wdec(g_ehat, indices, values, W_dec.shape[0], W_dec.dtype,
                                      ctx.deterministic)
        return gv, None, gw, None, None


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den (0-d tensors) with NaN/Inf results, and den <= 0, replaced by 0 (the paper's AuxK
    convention), with finite (zero) gradients and no host synchronisation."""
    # nan_to_num alone would back-propagate 0 * (1/0) = NaN through the division, so the denominator
    # is replaced before dividing.
    ok = torch.isfinite(den) & (den > 0)
    ratio = num / torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok & torch.isfinite(ratio), ratio, torch.zeros_like(ratio))


def _residual_ss(residual: torch.Tensor) -> torch.Tensor:
    e = residual.detach().float()
    return (e - e.mean(0, keepdim=True)).pow(2).sum()


def decode_aux(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, *, backend: str = "auto",
               sparse_grad: bool = False, deterministic: bool = False) -> torch.Tensor:
    """The AuxK reconstruction e^ [B, d_in] = sum_j values[b, j] W_dec[indices[b, j]] (no b_dec) of
    values / indices [B, k_aux] (index -1: padding, value ignored), in W_dec's dtype.

    backend "torch" (or "auto" off CUDA): a dense [B, u] code block times the u distinct rows when the
    codes span few latents, else embedding_bag; with `sparse_grad` the W_dec gradient of that block is a
    row-sparse COO tensor (see `auxk_loss`). Triton: `sparse_decode`'s kernels. Raises as `sparse_decode`.
    """
    which = resolve_backend(backend, W_dec, values, indices)
    if which == "torch":
        return _decode_aux_torch(values, indices, W_dec, sparse_grad)
    return sparse_decode(values, indices, W_dec, None, deterministic=deterministic, backend="triton")


def auxk_loss_reference(
    aux_values: torch.Tensor | None,
    aux_indices: torch.Tensor | None,
    W_dec: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """Plain torch AuxK loss (embedding_bag decode, then the normalised MSE): the oracle of the kernels,
    with the contract of `auxk_loss` (shapes, NaN -> 0, zero for None / k_aux == 0, errors)."""
    if _validate(aux_values, aux_indices, W_dec, residual):
        return _zero_loss(W_dec)
    e_hat = sparse_decode_reference(aux_values, aux_indices, W_dec, None)
    return _normalised_mse(residual, e_hat)


def auxk_loss(
    aux_values: torch.Tensor | None,
    aux_indices: torch.Tensor | None,
    W_dec: torch.Tensor,
    residual: torch.Tensor,
    *,
    deterministic: bool = False,
    backend: str = "auto",
    sparse_grad: bool = False,
) -> torch.Tensor:
    """AuxK loss (Gao et al. 2024, section 2.4.1, Appendix A.2): normalised MSE of the residual's
    reconstruction by the top-k_aux dead latents, sparse-decoded without b_dec.

    Args:
      aux_values [B, k_aux] float (ReLU'd pre-activations of dead latents) or None.
      aux_indices [B, k_aux] int64 in [0, d_sae), -1 for padding (fewer dead latents than k_aux;
        the value is ignored), or None (None/None or k_aux == 0: no AuxK term).
      W_dec [d_sae, d_in].
      residual [B, d_in]: e = x - x^ of the main reconstruction; treated as a constant (detached).
    Returns a 0-d float32 tensor
        sum_b ||e_b - e^_b||^2 / sum_b ||e_b - mean_b(e)||^2,
    with NaN/Inf replaced by 0, and an exact 0 (still differentiable, zero gradient) when there is no
    AuxK term. Gradients flow to aux_values and W_dec only.
    deterministic: Triton only: W_dec gradient by the row-sorted segment sum of `sparse_decode`
      (bit-identical across runs) instead of atomic adds; also on under
      `torch.use_deterministic_algorithms(True)`.
    backend: "auto" | "torch" | "triton", as in `sparse_decode` (Triton: sparse_decode's kernels).
    sparse_grad: torch path only: when the dense-rows decode runs, W_dec's gradient from this loss is
      a row-sparse COO tensor over the batch's aux latents. Set it only when the same backward also
      gives W_dec a dense gradient (the SAE's main decode does), which autograd then sums into.
    Raises ValueError on mismatched shapes (naming them), a lone None, or indices out of range (CPU).
    """
    which = resolve_backend(backend, W_dec, residual,
                            *(t for t in (aux_values, aux_indices) if t is not None))
    if _validate(aux_values, aux_indices, W_dec, residual):
        return _zero_loss(W_dec)
    if which == "torch":
        return _normalised_mse(residual, decode_aux(aux_values, aux_indices, W_dec, backend="torch",
                                                    sparse_grad=sparse_grad))
    det = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    num = _AuxSSETriton.apply(aux_values, aux_indices, W_dec, residual, det)
    return safe_ratio(num, _residual_ss(residual))
