#!/bin/bash

# Parameters
#SBATCH --array=0-2%3
#SBATCH --cpus-per-task=12
#SBATCH --error=/RESULTS/gpu-grid/submitit/%A_%a/%A_%a_0_log.err
#SBATCH --gpus-per-node=a100:2
#SBATCH --job-name=trickbench-gpu-grid
#SBATCH --mail-type=FAIL
#SBATCH --mem=32GB
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/RESULTS/gpu-grid/submitit/%A_%a/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR2@90
#SBATCH --time=120
#SBATCH --wckey=submitit

# setup
module load cuda/12.1
source /opt/venvs/bench/bin/activate

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /RESULTS/gpu-grid/submitit/%A_%a/%A_%a_%t_log.out --error /RESULTS/gpu-grid/submitit/%A_%a/%A_%a_%t_log.err /PYTHON -u -m submitit.core._submit /RESULTS/gpu-grid/submitit/%j


# teardown
trickbench_exit=$?
echo "$trickbench_exit" > /RESULTS/gpu-grid/submitit/"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"/exit_status
exit "$trickbench_exit"
