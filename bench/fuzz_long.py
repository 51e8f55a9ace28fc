"""A longer fuzzing run (issue 7) than the bounded one in `make test` (tests/test_fuzz.py), with
the same strategies and checks: every API operation from /openapi.json against a real
`idletune serve` (tiny random model, training allowed), the importers with arbitrary text and
bytes, and config parsing with arbitrary overrides. Failures are collected (not stopped at) and
reported by kind, with one example each.

Usage:
    python bench/fuzz_long.py [--api-examples 300] [--import-examples 3000] [--config-examples 20000] [--out f.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def run(name: str, strategy, check, examples: int, tried: Counter, failures: dict) -> None:
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(value=strategy)
    def fuzz(value):
        tried[name] += 1
        try:
            check(value)
        except Exception as e:  # collect, don't stop: one line per kind of failure
            key = f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            failures.setdefault(key, repr(value)[:300])

    fuzz()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--api-examples", type=int, default=300, help="per API operation")
    ap.add_argument("--import-examples", type=int, default=3000)
    ap.add_argument("--config-examples", type=int, default=20000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import schemathesis

    import test_fuzz as tf
    from conftest import CACHE, ServerProcess
    from idletune.config import Config, ConfigError
    from idletune.importers import Importers
    from idletune.importers.chunking import chunk_text
    from idletune.queue import TrainingQueue

    tried: Counter = Counter()
    failures: dict[str, str] = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # importers, chunking, config (in-process)
        q = TrainingQueue(tmp / "queue.db")
        imp = Importers(q)
        run("import_text", st.tuples(tf.TEXTS, tf.FORMATS, st.none() | tf.NAMES),
            lambda v: tf._one_of_outcomes(lambda: imp.text.import_text(v[0], format=v[1], name=v[2])),
            args.import_examples, tried, failures)
        run("import_bytes", st.tuples(st.sampled_from([b""] + tf.STRUCTURED), st.binary(max_size=5000), tf.NAMES,
                                      st.sampled_from([None, "auto", "pdf", "docx", "json", "csv", "text", "image"])),
            lambda v: tf._one_of_outcomes(lambda: imp.import_bytes(v[0] + v[1], v[2], format=v[3])),
            args.import_examples, tried, failures)
        run("chunk_text", st.tuples(tf.TEXTS, st.integers(1, 600), st.integers(0, 599)),
            lambda v: chunk_text(v[0], max_tokens=v[1], overlap_tokens=min(v[2], v[1] - 1)),
            args.import_examples, tried, failures)
        q.close()

        def config_check(v):
            try:
                Config.load(None, v)
            except ConfigError:
                pass

        run("config", st.dictionaries(st.sampled_from(tf.FIELDS) | st.text(max_size=20), tf.VALUES, max_size=4),
            config_check, args.config_examples, tried, failures)

        # the HTTP API, against a real server that also trains in the background
        from idletune.models import default_model_dir

        model = _tiny_model(tmp / "tiny", default_model_dir(CACHE))
        server = ServerProcess(tmp / "data", model, ["--set", "server.max_new_tokens=8",
                                                      "--set", "server.default_max_tokens=4",
                                                      "--set", "scheduler.min_idle_time_ms=200",
                                                      "--set", "gate.num_retention_probes=4",
                                                      "--set", "training.max_steps=2"]).start()
        try:
            schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json").exclude(path=tf.SKIP_PATHS)
            for result in schema.get_all_operations():
                op = result.ok()
                run(f"api {op.label}", op.as_strategy(), tf.check_case, args.api_examples, tried, failures)
        finally:
            server.stop()
        log = server.log_path.read_text()
        server_errors = sorted({ln for ln in log.splitlines() if ln.startswith(("Traceback", "[idletune] unexpected"))
                                or (ln and ln.split(":")[0].endswith(("Error", "Exception")) and " " not in ln.split(":")[0])})

    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.time() - started),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "command": " ".join(["bench/fuzz_long.py", *sys.argv[1:]]),
              "inputs_tried": dict(tried), "total_inputs": sum(tried.values()),
              "failures": failures, "server_log_errors": server_errors[:20]}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 1 if failures or server_errors else 0


def _tiny_model(out: Path, default_dir: Path) -> Path:
    """The same 2-layer random Llama as the tests' ``tiny_model_dir`` fixture."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(default_dir)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    sys.exit(main())
