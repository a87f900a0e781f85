#!/bin/bash

# Parameters
#SBATCH --array=0-1%2
#SBATCH --comment=trickbench-test
#SBATCH --cpus-per-task=1
#SBATCH --error=/RESULTS/slurm-array/submitit/%A_%a/%A_%a_0_log.err
#SBATCH --gpus-per-node=1
#SBATCH --job-name=trickbench-slurm-array
#SBATCH --mem=1536MB
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/RESULTS/slurm-array/submitit/%A_%a/%A_%a_0_log.out
#SBATCH --partition=debug
#SBATCH --requeue
#SBATCH --signal=USR2@30
#SBATCH --time=10
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /RESULTS/slurm-array/submitit/%A_%a/%A_%a_%t_log.out --error /RESULTS/slurm-array/submitit/%A_%a/%A_%a_%t_log.err /PYTHON -u -m submitit.core._submit /RESULTS/slurm-array/submitit/%j


# teardown
trickbench_exit=$?
echo "$trickbench_exit" > /RESULTS/slurm-array/submitit/"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"/exit_status
exit "$trickbench_exit"
