# Shared by slurm/*.sbatch (sourced from $REAL_MEGATRON_HOME/slurm/common.sh: Slurm runs a copy of
# the batch script from its spool directory, so the checkout is found through that variable).
# Settings: edit here, or export them before sbatch (sbatch passes the environment on).

REAL_MEGATRON=${REAL_MEGATRON:-$REAL_MEGATRON_HOME/.venv/bin/real-megatron}  # in a container: real-megatron
MODULES=${MODULES:-}                  # e.g. "cuda/12.4 nccl/2.21", loaded with `module load`
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}  # pyxis/enroot image for every step, e.g. nvcr.io#nvidia/pytorch:25.01-py3
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$REAL_MEGATRON_HOME:$REAL_MEGATRON_HOME}
# Network: uncomment what your site documents.
# export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0
# export NCCL_IB_HCA=mlx5 NCCL_IB_GID_INDEX=3
# export NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=1

die() { echo "$(basename "${SCRIPT:-sbatch}"): $*" >&2; exit 2; }

cd "$REAL_MEGATRON_HOME" || die "REAL_MEGATRON_HOME=$REAL_MEGATRON_HOME does not exist"
if [[ -n $MODULES ]]; then module load $MODULES || die "module load $MODULES failed"; fi
[[ -x $REAL_MEGATRON || -n $CONTAINER_IMAGE ]] || die "$REAL_MEGATRON not found: run tools/install.sh or set REAL_MEGATRON"

CONTAINER=()
[[ -n $CONTAINER_IMAGE ]] && CONTAINER=(--container-image="$CONTAINER_IMAGE" --container-mounts="$CONTAINER_MOUNTS"
                                        --container-workdir="$REAL_MEGATRON_HOME")
# Slurm >= 22.05 no longer hands the job's --cpus-per-task to srun: a step would get one CPU per
# task. Steps that do not ask for their own count get the job's (older Slurm reads the same value).
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
# one job step, inside the container when one is set
step() { srun --open-mode=append "${CONTAINER[@]}" "$@"; }

# torch.distributed rendezvous on node $1 (Slurm's address for it; node names need not resolve)
rendezvous_on() {
  MASTER_ADDR=$(scontrol show node "$1" | grep -oE 'NodeAddr=[^ ]+' | cut -d= -f2)
  MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
  export MASTER_ADDR MASTER_PORT
}

GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-0}; GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # "8" or "h100:8"
