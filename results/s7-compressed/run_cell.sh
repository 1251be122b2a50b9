#!/usr/bin/env bash
# run_cell.sh NAME ARGS...: one grid cell, tiny.en teacher, shared cache, logs in /work/runs/s7/NAME
set -u
name=$1; shift
cd /work/main
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # two runs at once on 2 cores: one thread each, no OpenMP spinning
exec python distill.py --teacher tiny.en --cache /work/runs/cache-tiny --out /work/runs/s7/$name \
  --method kd --lr 1e-4 --batch-size 16 --max-steps 400 --eval-every 0 "$@" > /work/runs/s7/$name.log 2>&1
