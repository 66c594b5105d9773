#!/usr/bin/env bash
# sbatch cluster/slurm.sh [launch.py arguments...]
# Starts Ray on every allocated node (head on the first) and submits the job from the repo root.
#SBATCH --job-name=opd
#SBATCH --nodes=2                 # change
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8         # change
#SBATCH --cpus-per-task=64        # change
#SBATCH --time=24:00:00           # change
set -euo pipefail

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
port=6379

srun --nodes=1 --ntasks=1 -w "$head" ray start --head --node-ip-address="$head_ip" --port=$port \
    --num-gpus="$SLURM_GPUS_PER_NODE" --num-cpus="$SLURM_CPUS_PER_TASK" --block &
sleep 20
for node in "${nodes[@]:1}"; do
    srun --nodes=1 --ntasks=1 -w "$node" ray start --address="$head_ip:$port" \
        --num-gpus="$SLURM_GPUS_PER_NODE" --num-cpus="$SLURM_CPUS_PER_TASK" --block &
done
sleep 20

RAY_ADDRESS="http://$head_ip:8265" ray job submit --working-dir . -- \
    python launch.py --config-name=qwen3_gpu "$@"
