#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (for testing the `slurm` profile:
# tests/test_slurm.py, .ci/run). Debian/Ubuntu, run as root. Idempotent: it only starts
# what is not running (munged, slurmctld, slurmd, each checked on its own) and rewrites
# slurm.conf only when this machine changed.
#
#   1. installs slurm-wlm (slurmctld, slurmd, client tools, munge) with apt-get if missing
#      (apt-get update only when the first try fails);
#   2. writes /etc/slurm/slurm.conf: one node with this machine's CPUs and memory, one
#      default partition, no accounting database (so no sacct: Snakemake needs
#      `--slurm-status-command squeue`, as profiles/slurm-local sets), no cgroups
#      (proctrack/linuxproc, task/none);
#   3. starts munged, slurmctld and slurmd, and waits until the node is idle.
#
# Exits non-zero, with the reason on stderr, when any step fails (no root, no apt, a
# slurm.conf that this script did not write, daemons that do not come up).
# Logs: /var/log/slurm/{slurmctld,slurmd}.log. Stop: workflow/slurm/stop-local-slurm.sh.
set -euo pipefail

MARK="# written by spiflow workflow/slurm/start-local-slurm.sh"
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
PARTITION=${SPIFLOW_SLURM_PARTITION:-debug}
TIMEOUT=${SPIFLOW_SLURM_START_TIMEOUT:-60}

say() { echo "start-local-slurm: $*" >&2; }
die() { say "$*"; exit 1; }

node_state() { sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n1 || true; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null \
    || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurm is not installed and there is no apt-get"
    say "installing slurm-wlm with apt-get (log: /tmp/spiflow-slurm-apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    # slurmctld, slurmd, the client tools, munge and the basic plugins; its recommends
    # (hdf5, ipmi, rocm ... plugins and their -dev packages) are not needed here
    install=(apt-get install -y -qq --no-install-recommends slurm-wlm)
    if ! "${install[@]}" >/tmp/spiflow-slurm-apt.log 2>&1; then
        apt-get update -qq >>/tmp/spiflow-slurm-apt.log 2>&1 || true
        "${install[@]}" >>/tmp/spiflow-slurm-apt.log 2>&1 \
            || { tail -n 20 /tmp/spiflow-slurm-apt.log >&2; die "apt-get install slurm-wlm failed"; }
    fi
fi

NODE=$(hostname -s)

# 2. slurm.conf (this machine's CPUs and memory, as slurmd itself detects them)
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    # someone else's SLURM: use it where it has this node up, else leave it alone
    case "$(node_state)" in
        idle|mix|alloc) say "SLURM (not set up by this script) is running: node $NODE is $(node_state)"; exit 0 ;;
    esac
    die "$CONF exists and was not written by this script; not touching it"
fi
HW=$(slurmd -C | head -n1)
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
[ -n "$CPUS" ] && [ -n "$MEM" ] || die "cannot read CPUs/RealMemory from 'slurmd -C': $HW"
MEM=$((MEM * 95 / 100))   # below the detected value, so the node is never drained as 'Low RealMemory'
TOPO=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$HW" || true)

AUTH=auth/munge
CRED=cred/munge
if ! command -v munged >/dev/null; then AUTH=auth/none; CRED=cred/none; fi

mkdir -p "$CONF_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/slurm
NEW=$(mktemp)
cat >"$NEW" <<EOF
$MARK
ClusterName=spiflow
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=$AUTH
CredType=$CRED
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# finished jobs stay visible to squeue for MinJobAge seconds: the snakemake plugin's
# squeue status checks rely on it (it wants at least 3x its first status-check delay)
MinJobAge=300
SchedulerType=sched/backfill
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS $TOPO RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$NEW" "$CONF"; then
    mv "$NEW" "$CONF"
    CHANGED=1
else
    rm -f "$NEW"
    CHANGED=0
fi
chmod 644 "$CONF"

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# 3. daemons
if [ "$AUTH" = auth/munge ]; then
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then mungekey --create --force; else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "starting munged"
        runuser -u munge -- /usr/sbin/munged --force || die "munged did not start"
        for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
        munge -n | unmunge >/dev/null || die "munge does not work"
    fi
fi

if running /run/slurm/slurmctld.pid; then
    [ "$CHANGED" = 1 ] && { say "slurm.conf changed: reconfiguring"; scontrol reconfigure || true; }
else
    say "starting slurmctld"
    slurmctld || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
fi
if ! running /run/slurm/slurmd.pid; then
    say "starting slurmd"
    slurmd || die "slurmd did not start (see /var/log/slurm/slurmd.log)"
fi

for _ in $(seq $((TIMEOUT * 2))); do
    st=$(node_state)
    case "$st" in
        idle|mix|alloc) say "SLURM up: node $NODE ($CPUS CPUs, $MEM MB) is $st, partition $PARTITION"; exit 0 ;;
        drain*|down*|fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
sinfo -N -l >&2 || true
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
die "node $NODE did not become idle within ${TIMEOUT}s"
