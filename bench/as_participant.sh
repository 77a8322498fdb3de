#!/usr/bin/env bash
# Run a command that knows nothing of bench/quiet_gpu.py as a participant of a quiet-GPU session:
# gpu_quiet_session.sh appends "--quiet-dir D --quiet-n N --wait-max S" to every command; this strips
# them, runs the rest, and marks itself ready in D when it ends (so the timed processes wait for its
# GPU work to finish; its own timings, if any, are not protected).
#   bash bench/as_participant.sh python bench/compare_chunks.py ... --quiet-dir D --quiet-n N --wait-max S
set -uo pipefail
args=("$@"); n=${#args[@]}
[ "$n" -ge 6 ] && [ "${args[$((n - 6))]}" = --quiet-dir ] || { echo "as_participant: no trailing --quiet-dir D --quiet-n N --wait-max S" >&2; exit 2; }
dir=${args[$((n - 5))]}
"${args[@]:0:$((n - 6))}"; rc=$?
touch "$dir/ready.participant.$$"
exit $rc
