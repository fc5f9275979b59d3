#!/usr/bin/env bash
# The architecture comparison of docs/architectures.md: Hydra multiruns of `sae-train` over every
# architecture and several sparsities on one store, each run evaluated right after training
# (eval.after_train=true -> eval.json), then `python -m sae_dist.eval.compare` over all of them.
#
#   launch/compare_architectures.sh STORE OUT_DIR [hydra overrides for every run...]
#   launch/compare_architectures.sh runs/demo/activations.zarr runs/compare
#   launch/compare_architectures.sh /data/acts.zarr runs/cmp sae.d_sae=65536 trainer.tokens=200000000 \
#       hydra/launcher=slurm        # one slurm task per run (conf/hydra/launcher/slurm.yaml)
#
# Runs go to OUT_DIR/<family>/<job num>_<architecture>_<setting>/; the table, JSON and plot to
# OUT_DIR/compare.{md,json,png}. The store must come from the model of the `model` group (the default
# SmolLM2 for the demo store), which the evaluation loads. Rerunning resumes unfinished runs.
#
# Environment (all optional; comma-separated Hydra sweep lists):
#   N_LATENTS   latents of every SAE (default 2048)
#   TOKENS      training tokens per run (default 500000)
#   K_LIST      k of topk, batchtopk, matryoshka (default 16,32,64)
#   TARGET_L0   target_l0 of jumprelu (default 16,32,64)
#   RELU_L1     l1_coef of relu (default 0.032,0.064,0.128)
#   PROLU_L1    l1_coef of prolu (default 0.016,0.032,0.064)
#   EXTRA_K     k of soft_topk and tree (default 32)
#   FAMILIES    which multiruns to run (default "topk relu prolu jumprelu extra")
#   SAE_TRAIN   the sae-train executable (default: this checkout's .venv, else PATH)
# Full guide: docs/architectures.md.
set -euo pipefail

usage() {
    sed -n '2,/^# Full guide/s/^# \{0,1\}//p' "$0"
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
esac
if [[ $# -lt 2 ]]; then
    usage >&2
    exit 2
fi
store=$1
out=$2
shift 2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${SAE_TRAIN:-} ]]; then
    sae_train=$SAE_TRAIN
elif [[ -x $here/.venv/bin/sae-train ]]; then
    sae_train=$here/.venv/bin/sae-train
else
    sae_train=$(command -v sae-train) || { echo "launch/compare_architectures.sh: sae-train not found: install the project or set SAE_TRAIN" >&2; exit 2; }
fi
python=$(dirname "$sae_train")/python
[[ -x $python ]] || python=python

common=("store.path=$store" "sae.d_sae=${N_LATENTS:-2048}" "trainer.tokens=${TOKENS:-500000}"
        "eval.after_train=true" "trainer.keep_checkpoints=1" "wandb.group=$(basename "$out")")

run() {  # run FAMILY SUBDIR_PATTERN OVERRIDES...
    local family=$1 subdir=$2
    shift 2
    local cmd=("$sae_train" -m "run_dir=$out/$family" "hydra.sweep.subdir=$subdir" "${common[@]}" "$@")
    echo "+ ${cmd[*]}" >&2
    "${cmd[@]}"
}

for family in ${FAMILIES:-topk relu prolu jumprelu extra}; do
    case "$family" in
        topk) run topk '${hydra.job.num}_${sae.architecture}_k${sae.k}' \
                  sae=topk,batchtopk,matryoshka "sae.k=${K_LIST:-16,32,64}" "$@" ;;
        relu) run relu '${hydra.job.num}_relu_l1_${sae.l1_coef}' \
                  sae=relu "sae.l1_coef=${RELU_L1:-0.032,0.064,0.128}" "$@" ;;
        prolu) run prolu '${hydra.job.num}_prolu_l1_${sae.l1_coef}' \
                  sae=prolu "sae.l1_coef=${PROLU_L1:-0.016,0.032,0.064}" "$@" ;;
        jumprelu) run jumprelu '${hydra.job.num}_jumprelu_l0_${sae.target_l0}' \
                  sae=jumprelu "sae.target_l0=${TARGET_L0:-16,32,64}" "$@" ;;
        extra) run extra '${hydra.job.num}_${sae.architecture}_k${sae.k}' \
                  sae=soft_topk,tree "sae.k=${EXTRA_K:-32}" "$@" ;;
        *) echo "launch/compare_architectures.sh: unknown family '$family' (topk relu prolu jumprelu extra)" >&2; exit 2 ;;
    esac
done

"$python" -m sae_dist.eval.compare "$out" --out "$out/compare.md" --json "$out/compare.json" \
    --plot "$out/compare.png" --title "$(basename "$store"): d_sae=${N_LATENTS:-2048}, ${TOKENS:-500000} tokens"
cat "$out/compare.md"
