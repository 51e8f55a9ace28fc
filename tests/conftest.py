"""Shared fixtures: tiny models built from configs, the real default model, a real server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
# Converted models are cached across test runs (and shared with `idletune serve`).
CACHE = Path(os.environ.get("IDLETUNE_CACHE", Path.home() / ".cache" / "idletune"))

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def browser_api(module_level: bool = False):
    """Playwright's sync API for the browser tests, once Debian's Chromium is there. Without it a
    user gets a skip that says how to install it; under CI (``CI`` set) a failure: CI installs
    both, so a browser test must never be skipped there silently."""
    reason = None
    if not CHROMIUM.exists():
        reason = ("needs Chromium at /usr/bin/chromium: `sudo apt-get install chromium chromium-driver` "
                  "(scripts/setup.sh does it when run as root)")
    else:
        try:
            import playwright.sync_api as api
            return api
        except ImportError:
            reason = "needs the playwright package: `make setup` installs the dev dependencies"
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct), converted once to safetensors."""
    from idletune.models import default_model_dir as convert

    return convert(CACHE)


def make_tiny_llama(out: Path, tokenizer_dir: Path, layers: int = 2) -> Path:
    """A Llama of ``layers`` layers with ``tokenizer_dir``'s tokenizer and chat template, random weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, initializer_range=0.2)  # varied tokens, not one repeated
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer Llama with the default model's tokenizer and chat template, random weights."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`idletune serve` in a subprocess on a free loopback port."""

    def __init__(self, data_dir: Path, model: Path | None = None, extra: list[str] | None = None):
        self.data_dir, self.model, self.extra = Path(data_dir), model, extra or []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 180) -> "ServerProcess":
        import httpx

        cmd = [sys.executable, "-m", "idletune.cli", "serve", "--data-dir", str(self.data_dir), "--port", str(self.port)]
        if self.model is not None:
            cmd += ["--model", str(self.model)]
        cmd += self.extra
        env = dict(os.environ, IDLETUNE_CACHE=str(CACHE), PYTHONUNBUFFERED="1")
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/api/status", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "log", None):
            self.log.close()


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(model=..., data_dir=..., extra=[...]) -> ServerProcess (stopped after the test)."""
    servers: list[ServerProcess] = []

    def start(model: Path | None = None, data_dir: Path | None = None, extra: list[str] | None = None,
              timeout: float = 180) -> ServerProcess:
        s = ServerProcess(data_dir or tmp_path / "data", model, extra)
        servers.append(s)
        return s.start(timeout)

    yield start
    for s in servers:
        s.stop()
