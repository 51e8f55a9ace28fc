"""A real `idletune serve` on a free loopback port, for the HTTP benchmarks."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, model: str | None, port: int, extra: list[str],
                 timeout: float = 300) -> subprocess.Popen:
    """Start the server (log beside ``data_dir``) and wait until /api/status answers."""
    cmd = [sys.executable, "-m", "idletune.cli", "serve", "--data-dir", str(data_dir), "--port", str(port)] + extra
    if model:
        cmd += ["--model", model]
    log_path = data_dir.parent / "server.log"
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/status", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start in {timeout:.0f} s")
