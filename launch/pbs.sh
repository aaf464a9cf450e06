#!/bin/bash
# paranet on PBS/Torque (and OpenPBS): data-parallel training as a batch job that checkpoints
# before its walltime runs out and then asks to be run again.
#
#   cd /path/to/paranet && qsub -v PARANET_TRAIN_ARGS="--model cnn --epochs 5" launch/pbs.sh
#   (Torque can also pass arguments: qsub -F "--model cnn --epochs 5" launch/pbs.sh)
#
# The script adds --checkpoint, --resume and --metrics itself (in the run directory); do not pass
# those three. Edit the #PBS lines for your cluster; "##PBS" switches a line off.
#PBS -N paranet
# Torque: nodes and ranks per node. OpenPBS/PBS Pro: use "-l select=1:ncpus=4:mpiprocs=4".
#PBS -l nodes=1:ppn=4
#PBS -l walltime=01:00:00
##PBS -q batch
#PBS -j oe
#PBS -o paranet.out
# Rerunnable, so that qrerun (and the server after a node failure) may start it again.
#PBS -r y
#
# PBS has no "signal me before the limit" option, and at the walltime it sends SIGTERM only a few
# seconds (kill_delay) before SIGKILL. So this script starts its own timer: PARANET_SIGNAL_MARGIN
# seconds (default 120) before the walltime it sends SIGTERM to the ranks, which finish their step,
# save the checkpoint and exit 0. A SIGTERM to the job itself is passed on the same way. (With Open
# MPI's mpiexec the signal sent is SIGUSR1, which it passes on; SIGTERM would end the job.)
#
# Settings from the environment (qsub -v NAME=value, or -V to export the whole environment):
#   PARANET_TRAIN_ARGS     training flags (split on spaces), before any arguments given to the script
#   PARANET_RUN_DIR        checkpoint.h5 and metrics.json, on storage all nodes share.
#                          Default: runs/<job name>-<job id without the server> in the submit directory
#   PARANET_PYTHON         default: .venv/bin/python in the submit directory, else python3 on PATH
#   PARANET_MPIEXEC        default: the mpiexec next to PARANET_PYTHON, else mpiexec on PATH
#   PARANET_WALLTIME       how long the job may run, [[h:]m:]s (3600, 60:00 and 1:00:00 are the
#                          same); default: PBS_WALLTIME (Torque sets it), else
#                          Resource_List.walltime from `qstat -f`; no timer when neither is known
#   PARANET_SIGNAL_MARGIN  whole seconds before the walltime to stop at (default 120), less than
#                          the walltime
#   PARANET_REQUEUE        1 (default): when training stopped early, `qrerun` the job, or if that is
#                          not allowed, `qsub` this script again with the same run directory.
#                          0: end with exit status 75 and leave the checkpoint.
#   PARANET_PBS_SCRIPT     the script to resubmit (default launch/pbs.sh in the submit directory)
# All of these, the Python, the mpiexec and PBS_NODEFILE are checked before mpiexec starts; a bad
# one is one line and exit status 2, with nothing launched.
set -euo pipefail

# BLAS threads: each rank counts the CPUs it may use (paranet/threads.py); an OMP_NUM_THREADS
# set by the user is passed on and wins.

