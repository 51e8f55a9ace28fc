set -x
export PYTHONPATH=src:bench PYTHONUNBUFFERED=1 IDLETUNE_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo COMMIT)
nvidia-smi --query-gpu=name --format=csv
pip install --no-index -q .gpuassets/pyspy/*.whl 2>&1 | tail -1
python bench/gpu_inference_impact.py $OUT/impact.json --clients 1 --per-client 24 --rounds 10 > $OUT/impact.log 2>&1
python bench/gpu_training.py $OUT/train.json --shapes qwen2.5-1.5b --variants default,mb2048,mb2048+sg,mb1024,mb1024+sg --steps 10 > $OUT/train.log 2>&1
py-spy record -o $OUT/mb1024.json --format speedscope --rate 400 --threads --nonblocking -- python bench/gpu_training.py $OUT/train_spy.json --shapes qwen2.5-1.5b --variants mb1024 --steps 60 > $OUT/spy.log 2>&1
tail -5 $OUT/*.log
