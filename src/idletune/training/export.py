"""Export the live weights as a plain Hugging Face model folder (adapter merged in)."""
from __future__ import annotations

import tempfile
from pathlib import Path


def export_merged(svc, out: str | Path) -> Path:
    from peft import PeftModel

    from ..models import load_model
    from .adapters import LIVE, save_adapter

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        with svc.engine.lock:
            save_adapter(svc.model, LIVE, tmp, str(svc.model_dir))
        base, tokenizer = load_model(svc.model_dir, device="cpu")
        merged = PeftModel.from_pretrained(base, tmp).merge_and_unload(safe_merge=True)
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out
