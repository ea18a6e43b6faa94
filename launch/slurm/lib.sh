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

# The first host of a Slurm node list (node[01-04] -> node01): trainer/distributed.py's
# first_slurm_host, so that the batch scripts and the trainer agree.
first_host() {
    python -c 'import sys; from trainer.distributed import first_slurm_host
print(first_slurm_host(sys.argv[1]))' "$1"
}

# The c10d rendezvous port of a job: 29500 + job id % 1000, the trainer's convention for ranks
# started by srun without torchrun (trainer/distributed.py), so one job uses one port.
rendezvous_port() {
    echo $((29500 + ${1:?job id} % 1000))
}

# torchrun's rendezvous flags for this node of a multi-node job, one per line: c10d on the first
# node of the allocation. Node 0 (SLURM_NODEID) is told to host the store instead of guessing
# from its hostname, which fails where the node list's names differ from `hostname`.
slurm_rendezvous_args() {
    local head port is_host=0
    head=$(first_host "${SLURM_JOB_NODELIST:?not inside a Slurm job}") || return 1
    port=$(rendezvous_port "${SLURM_JOB_ID:?}")
    [[ "${SLURM_NODEID:?}" == 0 ]] && is_host=1
    printf '%s\n' "--nnodes=${SLURM_JOB_NUM_NODES:?}" "--rdzv_backend=c10d" \
        "--rdzv_endpoint=${head}:${port}" "--rdzv_id=${SLURM_JOB_ID}" \
        "--rdzv_conf=is_host=${is_host}"
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
