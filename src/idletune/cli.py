"""The `idletune` command: serve, chat, import, status, train, export, snapshots, rollback."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from .config import Config, ConfigError, default_data_dir

DEFAULT_URL = "http://127.0.0.1:8000"


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(args) -> Config:
    overrides = {}
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use section.field=value, e.g. training.learning_rate=5e-4")
        key, value = item.split("=", 1)
        overrides[key.strip()] = _parse_value(value.strip())
    if getattr(args, "mode", None):
        overrides["training.mode"] = args.mode
    if getattr(args, "host", None):
        overrides["server.host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["server.port"] = args.port
    if getattr(args, "api_key", None):
        overrides["server.api_key"] = args.api_key
    if getattr(args, "insecure_no_key", False):
        overrides["server.insecure_no_key"] = True
    path = args.config or (Path(args.data_dir) / "idletune.toml")
    if args.config and not Path(args.config).exists():
        raise ConfigError(f"--config {args.config}: no such file")
    return Config.load(path, overrides)


def _service(args, start_scheduler: bool):
    from .service import build_service

    return build_service(args.data_dir, model=args.model, config=load_config(args), start_scheduler=start_scheduler)


# ---- subcommands ------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    import uvicorn

    from .server import create_app

    from .server.auth import check_bind

    config = load_config(args)
    insecure = check_bind(config.server)  # refuses a public address without a key, before loading anything
    if insecure:
        logging.getLogger("idletune").warning("WARNING: %s", insecure)
    _check_port(config.server.host, config.server.port)  # before a minute of loading, not after
    print(f"[idletune] data directory: {args.data_dir}", file=sys.stderr, flush=True)
    held = _hold_data_dir(Path(args.data_dir).expanduser(), _local_url(config.server.host, config.server.port))
    print("[idletune] loading the model…", file=sys.stderr, flush=True)
    from .service import build_service

    try:
        svc = build_service(args.data_dir, model=args.model, config=config)
    except BaseException:
        if held is not None:
            held.close()
        raise
    app = create_app(svc)
    host, port = config.server.host, config.server.port
    serving = (f"[idletune] serving {svc.model_name} (weights v{svc.weights.version}) on http://{host}:{port}"
               + (" (API key required)" if config.server.api_key else ""))
    try:
        _serve(uvicorn, app, host, port, lambda: print(serving, file=sys.stderr, flush=True))
    finally:
        svc.close()
        if held is not None:
            held.close()  # the lock goes with it
    return 0


def _hold_data_dir(data_dir: Path, url: str):
    """An exclusive lock on ``DATA_DIR/serve.lock`` for as long as this server runs: a second
    server on the same data directory trained the same queue and published versions over the
    first one's, which went on serving its own. Refused with the holder's pid. The file holds
    the pid and ``url``, where the other commands find this server (:func:`server_of`). (No
    lock where the platform has no ``fcntl``.)"""
    try:
        import fcntl
    except ImportError:
        return None
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    f = open(data_dir / "serve.lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid, _ = _holder(f.read())
        f.close()
        raise ValueError(f"another idletune server is using {data_dir}{f' (pid {pid})' if pid else ''}: "
                         "stop it first, or give this one another --data-dir") from None
    except OSError as e:  # a file system without locks (some network mounts): serve unguarded
        logging.getLogger("idletune").warning("could not lock %s (%s): make sure no other server uses it",
                                              data_dir, e)
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n{url}\n")
    f.flush()
    return f


def _check_port(host: str, port: int) -> None:
    """Refuse a port another program holds, before the model loads (uvicorn would say so only
    once it has). The server binds it again moments later."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host!r}: cannot be resolved ({e})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(addr)
        except OSError as e:
            raise ValueError(f"cannot serve on {host}:{port}: {e.strerror.lower() if e.strerror else e} "
                             "(another server there? choose another with --port, or PORT=… for make serve)") from None


