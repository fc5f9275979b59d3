#!/usr/bin/env bash
# One node, NPROC workers: `sae-train` (or another sae-dist app) under torchrun.
#
#   launch/torchrun.sh NPROC [hydra overrides...]
#   launch/torchrun.sh 2 run_dir=runs/tp2 store.path=runs/demo/activations.zarr parallel.tp=2 device=cpu
#   launch/torchrun.sh 8 run_dir=runs/big store.path=/data/acts.zarr sae.d_sae=1048576 parallel.tp=8
#
# Every rank runs the same Hydra command; the mesh is dp x tp with dp = NPROC / parallel.tp.
# `run_dir=` is required: all ranks must write to one directory (the config's default name holds the
# current time, which can differ between ranks), and rerunning the same command resumes from
# <run_dir>/checkpoints/. Without `device=` it adds device=cuda when `nvidia-smi -L` lists a GPU and
# device=cpu (gloo backend) otherwise.
#
# Fail fast: --max-restarts 0, so when one rank dies torchrun stops the others and exits non-zero
# with a "Root Cause" block naming the rank, its exit code and its traceback (the entry points are
# wrapped in torch.distributed.elastic's @record, which writes
# <run_dir>/torchrun_logs/<id>/attempt_0/<local_rank>/error.json). A rank that hangs instead of dying
# is caught by the collective timeout, SAE_DIST_TIMEOUT_S.
#
# Environment (all optional):
#   SAE_TRAIN        the app to run (default: sae-train of this checkout's .venv, else on PATH);
#                    e.g. SAE_TRAIN=.venv/bin/sae-harvest to harvest with NPROC workers
#   TORCHRUN         the torchrun executable (default: this checkout's .venv/bin/torchrun, else PATH)
#   SAE_DIST_LOG_DIR torchrun's per-rank error files (default <run_dir>/torchrun_logs)
#   SAE_DIST_TIMEOUT_S  collective timeout in seconds (read by sae_dist; default 600 GPU, 120 CPU)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING  set to 1 here unless given: a failed NCCL collective aborts
#                    the process instead of hanging
#   OMP_NUM_THREADS  threads per rank (torchrun sets 1 when unset)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun gives the workers to checkpoint and stop after a
#                    SIGTERM before it kills them (default here 270; torchrun's own 30)
# Full guide: docs/cluster.md.
set -euo pipefail

usage() {
    sed -n '2,/^# Full guide/s/^# \{0,1\}//p' "$0"
}

if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi
case "$1" in
    -h | --help) usage; exit 0 ;;
esac

nproc=$1
shift
if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/torchrun.sh: NPROC must be a positive integer, got '$nproc' (usage: launch/torchrun.sh NPROC [overrides...])" >&2
    exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Hydra overrides: find run_dir= and device=, refuse a multirun (sweeps go through hydra/launcher).
run_dir=""
has_device=0
for arg in "$@"; do
    case "$arg" in
        run_dir=*) run_dir=${arg#run_dir=} ;;
        device=*) has_device=1 ;;
        -m | --multirun)
            echo "launch/torchrun.sh: '$arg' is a Hydra sweep; run sweeps with 'sae-train -m hydra/launcher=slurm|local ...' (docs/cluster.md), not under torchrun" >&2
            exit 2 ;;
    esac
done
if [[ -z $run_dir ]]; then
    echo "launch/torchrun.sh: pass run_dir=DIR: every rank must write to the same run directory (and a rerun resumes from DIR/checkpoints)" >&2
    exit 2
fi

device_args=()
if [[ $has_device == 0 ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        device_args=(device=cuda)
    else
        device_args=(device=cpu)
    fi
fi

pick() {  # pick ENV_VALUE VENV_PATH NAME: first of the env override, this checkout's venv, PATH
    if [[ -n $1 ]]; then echo "$1"
    elif [[ -x $2 ]]; then echo "$2"
    else command -v "$3" || { echo "launch/torchrun.sh: '$3' not found: install the project (make install) or set the environment variable" >&2; return 1; }
    fi
}
sae_train=$(pick "${SAE_TRAIN:-}" "$here/.venv/bin/sae-train" sae-train)
torchrun=$(pick "${TORCHRUN:-}" "$here/.venv/bin/torchrun" torchrun)

export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# after it forwards a SIGTERM or Ctrl-C, torchrun waits this long for the workers to checkpoint (its default: 30 s)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-270}
log_dir=${SAE_DIST_LOG_DIR:-$run_dir/torchrun_logs}

cmd=("$torchrun" --standalone --nnodes 1 --nproc-per-node "$nproc" --max-restarts 0
     --log-dir "$log_dir" --no-python "$sae_train" "$@" "${device_args[@]}")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
