#!/usr/bin/env bash
# Run torchrun on this node and pass stop signals (USR1, TERM) on to its workers.
#   torchrun_node.sh [--slurm-rendezvous] TORCHRUN_ARGS...
# --slurm-rendezvous adds the c10d rendezvous flags of a multi-node job and points gloo and NCCL
# at this node's interface (lib.sh), computed here because each node needs its own. Started by
# the batch scripts, from the repository root: in place of the batch shell (single node) or as
# one srun task per node (multi-node).
# TORCHRUN overrides the launcher command (default: torchrun).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/slurm/lib.sh
source "$here/lib.sh"
# shellcheck source=launch/slurm/env.sh
source "$here/env.sh"

rendezvous=()
if [[ "${1:-}" == "--slurm-rendezvous" ]]; then
    shift
    node=${SLURMD_NODENAME:-$(hostname -s)}
    if ! address=$(node_address "$node") || ! flags=$(slurm_rendezvous_args "$address"); then
        slurm_log "cannot work out the rendezvous"
        exit 1
    fi
    mapfile -t rendezvous <<< "$flags"
    use_interface_of "$address"
    slurm_log "node ${SLURM_NODEID:-0} is $node at $address; sockets on" \
        "GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-}"
fi
command -v pgrep >/dev/null || slurm_log "warning: pgrep missing: stop signals cannot reach the workers"
launch=("${TORCHRUN:-torchrun}" "${rendezvous[@]}" "$@")
slurm_log "node ${SLURM_NODEID:-0}: ${launch[*]} (OMP_NUM_THREADS=$OMP_NUM_THREADS)"
run_forwarding_signals signal_torchrun_workers --ignore-usr1 "${launch[@]}"
status=$?
slurm_log "node ${SLURM_NODEID:-0}: torchrun exited with status $status"
exit "$status"