def _local_url(host: str, port: int) -> str:
    """Where a command on this machine reaches a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _holder(text: str) -> tuple[int | None, str | None]:
    """``serve.lock``'s contents (:func:`_hold_data_dir`): the server's pid and URL, where given."""
    fields = text.split()
    pid = int(fields[0]) if fields and fields[0].isdigit() else None
    return pid, (fields[1] if len(fields) > 1 else None)


def server_of(data_dir: Path) -> tuple[int, str | None] | None:
    """The server using ``data_dir`` (its pid and URL, from ``serve.lock``), or None where none
    runs: the file's pid is no longer a running idletune process (a stopped server leaves it)."""
    try:
        pid, url = _holder((Path(data_dir).expanduser() / "serve.lock").read_text(encoding="utf-8"))
    except OSError:
        return None
    if pid is None or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # another user's process: alive
    try:  # a pid reused by another program since (Linux)
        if b"idletune" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
    except OSError:
        pass
    return pid, url


def _resolve_url(args) -> None:
    """``--url``, else ``IDLETUNE_URL``, else the URL of the server using the data directory,
    else the default (:data:`DEFAULT_URL`): the commands reach a server on any port by itself."""
    if getattr(args, "url", "") is not None:
        return
    running = server_of(Path(args.data_dir))
    args.url = (running[1] if running and running[1] else None) or DEFAULT_URL


def _not_beside_a_server(args, what: str) -> None:
    """Refuse to ``what`` in this process where a server uses the data directory but does not
    answer at ``args.url``: this process would train, publish or roll back behind its back."""
    running = server_of(Path(args.data_dir))
    if running is not None:
        pid, url = running
        where = f"it serves {url}; " if url and url != args.url else ""
        raise RuntimeError(f"a server (pid {pid}) is using {args.data_dir}, but {args.url} does not answer "
                           f"({where}it may still be starting): not {what} here beside it. Wait for it, give "
                           "--url, or stop it first")


def _serve(uvicorn, app, host: str, port: int, on_started=None) -> None:
    """uvicorn's server until SIGTERM or Ctrl-C, then a graceful shutdown that returns here.
    uvicorn itself raises the signal again once it has shut down, which ends the process before
    the service closes (a trainer process left to notice on its own, make's "Terminated"). The
    shutdown waits at most ``SHUTDOWN_GRACE_S`` for open responses: the web page's status
    stream (``/api/events``) never ends on its own, and kept the server up while a page was open;
    it now ends when the shutdown begins (``app.state.stopping``). A response still in progress
    at the end of the grace period is cut off with one line in the log, not a traceback."""
    import contextlib

    stopping = getattr(app.state, "stopping", None)
    logging.getLogger("uvicorn.error").addFilter(_CutShort(stopping))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if stopping is not None:
                stopping.set()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()  # shut down already: not raised again

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and on_started is not None:  # the port is bound: now say where
                on_started()

    Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                          timeout_graceful_shutdown=SHUTDOWN_GRACE_S)).run()


SHUTDOWN_GRACE_S = 3  # seconds a stopping server lets responses in progress finish


class _CutShort(logging.Filter):
    """uvicorn logs a response it cancels at the end of the shutdown's grace period as an error
    with the cancellation's traceback: one line says what happened instead."""

    def __init__(self, stopping) -> None:
        super().__init__()
        self.stopping = stopping

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError) and (self.stopping is None or self.stopping.is_set()):
            record.msg, record.args, record.exc_info, record.exc_text = (
                f"a response still in progress after {SHUTDOWN_GRACE_S} s was cut short: the server is stopping",
                (), None, None)
        return True


