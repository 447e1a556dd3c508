#!/bin/bash

# Parameters
#SBATCH --account=nlp
#SBATCH --array=0-19%20
#SBATCH --constraint=h100
#SBATCH --cpus-per-task=16
#SBATCH --gpus-per-node=2
#SBATCH --job-name=tlit-table3-paper
#SBATCH --mem=64G
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/shared/tlit/results/slurm/table3/paper/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=720
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/tlit/results/slurm/table3/paper/%A_%a_%t_log.out python -u -m submitit.core._submit /shared/tlit/results/slurm/table3/paper
