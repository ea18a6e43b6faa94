# shellcheck shell=bash
# Functions shared by the batch scripts and torchrun_node.sh. Source it; it sets no options.
#
# Stop signals: Slurm's `--signal=B:USR1@<s>` (and `scancel --signal=USR1 --batch`) signal only
# the batch shell, and bash runs a trap only between commands, so the shell must start the work
# in the background, wait, and forward the signal. The trainer (trainer/preemption.py) treats
# SIGUSR1 and SIGTERM as "checkpoint at the next step boundary and exit 75"; its rank 0 then
# requeues the job with `scontrol requeue`.

slurm_log() {
    echo "[slurm $(date +%H:%M:%S) ${SLURMD_NODENAME:-$(hostname -s)}] $*"
}

# The first host of a Slurm node list (node[01-04] -> node01), as trainer/distributed.py's
# first_slurm_host finds it, so that the batch scripts and the trainer agree: scontrol, else
# its parser. scontrol is asked here first because importing the trainer (torch) to ask it
# takes seconds on every node at every start.
first_host() {
    local hosts
    if hosts=$(scontrol show hostnames "$1" 2>/dev/null) && [[ -n "$hosts" ]]; then
        echo "${hosts%%$'\n'*}"
        return 0
    fi
    python -c 'import sys; from trainer.distributed import first_slurm_host
print(first_slurm_host(sys.argv[1]))' "$1"
}

# The c10d rendezvous port of a job: 29500 + job id % 1000, the trainer's convention for ranks
# started by srun without torchrun (trainer/distributed.py), so one job uses one port.
rendezvous_port() {
    echo $((29500 + ${1:?job id} % 1000))
}

