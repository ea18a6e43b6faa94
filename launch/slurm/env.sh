# shellcheck shell=bash
# Thread and NCCL settings for every rank: the one place to tune them for a cluster.
# Sourced by torchrun_node.sh on each node, after NPROC_PER_NODE is known. A value already in
# the environment (e.g. `sbatch --export=ALL,NCCL_DEBUG=INFO`) wins over the default here.

# CPU threads per rank: the task's CPUs shared among the node's ranks (at least 1), so ranks do
# not oversubscribe the cores they were given.
_cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
_threads=$((_cpus / ${NPROC_PER_NODE:-1}))
((_threads < 1)) && _threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$_threads}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
unset _cpus _threads

# NCCL: warnings only; asynchronous error handling turns a stuck or failed collective into an
# error instead of a hang. Site-specific choices stay commented out until a cluster needs them.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME (the interface for socket traffic): a multi-node job
# sets both to the interface carrying the node's Slurm address (lib.sh use_interface_of);
# set them in the environment of `sbatch` to choose another, e.g. NCCL_SOCKET_IFNAME=ib0.
# export NCCL_IB_HCA=mlx5              # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1             # Ethernet-only clusters

# Python: log lines reach the Slurm output file at once; a crash prints every thread's stack.
export PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
