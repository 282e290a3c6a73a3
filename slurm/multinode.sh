#!/usr/bin/env bash
# Template for several nodes of 8 GPUs: copy it, set the experiment and the resources, then
#   sbatch slurm/multinode.sh
# parallel.sp × parallel.dp in the experiment must equal nodes × ntasks-per-node (here 2 × 8:
# e.g. sp = 8 within each node, dp = 2 across nodes; SP groups are contiguous ranks, so keep sp
# a divisor of the GPUs per node and its all-to-alls stay on NVLink). The run directory
# (run.output_dir) and the data must be on a file system every node sees. Launch, preemption and
# requeue: slurm/launch.sh.
#SBATCH --job-name=ulysses
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
EXPERIMENT="${EXPERIMENT:-experiments/llama8b_1m.toml}"
# NCCL between nodes: name the fabric's interface if NCCL picks a wrong one, e.g.
# export NCCL_SOCKET_IFNAME=ib0
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
