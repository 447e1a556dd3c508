#!/bin/bash

# Parameters
#SBATCH --array=0-6%7
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=1
#SBATCH --job-name=tlit-table3-small
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/shared/tlit/results/slurm/table3/small/%A_%a_0_log.out
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=1440
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/tlit/results/slurm/table3/small/%A_%a_%t_log.out python -u -m submitit.core._submit /shared/tlit/results/slurm/table3/small
