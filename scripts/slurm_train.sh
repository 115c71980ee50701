#!/bin/bash
# Train one experiment on SLURM, one task per GPU, so that Lightning's SLURMEnvironment drives DDP and
# auto-requeue. Usually submitted by `make slurm EXP=ffhq256 NODES=4 GPUS=8 [ARGS="..."]`; by hand:
#
#   sbatch --nodes=4 --ntasks-per-node=8 --gres=gpu:8 scripts/slurm_train.sh ffhq256 [--model.x=... ...]
#
# The first argument is an experiment name (experiments/NAME.yaml) or a YAML path; the rest are `gmpi fit`
# overrides, passed through verbatim. Devices and nodes come from the allocation: --trainer.num_nodes=$SLURM_NNODES
# --trainer.devices=$SLURM_NTASKS_PER_NODE. Command-line `sbatch` options override the defaults below.
#
# CPUs: --cpus-per-task is per task, i.e. per GPU: 8 GPUs x 4 = 32 CPUs per node. Each task runs the training
# process plus data.num_workers loader workers (8 in experiments/ffhq*.yaml), so on nodes with more cores ask for
# more: `make slurm ... SBATCH_ARGS="--cpus-per-task=N"` (or `sbatch --cpus-per-task=N`), or give fewer workers
# (ARGS="--data.num_workers=3").
#
# Preemption / time limit: SLURM sends SIGUSR1 to every task 90 s before the end (--signal, no `B:` so the tasks
# get it, not this shell). Lightning's SLURMEnvironment (auto_requeue=True, requeue_signal=SIGUSR1, its defaults
# whenever SLURM is detected) then writes <default_root_dir>/hpc_ckpt_N.ckpt and runs `scontrol requeue $SLURM_JOB_ID`
# (needs --requeue). Every start, first or requeued, resumes from the newest of that hpc checkpoint and the run's
# <ModelCheckpoint dirpath>/last*.ckpt (`python -m gmpi_lightning.runs resume`, which resolves the config as
# `gmpi fit` does), unless the overrides already hold --ckpt_path.
#
#SBATCH --job-name=gmpi
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=0
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

die() { echo "slurm_train.sh: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || die "usage: sbatch [options] scripts/slurm_train.sh EXPERIMENT|CONFIG.yaml [gmpi fit overrides...]"
cd "${SLURM_SUBMIT_DIR:-.}"
config=$1
shift
[[ $config == *.yaml || $config == *.yml ]] || config=experiments/$config.yaml
if [[ ! -f $config ]]; then
    names=$(ls experiments/*.yaml 2>/dev/null | xargs -r -n1 basename | sed 's/\.yaml$//' | tr '\n' ' ')
    die "no experiment config '$config' (in $PWD). Experiments: ${names:-none found}"
fi
nodes=${SLURM_NNODES:-}
per_node=${SLURM_NTASKS_PER_NODE:-}
per_node=${per_node%%[!0-9]*}  # "8" (SLURM_TASKS_PER_NODE would read "8(x4)")
[[ -n $nodes ]] || die "SLURM_NNODES is not set: submit this script with sbatch (or run it inside an allocation)"
[[ -n $per_node ]] || die "SLURM_NTASKS_PER_NODE is not set: submit with --ntasks-per-node=GPUS (one task per GPU)"

python=python
[[ -x .venv/bin/python ]] && python=$PWD/.venv/bin/python
fit=(fit --config "$config" "--trainer.num_nodes=$nodes" "--trainer.devices=$per_node" "$@")

resume=()
if [[ " $* " == *" --ckpt_path"* ]]; then
    echo "slurm_train.sh: --ckpt_path given, not looking for a checkpoint to resume from" >&2
else
    ckpt=$("$python" -m gmpi_lightning.runs resume "${fit[@]}")
    [[ -n $ckpt ]] && resume=("--ckpt_path=$ckpt")
fi

echo "slurm_train.sh: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}), $nodes node(s) x $per_node task(s)," \
     "$(date '+%F %T')" >&2
set -x
# ${a[@]+"${a[@]}"}: an empty array under `set -u` is "unbound" for bash < 4.4
srun --kill-on-bad-exit=1 "$python" -m gmpi_lightning "${fit[@]}" ${resume[@]+"${resume[@]}"}