def _auth_headers() -> dict:
    """``Authorization: Bearer $IDLETUNE_API_KEY`` for a server that requires a key."""
    key = os.environ.get("IDLETUNE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _http(method: str, url: str, **kwargs):
    """An HTTP call to the server with the key; a refused key is an error that says what to do."""
    import httpx

    r = httpx.request(method, url, headers=_auth_headers(), **kwargs)
    if r.status_code in (401, 403):
        raise RuntimeError(f"{url}: {r.json().get('error', {}).get('message', r.reason_phrase)}"
                           + ("; set IDLETUNE_API_KEY to the server's key" if r.status_code == 401 else ""))
    return r


def _server_up(url: str) -> bool:
    """A server answers at ``url`` (one that refuses our key counts: its error is reported later)."""
    import httpx

    try:
        return httpx.get(f"{url}/api/status", timeout=2, headers=_auth_headers()).status_code in (200, 401)
    except httpx.HTTPError:
        return False


CHAT_HELP = """commands:
  /new             start a new conversation (the model keeps what it learned)
  /correct TEXT    the right answer to the model's last one: queued to train first
  /train           train now on what is pending, and wait for the round
  /status          the live version, the queue and the latest training step
  /quit            leave (also /exit, Ctrl-D)
  //TEXT           a message that starts with a slash"""


def cmd_chat(args) -> int:
    """A terminal chat: through a running server if there is one, else in-process."""
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    remote = not args.local and _server_up(args.url)
    if not remote:
        _not_beside_a_server(args, "loading the model and training")
    if remote:
        from openai import OpenAI

        client = OpenAI(base_url=f"{args.url}/v1", api_key=os.environ.get("IDLETUNE_API_KEY", "none"))
        print(f"connected to {args.url}. Commands: /new, /correct TEXT, /train, /status, /help, /quit", flush=True)

        def reply(msgs):
            stream = client.chat.completions.create(model="idletune", messages=msgs, stream=True,
                                                    max_tokens=args.max_tokens)
            parts, version = [], "?"
            for ch in stream:
                version = ch.system_fingerprint or version
                if ch.choices and ch.choices[0].delta.content:
                    print(ch.choices[0].delta.content, end="", flush=True)
                    parts.append(ch.choices[0].delta.content)
            return "".join(parts), version
    else:
        from .inference import GenerationParams

        svc = _service(args, start_scheduler=True)
        print(f"{svc.model_name} loaded locally (weights v{svc.weights.version}); it trains while you think. "
              "Commands: /new, /correct TEXT, /train, /status, /help, /quit", flush=True)

        def reply(msgs):
            import uuid

            c = svc.inference.generate(msgs, GenerationParams(max_tokens=args.max_tokens),
                                       on_text=lambda t: print(t, end="", flush=True))
            svc.collector.log_exchange(msgs, c.text, generation_id="chatcmpl-" + uuid.uuid4().hex[:24],
                                       version=c.version)
            return c.text, f"idletune-v{c.version}"

    def api(path: str, body: dict | None = None) -> dict:
        return _http("POST", f"{args.url}{path}", json=body or {}, timeout=600).json()

    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line in ("/help", "/?"):
            print(CHAT_HELP)
            continue
        if line == "/new":
            history = [m for m in history if m["role"] == "system"]
            print("(new conversation)")
            continue
        if line.startswith("/correct"):
            text = line[len("/correct"):].strip()
            if not text or len(history) < 2:
                print("usage: /correct THE RIGHT ANSWER (after the model has answered)")
                continue
            if remote:
                api("/api/feedback", {"messages": history, "correction": text})
            else:
                svc.collector.add_correction(history, text)
            history[-1] = {"role": "assistant", "content": text}
            print("(correction queued with high priority)")
            continue
        if line == "/train":
            res = api("/api/training/force?wait=true") if remote else svc.scheduler.force_training(wait=True)
            print(f"(training: {json.dumps(res.get('result', res), default=str)})")
            continue
        if line == "/status":
            st = _http("GET", f"{args.url}/api/status").json() if remote else _local_status(svc)
            print(json.dumps({k: st[k] for k in ("live_version", "queue", "training")}, indent=1, default=str))
            continue
        word = line.split(maxsplit=1)[0]
        if re.fullmatch(r"/[A-Za-z]+", word):  # a mistyped command is not a message to learn from
            print(f"unknown command {word}; /help lists them (start a message with // to send a slash)")
            continue
        if line.startswith("//"):
            line = line[1:]
        history.append({"role": "user", "content": line})
        print("bot> ", end="", flush=True)
        try:
            text, version = reply(history)
        except Exception as e:  # show the problem, keep the session
            print(f"\n(error: {e})")
            history.pop()
            continue
        print(f"   [{version}]")
        history.append({"role": "assistant", "content": text})
    if not remote:
        svc.close()
    return 0


def _local_status(svc) -> dict:
    from .server.routes_api import status_of

    return status_of(svc)


def cmd_status(args) -> int:
    if _server_up(args.url):
        st = _http("GET", f"{args.url}/api/status", timeout=10).json()
    else:
        from .queue import TrainingQueue

        q = TrainingQueue(Path(args.data_dir) / "queue.db")
        running = server_of(Path(args.data_dir))
        st = {"server": (f"not answering at {args.url}, but a server (pid {running[0]}) is using this data "
                         "directory: it may still be starting" if running else f"not running at {args.url}"),
              "queue": q.get_stats()}
    print(json.dumps(st, indent=2, default=str))
    return 0


def cmd_train(args) -> int:
    """Train now on what is pending (through the server if it is running)."""
    if _server_up(args.url):
        res = _http("POST", f"{args.url}/api/training/force", params={"wait": "true"}, timeout=3600).json()
        print(json.dumps(res.get("result", res), indent=2, default=str))
        return 0
    _not_beside_a_server(args, "training")
    svc = _service(args, start_scheduler=True)
    try:
        print(json.dumps(svc.scheduler.force_training(wait=True, timeout=3600), indent=2, default=str))
    finally:
        svc.close()
    return 0


def cmd_import(args) -> int:
    """Into the data directory's queue, with its settings (``idletune.toml``, ``--set``) as a
    server would: the queue's size limit, the hosts imports may fetch."""
    from .importers import ImportersConfig
    from .importers.cli import run_import
    from .queue import TrainingQueue

    config = load_config(args)
    q = TrainingQueue(Path(args.data_dir) / "queue.db", max_examples=config.queue.max_examples)
    try:
        return run_import(args.sources, q, depth=args.depth, max_pages=args.max_pages,
                          allow_private=args.allow_private, config=ImportersConfig.for_server(config.server))
    finally:
        q.close()


def cmd_export(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; export writes a folder: name a new or an existing folder")
    svc = _service(args, start_scheduler=False)
    try:
        # An adapter alone only makes sense on the original base; otherwise write the full model.
        merged = args.merged or svc.weights.mode == "full" or svc.weights.base_id != "original"
        if merged:
            from .training.export import export_merged

            export_merged(svc, out)
        else:
            from .training.adapters import LIVE, save_adapter

            with svc.engine.lock:
                save_adapter(svc.model, LIVE, out, str(svc.model_dir))
        print(f"wrote {'a full model (Hugging Face folder)' if merged else 'a LoRA adapter (PEFT format)'} "
              f"of weights v{svc.weights.version} to {out}")
    finally:
        svc.close()
    return 0


def _snapshot_dir_list(data_dir: Path) -> tuple[list[dict], int]:
    """The snapshots on disk, and the live version (0, the base model, before any pointer)."""
    out = []
    live = 0
    pointer = data_dir / "snapshots" / "LIVE"
    if pointer.exists():
        live = int(pointer.read_text().strip() or 0)
    for p in sorted((data_dir / "snapshots").glob("v[0-9]*")):
        try:
            meta = json.loads((p / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out.append({"id": p.name, "version": meta["version"], "created_at": meta.get("created_at"),
                    "loss": (meta.get("metrics") or {}).get("loss")})
    return out, live


def cmd_snapshots(args) -> int:
    import datetime

    if _server_up(args.url):
        body = _http("GET", f"{args.url}/api/snapshots").json()
        rows, live = body["data"], body["live_version"]
    else:
        rows, live = _snapshot_dir_list(Path(args.data_dir))
    print(f"{'*' if live == 0 else ' '} v0  the base model (always there to roll back to)")
    for r in rows:
        when = datetime.datetime.fromtimestamp(r["created_at"]).strftime("%Y-%m-%d %H:%M:%S") if r.get("created_at") else "?"
        loss = (r.get("metrics") or {}).get("loss", r.get("loss"))
        loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else "?"
        print(f"{'*' if r['version'] == live else ' '} {r['id']}  {when}  loss={loss}")
    print("* = live")
    return 0


def cmd_rollback(args) -> int:
    try:
        version = int(args.id.lstrip("v")) if args.id else None
    except ValueError:
        raise ValueError(f"{args.id!r} is not a version: give a number like 3 or a snapshot id like v000003") from None
    if _server_up(args.url):
        r = _http("POST", f"{args.url}/api/snapshots/rollback", json={"version": version})
        body = r.json()
        if r.status_code != 200:
            raise ValueError(body["error"]["message"])
        print(f"live weights are now v{body['live_version']}")
        return 0
    _not_beside_a_server(args, "rolling back")
    svc = _service(args, start_scheduler=False)
    try:
        v = svc.weights.rollback(version, "requested on the command line")
        print(f"live weights are now v{v}")
    finally:
        svc.close()
    return 0


# ---- argument parsing -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=str(default_data_dir()),
                        help="queue, chat log, snapshots and metrics (default: %(default)s)")
    common.add_argument("--model", default=None, help="a local Hugging Face causal-LM folder (default: SmolLM2-135M-Instruct)")
    common.add_argument("--config", default=None, help="a TOML config file (default: DATA_DIR/idletune.toml if present)")
    common.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config field, e.g. --set training.learning_rate=5e-4 (repeatable)")
    common.add_argument("--url", default=os.environ.get("IDLETUNE_URL") or None,
                        help=f"a running idletune server (default: $IDLETUNE_URL, else the server using the "
                             f"data directory, else {DEFAULT_URL})")

    p = argparse.ArgumentParser(prog="idletune", description="A local chat model that learns from you while idle.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", parents=[common], help="start the server (API and web page)")
    s.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default 8000)")
    s.add_argument("--mode", choices=["lora", "full", "hybrid"], default=None,
                   help="what trains (training.mode): lora (the default), full fine-tuning, or hybrid "
                        "(LoRA until its loss plateaus, then full); see docs/CONFIGURATION.md")
    s.add_argument("--api-key", default=os.environ.get("IDLETUNE_API_KEY") or None,
                   help="require this key as 'Authorization: Bearer KEY' on every request "
                        "(default: $IDLETUNE_API_KEY; prefer the variable: arguments are visible to other users)")
    s.add_argument("--insecure-no-key", action="store_true",
                   help="serve on a non-loopback --host without an API key (anyone who can reach it can use it)")
    s.set_defaults(func=cmd_serve)
    c = sub.add_parser("chat", parents=[common], help="chat in the terminal")
    c.add_argument("--local", action="store_true", help="load the model here even if a server is running")
    c.add_argument("--system", default=None, help="a system prompt")
    c.add_argument("--max-tokens", type=int, default=256)
    c.set_defaults(func=cmd_chat)
    i = sub.add_parser("import", parents=[common], help="import web pages, images, documents or chat exports")
    i.add_argument("sources", nargs="+", metavar="URL_OR_PATH")
    i.add_argument("--depth", type=int, default=0, help="follow same-site links this deep")
    i.add_argument("--max-pages", type=int, default=20)
    i.add_argument("--allow-private", action="store_true", help="allow URLs on private or loopback addresses")
    i.set_defaults(func=cmd_import)
    sub.add_parser("status", parents=[common], help="show queue, training and weights").set_defaults(func=cmd_status)
    sub.add_parser("train", parents=[common], help="train now on pending examples").set_defaults(func=cmd_train)
    e = sub.add_parser("export", parents=[common], help="write the live weights")
    e.add_argument("--out", required=True)
    e.add_argument("--merged", action="store_true", help="a full model with the adapter merged in")
    e.set_defaults(func=cmd_export)
    sn = sub.add_parser("snapshots", parents=[common], help="list accepted weight versions")
    sn.add_argument("action", nargs="?", default="list", choices=["list"])
    sn.set_defaults(func=cmd_snapshots)
    r = sub.add_parser("rollback", parents=[common], help="serve an earlier version (default: the one the live version was trained from)")
    r.add_argument("id", nargs="?", default=None, help="a snapshot id like v000003, or a version number")
    r.set_defaults(func=cmd_rollback)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _resolve_url(args)
    logging.basicConfig(level=logging.INFO, format="[idletune] %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "openai", "transformers", "peft"):  # httpx2: what openai's client logs as
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except (ConfigError, ValueError, OSError, RuntimeError) as e:  # OSError: a path that cannot be written, …
        print(f"idletune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
