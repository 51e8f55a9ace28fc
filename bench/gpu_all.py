"""Run every GPU benchmark of issue 6 in one call, on one card; merge their JSON.

Usage: python bench/gpu_all.py [--quick] [--only decode,training,...] [--budget 540]
Writes $OUT/gpu_results.json (every script's figures under its name) and $OUT/gpu_log.txt.
A script that fails or would overrun the budget is recorded as such; the rest still run.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

FULL = [
    ("graphs_check", ["gpu_graphs_check.py"]),
    ("baseline", ["gpu_baseline.py"]),
    ("loss", ["gpu_loss.py"]),
    ("decode", ["gpu_decode.py", "--hf"]),
    ("live_adapter", ["gpu_live_adapter.py"]),
    ("publish", ["gpu_publish.py"]),
    ("inference_impact", ["gpu_inference_impact.py"]),
    ("e2e", ["learn_and_latency.py", "--skip-learning", "--requests", "12", "--max-tokens", "64"]),
    ("training", ["gpu_training.py", "--steps", "12"]),
    ("step_profile", ["gpu_step_profile.py"]),
    ("memory", ["gpu_memory.py"]),
]
QUICK = {
    "decode": ["--shapes", "qwen2.5-0.5b", "--reps", "2"],
    "live_adapter": ["--shapes", "qwen2.5-0.5b", "--rounds", "1"],
    "publish": ["--n", "5"],
    "loss": ["--hidden", "896", "--vocab", "151936", "--reps", "3"],
    "inference_impact": ["--rounds", "2"],
    "training": ["--shapes", "qwen2.5-0.5b", "--steps", "5"],
    "memory": ["--shapes", "qwen2.5-0.5b"],
    "step_profile": ["--shapes", "qwen2.5-0.5b", "--steps", "3"],
    "e2e": ["--requests", "4"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--skip", default="")
    ap.add_argument("--budget", type=float, default=540)
    ap.add_argument("--extra", action="append", default=[], help="NAME=ARGS (space-separated) appended to a script")
    a = ap.parse_args()
    out = Path(os.environ.get("OUT", "."))
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{HERE}:{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    env.setdefault("IDLETUNE_COMMIT", subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                     capture_output=True, text=True).stdout.strip() or "?")
    extra = {k: v.split() for k, v in (e.split("=", 1) for e in a.extra)}
    only = set(filter(None, a.only.split(",")))
    skip = set(filter(None, a.skip.split(",")))
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": env["IDLETUNE_COMMIT"]}
    log = open(out / "gpu_log.txt", "a")
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp())
    for name, cmd in FULL:
        if (only and name not in only) or name in skip:
            continue
        left = a.budget - (time.time() - t_start)
        if left < 20:
            results[name] = {"skipped": "out of time budget"}
            continue
        args = list(cmd[1:]) + (QUICK.get(name, []) if a.quick else []) + extra.get(name, [])
        js = tmp / f"{name}.json"
        if name == "e2e":
            sys.path.insert(0, str(HERE))
            import gpu_common
            args += ["--model", str(gpu_common.model_dir("qwen2.5-0.5b")), "--out", str(js)]
        elif name == "baseline":
            args = [str(js)]
        else:
            args = [str(js)] + args
        full = [sys.executable, str(HERE / cmd[0])] + args
        print(f"=== {name}: {' '.join(full[1:])} (budget left {left:.0f} s)", flush=True)
        t0 = time.time()
        try:
            p = subprocess.run(full, env=env, cwd=ROOT, capture_output=True, text=True, timeout=left)
            text = p.stdout + p.stderr
            rc = p.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        log.write(f"=== {name} rc={rc} {time.time() - t0:.0f}s\n{text}\n")
        log.flush()
        res = json.loads(js.read_text()) if js.exists() else {}
        res["_rc"], res["_seconds"] = rc, round(time.time() - t0, 1)
        if rc != 0:
            res["_tail"] = text[-1500:]
        results[name] = res
        # the short table each script prints last
        lines = [ln for ln in text.splitlines() if "Warning" not in ln and "warn(" not in ln]
        print("\n".join(lines[-14:]) if rc == 0 else text[-1500:], flush=True)
        (out / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"total {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
