#!/usr/bin/env bash
# Stop the single-node SLURM started by start-local-slurm.sh (slurmd, slurmctld, munged),
# by the process ids in their pid files. Jobs still running are killed with slurmd.
set -uo pipefail
for pidfile in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/munge/munged.pid; do
    if [ -f "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        echo "stop-local-slurm: stopped $(basename "$pidfile" .pid) ($pid)" >&2
    fi
done
