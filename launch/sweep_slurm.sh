#!/usr/bin/env bash
# An n x k sweep (the paper's scaling-law grid) on slurm through Hydra's submitit launcher.
# Run it on the login node; it submits one slurm array task per (n, k) point, each one `sae-train`
# on one GPU, and waits until all have finished (run it inside tmux/screen, or with nohup).
#
#   launch/sweep_slurm.sh STORE SWEEP_DIR [hydra overrides...]
#   launch/sweep_slurm.sh /data/pythia410m.zarr runs/nk trainer.tokens=500000000 hydra.launcher.partition=gpu
#   LAUNCHER=local N_LIST=256,512 K_LIST=8 launch/sweep_slurm.sh runs/demo/activations.zarr runs/nk-test \
#       trainer.tokens=20000 device=cpu      # the same path on this machine (submitit's local executor)
#
# Each point writes SWEEP_DIR/<job num>_n<n>_k<k>/ (sae/, checkpoints/, train_log.jsonl, .hydra/);
# slurm logs go to SWEEP_DIR/.submitit/<job id>/. Rerunning the same command resumes every point from
# its latest checkpoint (finished points are no-ops). Points that hit the time limit are requeued by
# submitit and resume the same way (hydra.launcher.max_num_timeout, conf/hydra/launcher/slurm.yaml).
# Every point is evaluated right after training (eval.after_train=true: eval.json, with the LM of the
# `model` group, which must be the store's; pass eval.after_train=false to skip). A failing point does
# not stop the others: it is listed in SWEEP_DIR/sweep_summary.json and the command exits 1.
# Fit the scaling laws afterwards: sae-scaling SWEEP_DIR (docs/scaling.md).
#
# Environment (all optional):
#   N_LIST     comma-separated d_sae values (default 4096,16384,65536)
#   K_LIST     comma-separated k values (default 16,32,64)
#   LAUNCHER   slurm | local: the config under conf/hydra/launcher/ (default slurm)
#   SAE_TRAIN  the sae-train executable (default: this checkout's .venv, else PATH)
#   SAE_DIST_PARTITION, SAE_DIST_ACCOUNT, SAE_DIST_QOS   slurm defaults read by the slurm launcher config
# Full guide: docs/cluster.md.
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
sweep_dir=$2
shift 2

launcher=${LAUNCHER:-slurm}
case "$launcher" in
    slurm | local) ;;
    *) echo "launch/sweep_slurm.sh: LAUNCHER must be slurm or local, got '$launcher'" >&2; exit 2 ;;
esac
n_list=${N_LIST:-4096,16384,65536}
k_list=${K_LIST:-16,32,64}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${SAE_TRAIN:-} ]]; then
    sae_train=$SAE_TRAIN
elif [[ -x $here/.venv/bin/sae-train ]]; then
    sae_train=$here/.venv/bin/sae-train
else
    sae_train=$(command -v sae-train) || { echo "launch/sweep_slurm.sh: sae-train not found: install the project or set SAE_TRAIN" >&2; exit 2; }
fi

# User overrides come last so they win (e.g. a different wandb.group or hydra.launcher.timeout_min).
cmd=("$sae_train" -m "hydra/launcher=$launcher" "run_dir=$sweep_dir" "store.path=$store"
     "sae.d_sae=$n_list" "sae.k=$k_list" "wandb.group=$(basename "$sweep_dir")" "eval.after_train=true" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