# node_address NODE: the IPv4 address at which Slurm reaches NODE: its NodeAddr (scontrol), or
# NODE itself where scontrol is missing, resolved with getent when it is a name. Not `hostname`:
# on hosts with several interfaces (or several nodes per machine) the host name may resolve to
# a management network or to 127.0.x.x, which the other nodes cannot use.
node_address() {
    local node=${1:?node name} address=""
    if command -v scontrol >/dev/null; then
        address=$(scontrol show node -o "$node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*')
        address=${address#NodeAddr=}
    fi
    address=${address:-$node}
    if [[ ! "$address" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
        address=$(getent ahostsv4 "$address" | awk 'NR == 1 { print $1 }')
    fi
    if [[ -z "$address" ]]; then
        echo "error: no IPv4 address for node $node (scontrol show node, getent ahostsv4)" >&2
        return 1
    fi
    echo "$address"
}

# interface_of ADDRESS: the local network interface that carries ADDRESS ("" if none does).
interface_of() {
    ip -o -4 addr show 2>/dev/null | awk -v address="$1" \
        '{ split($4, cidr, "/"); if (cidr[1] == address) { print $2; exit } }'
}

# use_interface_of ADDRESS: gloo and NCCL open their sockets on the interface carrying this
# node's address, unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set already (the user's
# choice, e.g. `sbatch --export=ALL,NCCL_SOCKET_IFNAME=ib0`). Left to their own choice, both
# take the interface of the host name's address, which may be one the other nodes cannot reach.
use_interface_of() {
    local interface
    interface=$(interface_of "$1")
    if [[ -z "$interface" ]]; then
        slurm_log "warning: no interface carries $1 (ip -4 addr): GLOO_SOCKET_IFNAME and" \
            "NCCL_SOCKET_IFNAME left to the libraries' choice"
        return 0
    fi
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$interface}
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$interface}
}

# slurm_rendezvous_args THIS_NODE_ADDRESS: torchrun's rendezvous flags for this node of a
# multi-node job, one per line: c10d on the address of the allocation's first node; this node's
# agent advertises its own address (--local_addr), not the one its host name resolves to; node 0
# (SLURM_NODEID) is told it hosts the store (is_host) instead of guessing from its host name,
# which fails where names, addresses and `hostname` disagree.
slurm_rendezvous_args() {
    local address=${1:?the address of this node} head head_address port is_host=0
    head=$(first_host "${SLURM_JOB_NODELIST:?not inside a Slurm job}") || return 1
    head_address=$(node_address "$head") || return 1
    if ((${SLURM_JOB_NUM_NODES:?} > 1)) && [[ "$head_address" == 127.* ]]; then
        echo "error: node $head's address is $head_address, which the other nodes cannot" \
            "reach: give it a NodeAddr in slurm.conf or fix its name resolution" >&2
        return 1
    fi
    port=$(rendezvous_port "${SLURM_JOB_ID:?}")
    [[ "${SLURM_NODEID:?}" == 0 ]] && is_host=1
    printf '%s\n' "--nnodes=${SLURM_JOB_NUM_NODES:?}" "--rdzv_backend=c10d" \
        "--rdzv_endpoint=${head_address}:${port}" "--rdzv_id=${SLURM_JOB_ID}" \
        "--rdzv_conf=is_host=${is_host}" "--local_addr=${address}"
}

# run_forwarding_signals FORWARDER [--ignore-usr1] COMMAND...
# Runs COMMAND in the background and waits for it, returning its exit status. SIGUSR1 and
# SIGTERM received meanwhile are passed to `FORWARDER SIGNAL` (it knows whom to signal), and
# again every FORWARD_REPEAT_S seconds until COMMAND exits, because a worker ignores a stop
# request that arrives before its handler is installed (while it loads data): a repeat is
# harmless, the trainer only sets a flag. --ignore-usr1 starts COMMAND with SIGUSR1 ignored
# (inherited through exec): a torchrun agent then survives a stray USR1, which would otherwise
# kill it (Slurm signals every process of a job step), while the workers install their own
# handler.
run_forwarding_signals() {
    local forwarder=$1 ignore_usr1=0
    shift
    if [[ "${1:-}" == "--ignore-usr1" ]]; then
        ignore_usr1=1
        shift
    fi
    _forwarder=$forwarder
    _stop_signal=""
    trap '_on_stop_signal USR1' USR1
    trap '_on_stop_signal TERM' TERM
    if ((ignore_usr1)); then
        (trap '' USR1 && exec "$@") &
    else
        "$@" &
    fi
    _child_pid=$!
    _wait_forwarding
}

_on_stop_signal() {
    if [[ -z "$_stop_signal" ]]; then
        slurm_log "received SIG$1: passing it on ($_forwarder); the run saves a checkpoint at" \
            "its next step and stops"
    fi
    _stop_signal=$1
    "$_forwarder" "$1"
}

_wait_forwarding() {
    local status="" sleeper waited=0 final
    while true; do
        if [[ -z "$_stop_signal" ]]; then
            wait "$_child_pid"
            status=$?
            # wait returns early (> 128) when a trapped signal arrives; else the child is done
            [[ -z "$_stop_signal" ]] && return "$status"
        else
            sleep 1 &
            sleeper=$!
            wait "$sleeper" 2>/dev/null
            kill "$sleeper" 2>/dev/null
            kill -0 "$_child_pid" 2>/dev/null || break
            if (( ++waited % ${FORWARD_REPEAT_S:-10} == 0 )); then
                "$_forwarder" "$_stop_signal"
            fi
        fi
    done
    wait "$_child_pid"
    final=$?
    # 127 where bash forgets a status once waited for: keep the one an earlier wait collected
    if ((final == 127)) && [[ -n "$status" ]]; then
        return "$status"
    fi
    return "$final"
}

# Forwarders: the direct child (srun passes signals on to every task of its step) ...
signal_child() {
    kill -s "$1" "$_child_pid" 2>/dev/null
}

# ... and torchrun's workers, its direct children: the agent itself is left alone, so it
# watches its workers exit by themselves after their checkpoint.
signal_torchrun_workers() {
    local pids
    mapfile -t pids < <(pgrep -P "$_child_pid")
    ((${#pids[@]})) && kill -s "$1" "${pids[@]}" 2>/dev/null
    return 0
}
