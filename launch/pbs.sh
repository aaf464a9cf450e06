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
# save the checkpoint and exit 0. A SIGTERM to the job itself is passed on the same way.
#
# Settings from the environment (qsub -v NAME=value, or -V to export the whole environment):
#   PARANET_TRAIN_ARGS     training flags (split on spaces), before any arguments given to the script
#   PARANET_RUN_DIR        checkpoint.h5 and metrics.json, on storage all nodes share.
#                          Default: runs/<job name>-<job id without the server> in the submit directory
#   PARANET_PYTHON         default: .venv/bin/python in the submit directory, else python3 on PATH
#   PARANET_MPIEXEC        default: the mpiexec next to PARANET_PYTHON, else mpiexec on PATH
#   PARANET_WALLTIME       seconds the job may run; default: PBS_WALLTIME (Torque sets it), else
#                          Resource_List.walltime from `qstat -f`; no timer when neither is known
#   PARANET_SIGNAL_MARGIN  seconds before the walltime to stop at (default 120)
#   PARANET_REQUEUE        1 (default): when training stopped early, `qrerun` the job, or if that is
#                          not allowed, `qsub` this script again with the same run directory.
#                          0: end with exit status 75 and leave the checkpoint.
#   PARANET_PBS_SCRIPT     the script to resubmit (default launch/pbs.sh in the submit directory)
set -euo pipefail

export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

cd "${PBS_O_WORKDIR:-.}"
job_id=${PBS_JOBID:?this script runs inside a PBS job: submit it with qsub}
job_name=${PBS_JOBNAME:-paranet}
export PARANET_RUN_DIR=${PARANET_RUN_DIR:-runs/$job_name-${job_id%%.*}}
run_dir=$PARANET_RUN_DIR
checkpoint=$run_dir/checkpoint.h5
metrics=$run_dir/metrics.json
mkdir -p "$run_dir"

python=${PARANET_PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
mpiexec=${PARANET_MPIEXEC:-$(dirname "$(command -v "$python")")/mpiexec}
[[ -x $mpiexec ]] || mpiexec=mpiexec

log() { echo "paranet-pbs: $*"; }
nodefile=${PBS_NODEFILE:?PBS_NODEFILE is not set}
ranks=$(grep -c . "$nodefile")  # PBS lists each host once per rank it may run
log "job $job_id, $ranks ranks on $(sort -u "$nodefile" | paste -sd, -), run directory $run_dir"

if [[ -e $metrics ]]; then
    log "$metrics exists: training already completed, nothing to do"
    exit 0
fi
if [[ -e $checkpoint ]]; then
    log "resuming from $checkpoint"
fi

walltime=${PARANET_WALLTIME:-${PBS_WALLTIME:-}}
if [[ -z $walltime ]] && command -v qstat >/dev/null; then
    hms=$(qstat -f "$job_id" 2>/dev/null | sed -n 's/^ *Resource_List.walltime = //p' | head -n1)
    if [[ $hms =~ ^([0-9]+):([0-9]+):([0-9]+)$ ]]; then
        walltime=$((10#${BASH_REMATCH[1]} * 3600 + 10#${BASH_REMATCH[2]} * 60 + 10#${BASH_REMATCH[3]}))
    fi
fi

read -r -a extra <<< "${PARANET_TRAIN_ARGS:-}"
train=("$python" -m paranet.train "${extra[@]}" "$@" --checkpoint "$checkpoint" --resume --metrics "$metrics")
cmd=("$mpiexec" -n "$ranks" -f "$nodefile" "${train[@]}")
log "${cmd[*]}"
"${cmd[@]}" &
pid=$!

timer=
if [[ -n $walltime ]]; then
    delay=$((walltime - ${PARANET_SIGNAL_MARGIN:-120}))
    (( delay > 0 )) || delay=1
    log "SIGTERM to the ranks in $delay s (walltime $walltime s)"
    (
        trap 'kill "$nap" 2>/dev/null; exit 0' TERM  # training ended first: take the sleep along
        sleep "$delay" & nap=$!
        if wait "$nap"; then log "walltime nearly over: SIGTERM to the ranks"; kill -TERM "$pid"; fi
    ) &
    timer=$!
fi

terminated=0
trap 'terminated=1; log "SIGTERM: passing it on to the ranks"; kill -TERM "$pid" 2>/dev/null || true' TERM
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
if [[ ${PARANET_REQUEUE:-1} == 1 ]]; then
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
