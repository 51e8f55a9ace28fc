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


class BaseProbes:
    """The real default model's retention probes (``probes.json``) and its base retention loss
    (``snapshots/BASELINE.json``) under the default settings: 24 gate and 40 rehearsal prompts
    answered greedily, about 20 s on two cores, recorded by the product on a fresh data directory's
    first training round. Both are keyed only on what they were made from (the model folder, the
    probes' format and counts; the probes' fingerprint), and greedy decoding is deterministic, so
    the files one data directory got are exactly what another one would record (those a server
    recorded in the Quick-start test and those ``build_service`` records in the test process were
    byte for byte the same): recorded once a session, they are copied into the data directories
    of the later real-model tests before their service starts. ``keep`` takes the files of a test
    that recorded them from scratch (the Quick-start test in test_e2e_learning.py, which runs
    first); without one, the product's own code records them (``build_service`` on a data
    directory of its own)."""

    FILES = ("probes.json", "snapshots/BASELINE.json")

    def __init__(self, model_dir: Path, store: Path):
        self.model_dir, self.store = model_dir, store

    def _wanted(self) -> dict:
        from idletune.config import Config
        from idletune.training import probes

        cfg = Config()
        return {"model": str(self.model_dir), "format": probes.FORMAT, "prompts": cfg.gate.num_retention_probes,
                "rehearsal": cfg.training.rehearsal_probes}

    def _check(self, data_dir: Path) -> None:
        """The files are the base model's, made for the default settings and for each other."""
        import json

        from idletune.training import probes

        recorded = json.loads((data_dir / "probes.json").read_text(encoding="utf-8"))
        wanted = self._wanted()
        assert {k: recorded.get(k) for k in wanted} == wanted, f"probes made for other settings: {wanted}"
        baseline = json.loads((data_dir / "snapshots" / "BASELINE.json").read_text())
        gate = probes.load_or_record(data_dir / "probes.json", None, None, wanted["prompts"], wanted["model"],
                                     wanted["rehearsal"]).gate
        assert baseline.get("probes") == probes.fingerprint(gate) and set(baseline) == {"retention_loss", "probes"}, \
            f"BASELINE.json is not the base model's loss on these probes: {baseline}"

    def keep(self, data_dir: Path) -> None:
        """Keep the files a test recorded from scratch in ``data_dir`` for the tests after it; where
        some are kept already (recorded in the test process, or by an earlier test), the new ones
        must be the same, byte for byte."""
        import shutil

        self._check(data_dir)
        if not all((self.store / f).exists() for f in self.FILES):
            (self.store / "snapshots").mkdir(parents=True, exist_ok=True)
            for f in self.FILES:
                shutil.copy(data_dir / f, self.store / f)
        for f in self.FILES:
            assert (data_dir / f).read_bytes() == (self.store / f).read_bytes(), \
                f"{f} recorded again differs from the one kept: the recording is not deterministic"

    def _record(self) -> None:
        from idletune.config import Config
        from idletune.service import build_service

        cfg = Config.load(None, {"scheduler.enable_background_training": False, "training.trainer": "thread"})
        data_dir = self.store.parent / (self.store.name + "-data")
        svc = build_service(data_dir, model=self.model_dir, config=cfg, start_scheduler=False)
        try:
            svc.weights._base_retention(svc.engine, svc.probes().gate)
        finally:
            svc.close()
        self.keep(data_dir)

    def seed(self, data_dir: Path) -> dict[str, bytes]:
        """Copy the files into ``data_dir`` (made as the server makes it); returns what was copied."""
        import shutil

        if not all((self.store / f).exists() for f in self.FILES):
            self._record()
        (data_dir / "snapshots").mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o700)  # private, as build_service makes a new one
        for f in self.FILES:
            shutil.copy(self.store / f, data_dir / f)
        return {f: (data_dir / f).read_bytes() for f in self.FILES}


@pytest.fixture(scope="session")
def base_probes(tmp_path_factory, default_model_dir) -> BaseProbes:
    """The real default model's retention probes and base retention loss, recorded once a session."""
    return BaseProbes(default_model_dir, tmp_path_factory.mktemp("base-probes"))


@pytest.fixture
def probed_data_dir(tmp_path, base_probes) -> Path:
    """``tmp_path / "data"`` with the real default model's probes and base retention loss already
    there, as the first training round on a fresh data directory leaves them. After the test, both
    files must be unchanged: the product took them as its own rather than recording them again
    (asked for before ``start_server``, this check runs once the server has stopped)."""
    data = tmp_path / "data"
    seeded = base_probes.seed(data)
    yield data
    for f, content in seeded.items():
        assert (data / f).read_bytes() == content, f"{f} was recorded again: the copy was not what the product makes"
