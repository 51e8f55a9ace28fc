"""Shared pieces of the GPU benchmarks: shapes, random-weight models, a tokenizer, timing.

Models have real architectures and random weights (nothing to download). The tokenizer is the
SmolLM2 one (carried in .gpuassets/tok, or the idletune cache); it has fewer ids than Qwen's
vocabulary, so embedding rows of ids it does not know (and its stop ids) are zeroed: generation
then never picks them, and every request decodes exactly the asked number of tokens.
"""
from __future__ import annotations

import json
import os
import statistics as st
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-3b": ("qwen2", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
}
PEAK_BF16 = 989e12  # H100 SXM dense bf16, as gpu_baseline.py counts MFU


def tokenizer_dir() -> Path:
    for p in (ROOT / ".gpuassets" / "tok", Path.home() / ".cache/idletune/models/SmolLM2-135M-Instruct"):
        if (p / "tokenizer.json").is_file():
            return p
    raise SystemExit("no tokenizer: copy SmolLM2's tokenizer files into .gpuassets/tok")


def load_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def config(name: str, max_pos: int = 4096):
    from transformers import LlamaConfig, Qwen2Config

    kind, kw = SHAPES[name]
    cls = Qwen2Config if kind == "qwen2" else LlamaConfig
    return cls(**kw, max_position_embeddings=max_pos)


def build(name: str, tok=None, dtype=torch.bfloat16, seed: int = 0):
    """A random-weight model of the named shape on the GPU (initialised there: fast)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(config(name), dtype=dtype)
    m.eval()
    if tok is not None:
        usable_vocab(m, tok)
    return m


@torch.no_grad()
def usable_vocab(model, tok) -> None:
    """Zero the output rows of ids the tokenizer lacks and of its stop ids."""
    head = model.get_output_embeddings().weight
    n = len(tok)
    head[n:].zero_()
    stops = {tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)}
    for i in stops:
        for j in (i if isinstance(i, list) else [i]):
            if j is not None and j < head.shape[0]:
                head[j].zero_()


def copy_bw() -> float:
    """Device-to-device copy bandwidth, TB/s (bytes read + written), as gpu_baseline.py."""
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 10
    del x, y
    torch.cuda.empty_cache()
    return 2 * 2 * 1024**3 / dt / 1e12


def pct(xs, p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def med(xs) -> float:
    return st.median(xs) if xs else float("nan")


def header() -> dict:
    import transformers

    try:
        import peft
        pv = peft.__version__
    except ImportError:
        pv = None
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": pv, "commit": os.environ.get("IDLETUNE_COMMIT", "?"),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}


def write(res: dict, default_name: str) -> None:
    out = os.environ.get("OUT")
    path = Path(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].endswith(".json") else (
        Path(out) / default_name if out else None)
    if path:
        path.write_text(json.dumps(res, indent=1, default=str))


def table(rows: list[list], head: list[str]) -> None:
    cols = [head] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(head))]
    for j, r in enumerate(cols):
        print(" | ".join(c.ljust(w[i]) for i, c in enumerate(r)))
        if j == 0:
            print("-|-".join("-" * x for x in w))
    sys.stdout.flush()


def attach(model, rank: int = 8, targets=("attention.q", "attention.v", "ffn.gate", "ffn.up"), live_scale: float = 0.0):
    """idletune's two adapters; ``live_scale`` > 0 gives the live adapter random non-zero weights."""
    from idletune.config import LoraConfig
    from idletune.training import adapters

    pm = adapters.attach_lora(model, LoraConfig(rank=rank, target_modules=list(targets)))
    if live_scale:
        g = torch.Generator(device="cuda").manual_seed(1)
        with torch.no_grad():
            for t in adapters.adapter_tensors(pm, adapters.LIVE).values():
                t.copy_(torch.randn(t.shape, generator=g, device="cuda") * live_scale)
    return pm


def model_dir(name: str, root: str = "/tmp/idletune-bench") -> Path:
    """A saved random-weight model folder (with the tokenizer) for ``--model`` / build_service."""
    path = Path(root) / name
    if not (path / "config.json").is_file():
        tok = load_tokenizer()
        m = build(name, tok)
        m.save_pretrained(path)
        tok.save_pretrained(path)
        del m
        torch.cuda.empty_cache()
    return path


def service(name: str, data_dir, **overrides):
    """idletune's real composition root on a random-weight model (scheduler not started). Training
    in a thread unless ``training.trainer`` is given: the benches time and reach into the engine
    itself (the GPU default, "auto", would put it in a trainer process)."""
    from idletune.config import Config
    from idletune.service import build_service

    cfg = Config.load(None, {"training.trainer": "thread", **overrides})
    return build_service(data_dir, model=model_dir(name), config=cfg, start_scheduler=False)
