#!/usr/bin/env bash
# Runs the GPU benchmarks one after another, each under its own time limit, and keeps each one's
# output in LOGDIR/<name>.log; one that fails or runs out of time does not stop the others.
#
#   benchmarks/run_gpu.sh LOGDIR [NAME[:SECONDS] ...]
#
# NAME is a benchmark's file name without "_gpu.py" (quantize, attention, tome, prune_nm); without
# names all four run. bevel is used from this checkout (PYTHONPATH), so nothing is installed.
set -u
logdir=${1:?usage: benchmarks/run_gpu.sh LOGDIR [NAME[:SECONDS] ...]}
shift
mkdir -p "$logdir"
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ $# -gt 0 ] || set -- quantize:200 attention:200 tome:300 prune_nm:200
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  date -u +"%Y-%m-%d %H:%M UTC"
} 2>&1 | tee "$logdir/environment.log"
for item in "$@"; do
  name=${item%%:*}
  seconds=${item#*:}
  [ "$seconds" = "$item" ] && seconds=200
  echo "=== ${name}_gpu.py (limit ${seconds} s)"
  start=$(date +%s)
  timeout "$seconds" python3 "$root/benchmarks/${name}_gpu.py" >"$logdir/$name.log" 2>&1
  status=$?
  tail -n 60 "$logdir/$name.log"
  echo "=== ${name}_gpu.py exit $status after $(( $(date +%s) - start )) s"
done
