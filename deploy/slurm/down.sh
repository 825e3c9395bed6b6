#!/usr/bin/env bash
# Stops the single-node cluster that deploy/slurm/up.sh started (jobs still running are
# cancelled first). munged is left running: other tools on the host may use it.
set -uo pipefail
if command -v scancel >/dev/null && pgrep -x slurmctld >/dev/null; then
  scancel --full --user="$(id -un)" 2>/dev/null || true
fi
pkill -x slurmd 2>/dev/null
pkill -x slurmctld 2>/dev/null
for _ in $(seq 20); do { pgrep -x slurmctld || pgrep -x slurmd; } >/dev/null || exit 0; sleep 0.5; done
echo "slurm: still running after 10 s" >&2
exit 1
