#!/usr/bin/env bash
# Llama-3.1-8B on 1M-token sequences, one node of 8 H100s (sp = 8), from the repository root:
#   sbatch slurm/train_1m.sh
# Resources and paths below are the defaults; override them on the command line
# (sbatch --time=4:00:00 slurm/train_1m.sh) and the launch through the environment
# (EXPERIMENT, ULYSSES, LAUNCHER, ULYSSES_ENV: see slurm/launch.sh). The run writes to
# runs/llama8b-1m/ (metrics.h5, checkpoints/, final); the job log is ulysses-1m-<job id>.out.
# Rank 0 gathers the model for each checkpoint: about 32 GB of host memory per state for 8B.
#SBATCH --job-name=ulysses-1m
#SBATCH --nodes=1
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
# sbatch runs a copy of this file from its spool folder: find launch.sh from the submit folder.
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
