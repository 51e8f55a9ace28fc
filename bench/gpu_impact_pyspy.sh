#!/usr/bin/env bash
# Run CM's method: one gpu_inference_impact.py process with py-spy recording, from the start of
# measuring, which thread holds the interpreter lock (500 samples a second, 75 s, raw format).
# Needs py-spy (`python -m pip install py-spy`; on the lent GPU machines its wheel is carried).
# Usage: bench/gpu_impact_pyspy.sh NAME [gpu_inference_impact.py options]
#   writes $OUT/NAME.json, NAME.log (the bench) and NAME.spy.txt (py-spy's collapsed stacks)
set -u
name=$1; shift
out=${OUT:-.}
python bench/gpu_inference_impact.py "$out/$name.json" --clients 1 --per-client 16 --rounds 10 "$@" > "$out/$name.log" 2>&1 &
pid=$!
until grep -q "TTFT after a" "$out/$name.log" 2>/dev/null || ! kill -0 $pid 2>/dev/null; do sleep 0.5; done
py-spy record --pid $pid --gil --threads --nonblocking --rate 500 --duration 75 --format raw \
  -o "$out/$name.spy.txt" > "$out/$name.spylog" 2>&1
wait $pid
