"""The `idletune` command line, as a user runs it (tiny model for speed)."""
import os
import subprocess
import sys

import pytest


def idletune(*args, input=None, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "idletune.cli", *map(str, args)], input=input, text=True,
                          capture_output=True, timeout=timeout, env=dict(os.environ, **(env or {})))


def test_chat_locally_with_correction_and_training(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    r = idletune("chat", "--local", "--model", tiny_model_dir, "--data-dir", data, "--max-tokens", "5",
                 "--set", "training.max_steps=2", "--set", "gate.num_retention_probes=4",
                 "--set", "scheduler.enable_background_training=false",
                 input="What is the vault code?\n/correct The vault code is 4471.\n/train\n/status\n/quit\n")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "bot>" in out and "[idletune-v0]" in out
    assert "correction queued" in out
    assert '"accepted": true' in out  # /train ran a round and the gate accepted it
    assert '"live_version": 1' in out


def test_chat_through_a_running_server(start_server, tiny_model_dir):
    server = start_server(model=tiny_model_dir, extra=["--set", "scheduler.enable_background_training=false"])
    r = idletune("chat", "--url", server.url, "--max-tokens", "4", input="/help\n/bogus\nHello there\n/quit\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"connected to {server.url}" in r.stdout and "[idletune-v0]" in r.stdout
    assert "HTTP Request" not in r.stdout + r.stderr  # the HTTP client's log lines stay out of the chat
    assert "/correct TEXT    the right answer" in r.stdout and r.stdout.count("bot>") == 1  # /help: not a message
    assert "unknown command /bogus" in r.stdout  # nor a mistyped command


def test_status_import_snapshots_export(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    notes = tmp_path / "notes.md"
    notes.write_text("# Greenhouse\n\nThe greenhouse key hangs behind the blue door in shed 3.\n")
    r = idletune("import", notes, "--data-dir", data, "--url", "http://127.0.0.1:9")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "notes.md" in r.stdout
    r = idletune("status", "--data-dir", data, "--url", "http://127.0.0.1:9")
    assert r.returncode == 0 and '"total": 1' in r.stdout and "not running" in r.stdout
    r = idletune("train", "--model", tiny_model_dir, "--data-dir", data, "--url", "http://127.0.0.1:9",
                 "--set", "training.max_steps=2", "--set", "gate.num_retention_probes=4")
    assert r.returncode == 0 and '"accepted": true' in r.stdout, r.stdout + r.stderr[-2000:]
    r = idletune("snapshots", "list", "--data-dir", data, "--url", "http://127.0.0.1:9")
    assert "* v000001" in r.stdout
    out = tmp_path / "adapter"
    r = idletune("export", "--out", out, "--model", tiny_model_dir, "--data-dir", data, "--url", "http://127.0.0.1:9")
    assert r.returncode == 0 and (out / "adapter_config.json").exists(), r.stderr[-2000:]
    r = idletune("export", "--out", notes, "--model", tiny_model_dir, "--data-dir", data, "--url", "http://127.0.0.1:9")
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = idletune("rollback", "banana", "--data-dir", data, "--url", "http://127.0.0.1:9")
    assert r.returncode == 2 and "'banana' is not a version" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = idletune("rollback", "--model", tiny_model_dir, "--data-dir", data, "--url", "http://127.0.0.1:9")
    assert r.returncode == 0 and "now v0" in r.stdout


def test_import_keeps_the_data_directorys_settings(tmp_path):
    """`idletune import` writes the queue a server reads: its size limit and allowed hosts hold."""
    data = tmp_path / "data"
    notes = tmp_path / "notes.md"
    notes.write_text("\n\n".join(f"Note {i}: the greenhouse key hangs behind door {i}. " * 30 for i in range(6)))
    r = idletune("import", notes, "--data-dir", data, "--set", "queue.max_examples=1")
    assert r.returncode == 1 and "queue is full" in r.stdout and "queue.max_examples" in r.stdout, r.stdout + r.stderr
    r = idletune("import", "http://127.0.0.1:9/x", "--data-dir", data)
    assert r.returncode == 1 and "server.import_allow_hosts" in r.stdout
    (data / "idletune.toml").write_text('[server]\nimport_allow_hosts = ["127.0.0.1"]\n')
    r = idletune("import", "http://127.0.0.1:9/x", "--data-dir", data)  # allowed now: fetched, nothing there
    assert r.returncode == 1 and "blocked" not in r.stdout and "refusing" not in r.stdout, r.stdout


def test_snapshots_list_rounds_the_loss(tmp_path, capsys):
    import json

    from idletune.cli import main

    for version, metrics in ((1, {"loss": 2.3456789012}), (2, {})):
        d = tmp_path / "snapshots" / f"v{version:06d}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"version": version, "created_at": 1.7e9, "metrics": metrics}))
    (tmp_path / "snapshots" / "LIVE").write_text("2\n")
    assert main(["snapshots", "list", "--data-dir", str(tmp_path), "--url", "http://127.0.0.1:9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("  v0  the base model")  # always listed: a rollback can go there
    assert lines[1].startswith("  v000001  ") and lines[1].endswith("  loss=2.3457")
    assert lines[2].startswith("* v000002  ") and lines[2].endswith("  loss=?")
    (tmp_path / "snapshots" / "LIVE").write_text("0\n")  # rolled back to the base model
    assert main(["snapshots", "list", "--data-dir", str(tmp_path), "--url", "http://127.0.0.1:9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("* v0  ") and not any(x.startswith("* v00") for x in lines)


def test_bad_config_is_a_clear_error(tmp_path, tiny_model_dir):
    r = idletune("serve", "--model", tiny_model_dir, "--data-dir", tmp_path, "--set", "training.learning_rate=0.5")
    assert r.returncode == 2
    assert "training.learning_rate" in r.stderr and "Traceback" not in r.stderr
    r = idletune("serve", "--model", tmp_path / "nope", "--data-dir", tmp_path / "d")
    assert r.returncode == 2 and "not a Hugging Face model folder" in r.stderr


def test_the_converted_default_model_files_share_one_mode(default_model_dir):
    """The first start's conversion writes the cache folder's files with one mode (0666 less the
    umask): safetensors' weights file had been 0600 beside 0644 for the rest."""
    import stat

    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in default_model_dir.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_one_server_per_data_directory_and_it_says_serving_once_bound(start_server, tiny_model_dir, tmp_path):
    from conftest import ServerProcess

    data = tmp_path / "data"
    first = start_server(model=tiny_model_dir, data_dir=data, extra=["--set", "scheduler.enable_background_training=false"])
    assert f"(weights v0) on http://127.0.0.1:{first.port}" in first.log_path.read_text()
    second = ServerProcess(data, tiny_model_dir, ["--set", "scheduler.enable_background_training=false"])
    with pytest.raises(RuntimeError, match="another idletune server is using"):
        second.start(timeout=120)
    assert f"(pid {first.proc.pid})" in second.log_path.read_text()
    # the other commands find it on its port (no --url, no IDLETUNE_URL): through it, not beside it
    r = idletune("status", "--data-dir", data, env={"IDLETUNE_URL": ""})
    assert r.returncode == 0 and '"live_version": 0' in r.stdout and "not running" not in r.stdout, r.stdout[-800:]
    # where it does not answer at the URL given, nothing trains or rolls back beside it
    for command in (["train"], ["rollback", "0"], ["chat", "--local"]):
        r = idletune(*command, "--data-dir", data, "--model", tiny_model_dir, "--url", "http://127.0.0.1:9", input="")
        assert r.returncode == 2 and f"a server (pid {first.proc.pid}) is using" in r.stderr, (command, r.stderr[-800:])
        assert first.url in r.stderr and "Traceback" not in r.stderr
    # a port already taken: refused, and no line claims it is serving there
    r = idletune("serve", "--data-dir", tmp_path / "other", "--model", tiny_model_dir, "--port", first.port,
                 "--set", "scheduler.enable_background_training=false", timeout=180)
    assert r.returncode == 2 and "address already in use" in r.stderr, r.stderr[-1500:]
    assert "[idletune] serving" not in r.stderr and "loading the model" not in r.stderr, r.stderr[-1500:]  # at once


def test_a_response_cut_off_at_the_stop_is_one_line_in_the_log_not_a_traceback():
    """uvicorn cancels what is still running at the end of the shutdown's grace period and logs
    each as an error with the cancellation's traceback; a user sees one line instead. Other
    errors keep their tracebacks, and so does a cancellation while the server is not stopping."""
    import asyncio
    import logging
    import threading

    from idletune.cli import _CutShort

    def record(exc):
        return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application\n",
                                 (), (type(exc), exc, None))
    stopping = threading.Event()
    keep = _CutShort(stopping)
    r = record(asyncio.CancelledError("Task cancelled, timeout graceful shutdown exceeded"))
    assert keep.filter(r) and r.exc_info is not None  # not stopping: as it was
    stopping.set()
    assert keep.filter(r) and r.exc_info is None and "cut short: the server is stopping" in r.getMessage()
    other = record(ValueError("boom"))
    assert keep.filter(other) and other.exc_info is not None
