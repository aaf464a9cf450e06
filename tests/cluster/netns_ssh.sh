#!/bin/sh
# An ssh stand-in for MPICH hydra (HYDRA_LAUNCHER_EXEC): "netns_ssh.sh [-x] HOST COMMAND..." runs
# COMMAND with sh inside the network namespace that PARANET_NETNS_MAP ("ip=namespace ...") gives
# for HOST, the way ssh would run it on that host.
[ "$1" = -x ] && shift
host=$1
shift
[ -n "${PARANET_NETNS_LOG:-}" ] && echo "$host: $*" >> "$PARANET_NETNS_LOG"
for pair in ${PARANET_NETNS_MAP:-}; do
    if [ "${pair%%=*}" = "$host" ]; then
        exec ip netns exec "${pair#*=}" sh -c "$*"
    fi
done
echo "netns_ssh.sh: no namespace for host '$host' in PARANET_NETNS_MAP='${PARANET_NETNS_MAP:-}'" >&2
exit 255