log() { echo "paranet-pbs: $*"; }
die() { echo "paranet-pbs: $*" >&2; exit 2; }
program() {  # the executable file a name (looked up on PATH) or a path stands for, or fail
    local p
    p=$(command -v -- "$1" 2>/dev/null) || return 1
    [[ -f $p && -x $p ]] && echo "$p"
}
seconds() {  # [[h:]m:]s -> seconds (PBS's walltime format), or fail
    local parts total=0 part
    [[ $1 =~ ^[0-9]+(:[0-9]+){0,2}$ ]] || return 1
    IFS=: read -r -a parts <<< "$1"
    for part in "${parts[@]}"; do total=$((total * 60 + 10#$part)); done
    echo "$total"
}

# Check every setting before anything is launched: a bad one must not leave ranks running.
[[ -n ${PBS_JOBID:-} ]] || die "PBS_JOBID is not set: this script runs inside a PBS job (submit it with qsub)"
cd "${PBS_O_WORKDIR:-.}" 2>/dev/null || die "cannot enter PBS_O_WORKDIR=$PBS_O_WORKDIR (the submit directory)"
job_id=$PBS_JOBID
job_name=${PBS_JOBNAME:-paranet}
export PARANET_RUN_DIR=${PARANET_RUN_DIR:-runs/$job_name-${job_id%%.*}}
run_dir=$PARANET_RUN_DIR
checkpoint=$run_dir/checkpoint.h5
metrics=$run_dir/metrics.json

if [[ -n ${PARANET_PYTHON:-} ]]; then
    python=$(program "$PARANET_PYTHON") || die "PARANET_PYTHON=$PARANET_PYTHON is not an executable file"
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=$(program python3) || die "no python3 on PATH and no .venv in $PWD: set PARANET_PYTHON"
fi
why=$("$python" -c "import paranet" 2>&1 >/dev/null | tail -n 1) || true
[[ -z $why ]] || die "$python cannot import paranet ($why): install paranet there, or set PARANET_PYTHON"
if [[ -n ${PARANET_MPIEXEC:-} ]]; then
    mpiexec=$(program "$PARANET_MPIEXEC") || die "PARANET_MPIEXEC=$PARANET_MPIEXEC is not an executable file"
elif [[ -x $(dirname "$python")/mpiexec ]]; then
    mpiexec=$(dirname "$python")/mpiexec
else
    mpiexec=$(program mpiexec) || die "no mpiexec next to $python nor on PATH: pip install mpich, or set PARANET_MPIEXEC"
fi

[[ -n ${PBS_NODEFILE:-} ]] || die "PBS_NODEFILE is not set: this script runs inside a PBS job (submit it with qsub)"
nodefile=$PBS_NODEFILE
[[ -f $nodefile && -r $nodefile ]] || die "PBS_NODEFILE $nodefile is not readable"
ranks=$(grep -c '[^[:space:]]' "$nodefile" || true)  # PBS lists each host once per rank it may run
(( ranks > 0 )) || die "PBS_NODEFILE $nodefile lists no hosts: check the job's -l nodes/select request"

margin=${PARANET_SIGNAL_MARGIN:-120}
[[ $margin =~ ^[0-9]+$ ]] || die "PARANET_SIGNAL_MARGIN must be a whole number of seconds, not '$margin'"
margin=$((10#$margin))
requeue=${PARANET_REQUEUE:-1}
[[ $requeue == 0 || $requeue == 1 ]] || die "PARANET_REQUEUE must be 0 or 1, not '$requeue'"
walltime=
for var in PARANET_WALLTIME PBS_WALLTIME; do
    if [[ -n ${!var:-} ]]; then
        walltime=$(seconds "${!var}") || die "$var must be [[h:]m:]s, not '${!var}'"
        break
    fi
done
if [[ -z $walltime ]] && command -v qstat >/dev/null; then
    hms=$(qstat -f "$job_id" 2>/dev/null | sed -n 's/^ *Resource_List.walltime = //p' | head -n1)
    if [[ -n $hms ]] && ! walltime=$(seconds "$hms"); then
        log "cannot read qstat's walltime '$hms': no SIGTERM before the walltime (set PARANET_WALLTIME)"
        walltime=
    fi
fi
if [[ -n $walltime ]] && (( margin >= walltime )); then
    die "PARANET_SIGNAL_MARGIN ($margin s) must be less than the walltime ($walltime s)"
fi

mkdir -p "$run_dir"
log "job $job_id, $ranks ranks on $(sort -u "$nodefile" | paste -sd, -), run directory $run_dir"

if [[ -e $metrics ]]; then
    log "$metrics exists: training already completed, nothing to do"
    exit 0
fi
if [[ -e $checkpoint ]]; then
    log "resuming from $checkpoint"
fi

read -r -a extra <<< "${PARANET_TRAIN_ARGS:-}"
train=("$python" -m paranet.train "${extra[@]}" "$@" --checkpoint "$checkpoint" --resume --metrics "$metrics")
# Open MPI (a site's module) reads the node file with --hostfile (a host a line, a line a slot),
# MPICH's hydra with -f. Open MPI's mpiexec ends the job on SIGTERM, cutting the ranks' clean stop
# short; it passes SIGUSR1 on, which stops paranet the same way. So the stop is sent as USR1 there.
hosts_flag=-f stop=TERM
if "$mpiexec" --version 2>&1 | grep -q "Open MPI"; then hosts_flag=--hostfile stop=USR1; fi
cmd=("$mpiexec" -n "$ranks" "$hosts_flag" "$nodefile" "${train[@]}")
# The SIGTERM trap is set before the launch: a SIGTERM at any moment is passed on, or stops the
# job before anything started.
pid= terminated=0
trap 'terminated=1; if [[ -n $pid ]]; then log "SIGTERM: passing it on to the ranks (as SIG$stop)"; kill -$stop "$pid" 2>/dev/null || true; fi' TERM
log "${cmd[*]}"
"${cmd[@]}" &
pid=$!
if (( terminated )); then kill -$stop "$pid" 2>/dev/null || true; fi  # arrived while it was starting

timer=
if [[ -n $walltime ]]; then
    delay=$((walltime - margin))
    log "SIG$stop to the ranks in $delay s (walltime $walltime s)"
    (
        nap=
        trap 'if [[ -n $nap ]]; then kill "$nap" 2>/dev/null; fi; exit 0' TERM  # training ended first: take the sleep along
        sleep "$delay" >/dev/null 2>&1 </dev/null & nap=$!  # even if orphaned, it holds no output open
        if wait "$nap"; then log "walltime nearly over: SIG$stop to the ranks"; kill -$stop "$pid"; fi
    ) &
    timer=$!
fi

terminated=0
status=0
wait "$pid" || status=$?
while (( terminated )); do
    terminated=0
    status=0
    wait "$pid" || status=$?
done
trap - TERM
if [[ -n $timer ]]; then kill "$timer" 2>/dev/null || true; fi
if (( status != 0 )); then
    log "training failed with exit status $status"
    exit "$status"
fi

if [[ -e $metrics ]]; then
    log "training completed; metrics in $metrics"
    exit 0
fi
if [[ ! -e $checkpoint ]]; then
    log "training stopped early but $checkpoint does not exist" >&2
    exit 1
fi
if (( requeue )); then
    if command -v qrerun >/dev/null && qrerun "$job_id" 2>/dev/null; then
        log "stopped early with checkpoint $checkpoint; rerunning job $job_id"
        exit 0
    fi
    script=${PARANET_PBS_SCRIPT:-launch/pbs.sh}
    export PARANET_TRAIN_ARGS="${extra[*]} $*"
    if command -v qsub >/dev/null && new=$(qsub -V "$script"); then
        log "stopped early with checkpoint $checkpoint; submitted $script again as job $new"
        exit 0
    fi
    log "neither qrerun nor qsub worked" >&2
fi
log "stopped early; to continue, submit again with PARANET_RUN_DIR=$run_dir"
exit 75
