"""What turning a reply's token ids into streamed text costs the host, per token (no model).

Feeds ``InferenceEngine._emit`` (incremental text, stop strings, streaming) a generator of the
default model's token ids for this repository's docs, for replies of 128–4096 tokens, with and
without stop strings; prints the best of three in ms a token. Run it at another commit
(``PYTHONPATH=<that checkout>/src``) for a before/after.

Usage: python bench/emit_cost.py
"""
import os
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

import idletune.inference as inference
from idletune.models import default_model_dir

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    tok = AutoTokenizer.from_pretrained(default_model_dir(Path(os.environ.get("IDLETUNE_CACHE", Path.home() / ".cache" / "idletune"))))
    text = "".join((ROOT / f).read_text() for f in ("README.md", "docs/ARCHITECTURE.md", "docs/CONFIGURATION.md", "docs/BENCHMARKS.md"))
    ids_all = tok(text, add_special_tokens=False)["input_ids"]
    eng = inference.InferenceEngine.__new__(inference.InferenceEngine)  # _emit needs only the tokenizer's parts
    eng.tokenizer, eng.stop_ids = tok, {tok.eos_token_id}
    if hasattr(inference, "skipped_ids"):
        eng._skip = inference.skipped_ids(tok)
    print(f"{'stop strings':<13} {'tokens':>6} {'ms a token':>10}   ({inference.__file__})")
    for stops in ([], ["<|user|>", "User:", "\n\n\n"]):
        for n in (128, 512, 1024, 4096):
            ids = ids_all[:n]
            best = min(_timed(eng, ids, stops) for _ in range(3))
            print(f"{len(stops):<13} {n:>6} {best / n * 1e3:>10.4f}")


def _timed(eng, ids, stops) -> float:
    t = time.perf_counter()
    eng._emit((i for i in ids), inference.GenerationParams(stop=stops), {}, lambda s: None, None)
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
