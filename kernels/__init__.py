"""Triton kernels for the TopK SAE step, each with a torch reference of the same signature.

Installed as `sae_dist.kernels`. `backend="auto"` runs Triton on CUDA tensors and the torch path
elsewhere (the torch path is also the test oracle's counterpart); tests run the Triton code on CPU with
`TRITON_INTERPRET=1`. Importing this package never imports Triton. Import the ops from their modules, e.g.
`from sae_dist.kernels.sparse_decode import sparse_decode` (the package does not re-export them, so
each module name stays the module).

- `sparse_decode`: x^ = sum_j v_j W_dec[i_j] (+ b_pre), with gathered-dot / sparse-transpose backward.
- `auxk_loss`: AuxK's residual-normalised MSE of the dead latents' sparse decode.
- `encode_topk`: fused encoder + TopK (+ AuxK candidates) that never materialises [B, n].
"""
