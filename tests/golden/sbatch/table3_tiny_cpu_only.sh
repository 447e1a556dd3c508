#!/bin/bash

# Parameters
#SBATCH --array=0-3%4
#SBATCH --cpus-per-task=1
#SBATCH --job-name=tlit-table3-tiny
#SBATCH --mem=1536M
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/shared/tlit/results/slurm/table3/tiny/%A_%a_0_log.out
#SBATCH --partition=debug
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=10
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/tlit/results/slurm/table3/tiny/%A_%a_%t_log.out python -u -m submitit.core._submit /shared/tlit/results/slurm/table3/tiny
