#!/usr/bin/env bash
# Several nodes of 8 GPUs, one rank per GPU: copy it or override on the command line, then
#   sbatch slurm/multinode.sh                                  (2 nodes: 8B at 1M, sp = 8, dp = 2)
#   sbatch --nodes=4 --export=ALL,EXPERIMENT=exp.toml slurm/multinode.sh
# SP groups are contiguous ranks and must stay on one node (a job whose SP group would span nodes
# is refused): sp divides the GPUs per node, so its all-to-alls stay on NVLink, and DP runs
# across nodes; `--set parallel.dp=auto` (the default ULYSSES_ARGS here) makes dp = ranks / sp
# for any number of nodes. The run directory (run.output_dir) and the data must be on a file
# system every node sees (docs/multinode.md). Launch, preemption and requeue: slurm/launch.sh.
# tests/multinode/run.sh runs it for real on two fake nodes (CPU, 2 ranks each) in CI.
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
ULYSSES_ARGS="${ULYSSES_ARGS:---set parallel.dp=auto}"
# NCCL between nodes (docs/multinode.md): name the fabric's interface if NCCL picks a wrong one,
# and the InfiniBand adapters where there are several, e.g.
# export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5_0,mlx5_1
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
