#!/usr/bin/env bash
# The whole suite N times in a row while busy loops keep every core loaded: the check that no
# test asserts the speed of the machine it runs on (CI machines are shared).
#   tools/suite_under_load.sh [RUNS=3] [BUSY=number of cores]
# Busy loops are `stress-ng --cpu BUSY` when installed, else BUSY python loops; both are started
# here and stopped here, whatever the outcome. Exit status: the first failing run's, else 0.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
busy=${2:-$(nproc)}

pids=()
stop_busy() { [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; }
trap stop_busy EXIT
if command -v stress-ng >/dev/null; then
  stress-ng --cpu "$busy" --quiet & pids+=($!)
  echo "busy: stress-ng --cpu $busy"
else
  for _ in $(seq "$busy"); do python -c "while 1: pass" & pids+=($!); done
  echo "busy: $busy python loops"
fi

status=0
for i in $(seq "$runs"); do
  start=$(date +%s)
  python -m pytest -q -p no:cacheprovider
  rc=$?
  echo "run $i/$runs: exit $rc in $(( $(date +%s) - start )) s"
  [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
done
exit "$status"
