#!/bin/sh
# An ssh stand-in for MPICH hydra (HYDRA_LAUNCHER_EXEC) and Open MPI's PRRTE (plm_ssh_agent):
# "netns_ssh.sh [-x] HOST COMMAND..." runs COMMAND with sh inside the network namespace that
# PARANET_NETNS_MAP ("ip=namespace ...") gives for HOST, the way ssh would run it on that host.
# With PARANET_NETNS_UTS=1 it also gets a UTS namespace of its own, named paranet-HOST: PRRTE
# tells hosts apart by hostname (dots become dashes), and network namespaces share the machine's.
[ "$1" = -x ] && shift
host=$1
shift
[ -n "${PARANET_NETNS_LOG:-}" ] && echo "$host: $*" >> "$PARANET_NETNS_LOG"
for pair in ${PARANET_NETNS_MAP:-}; do
    if [ "${pair%%=*}" = "$host" ]; then
        if [ "${PARANET_NETNS_UTS:-0}" = 1 ]; then
            # no dots in the name: Open MPI shortens a hostname at its first dot
            exec ip netns exec "${pair#*=}" unshare --uts sh -c "hostname paranet-$(echo "$host" | tr . -); $*"
        fi
        exec ip netns exec "${pair#*=}" sh -c "$*"
    fi
done
echo "netns_ssh.sh: no namespace for host '$host' in PARANET_NETNS_MAP='${PARANET_NETNS_MAP:-}'" >&2
exit 255
