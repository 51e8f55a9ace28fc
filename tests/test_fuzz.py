"""Property-based fuzzing: the HTTP API from its OpenAPI description (schemathesis, against a real
`idletune serve`), the importers and config parsing (hypothesis). No 5xx, no crash, no hang;
every rejection is an error that names the problem. A longer run: bench/fuzz_long.py."""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ServerProcess

schemathesis = pytest.importorskip("schemathesis")

API_EXAMPLES = int(os.environ.get("IDLETUNE_FUZZ_EXAMPLES", "12"))
# /api/events is an endless stream by design (tested for promptness below); "wait" makes a
# training round part of the request.
SKIP_PATHS = ["/api/events"]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_model_dir):
    s = ServerProcess(tmp_path_factory.mktemp("fuzz") / "data", tiny_model_dir,
                      ["--set", "scheduler.enable_background_training=false",
                       "--set", "server.max_new_tokens=8", "--set", "server.default_max_tokens=4",
                       "--set", "gate.num_retention_probes=4", "--set", "training.max_steps=2"]).start()
    yield s
    s.stop()
    errors = sorted({ln for ln in s.log_path.read_text().splitlines()
                     if "Traceback" in ln or "unexpected error" in ln or re.match(r"^[\w.]+(Error|Exception)\b", ln)})
    assert not errors, errors[:20]  # no unexpected error on the server, even one answered politely


def _operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json").exclude(path=SKIP_PATHS)
    return [result.ok() for result in schema.get_all_operations()]


def check_case(case) -> None:
    """One generated request: no 5xx, an answer within 30 s, and errors that say what is wrong."""
    if case.query and "wait" in case.query:
        case.query["wait"] = False  # a whole training round per example would only measure training
    started = time.monotonic()
    response = case.call(timeout=60)
    took = time.monotonic() - started
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
    assert took < 30, f"{case.method} {case.path} took {took:.1f} s"
    if response.status_code >= 400:
        body = response.json()
        message = body["error"]["message"]
        assert isinstance(message, str) and len(message) > 8, body
        assert "Traceback" not in response.text


def test_api_never_answers_5xx_or_hangs(fuzz_server):
    # schemathesis' own pytest plugin does not run under pytest 9: drive its strategies directly.
    operations = _operations(fuzz_server.url)
    assert len(operations) >= 15, [op.label for op in operations]
    tried: dict[str, int] = {}
    for op in operations:
        @settings(max_examples=API_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def fuzz(case):
            tried[op.label] = tried.get(op.label, 0) + 1
            check_case(case)

        fuzz()
    print(f"\nAPI fuzz: {sum(tried.values())} requests over {len(tried)} operations")
    assert sum(tried.values()) >= len(operations) * min(API_EXAMPLES, 5)


@pytest.mark.parametrize("interval", ["nan", "inf", "-1", "1e308", "0"])
def test_event_stream_answers_promptly_with_any_interval(fuzz_server, interval):
    started = time.monotonic()
    with httpx.stream("GET", f"{fuzz_server.url}/api/events", params={"interval": interval}, timeout=10) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                json.loads(line[6:])
                break
    assert time.monotonic() - started < 5


# ---- importers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def importers():
    from idletune.importers import Importers
    from idletune.queue import TrainingQueue

    with tempfile.TemporaryDirectory() as d:
        q = TrainingQueue(Path(d) / "queue.db")
        yield Importers(q)
        q.close()


FORMATS = st.sampled_from([None, "auto", "text", "markdown", "md", "html", "json", "jsonl", "csv", "tsv", "pdf",
                           "docx", "chat", "sharegpt", "openai", "alpaca", "bogus", ""])
NAMES = st.sampled_from(["a.txt", "b.md", "c.html", "d.json", "e.jsonl", "f.csv", "g.pdf", "h.docx", "i.png",
                         "noext", ".hidden", "x" * 300 + ".txt", "../../etc/passwd", "spa ce.tsv"])
TEXTS = st.one_of(st.text(max_size=3000), st.text(alphabet=st.characters(codec="utf-8"), max_size=500),
                  st.builds(lambda r, n: r * n, st.text(min_size=1, max_size=40), st.integers(1, 200)),
                  st.builds(json.dumps, st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=30),
                                                     lambda c: st.lists(c, max_size=5)
                                                     | st.dictionaries(st.text(max_size=10), c, max_size=5),
                                                     max_leaves=20)))
STRUCTURED = [b"%PDF-1.4\n", b"PK\x03\x04", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"{\"messages\": [", b"<html><body>",
              b"\xef\xbb\xbf", b"\xff\xfe"]


def _one_of_outcomes(call):
    """An ImportResult, or an ImportFailed whose message says what is wrong: nothing else."""
    from idletune.importers import ImportFailed
    from idletune.importers.results import ImportResult

    try:
        out = call()
    except ImportFailed as e:
        assert str(e) and len(str(e)) > 8 and e.code, (str(e), e.code)
        assert 400 <= e.http_status < 500
        return None
    assert isinstance(out, ImportResult)
    assert out.examples_generated >= len(out.example_ids)
    return out


@settings(max_examples=int(os.environ.get("IDLETUNE_FUZZ_IMPORTS", "120")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=TEXTS, fmt=FORMATS, name=st.none() | NAMES)
def test_import_text_with_any_text(importers, text, fmt, name):
    _one_of_outcomes(lambda: importers.text.import_text(text, format=fmt, name=name))


@settings(max_examples=int(os.environ.get("IDLETUNE_FUZZ_IMPORTS", "120")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(head=st.sampled_from([b""] + STRUCTURED), data=st.binary(max_size=3000), name=NAMES,
       fmt=st.sampled_from([None, "auto", "pdf", "docx", "json", "csv", "text", "image", "html"]))
def test_import_bytes_with_any_bytes(importers, head, data, name, fmt):
    _one_of_outcomes(lambda: importers.import_bytes(head + data, name, format=fmt))


@settings(max_examples=int(os.environ.get("IDLETUNE_FUZZ_IMPORTS", "120")) * 2, deadline=None)
@given(text=TEXTS, max_tokens=st.integers(1, 600), overlap=st.integers(0, 600))
def test_chunk_text_keeps_every_word_within_budget(text, max_tokens, overlap):
    from idletune.importers.chunking import chunk_text, estimate_tokens

    if overlap >= max_tokens:
        with pytest.raises(ValueError, match="overlap_tokens"):
            chunk_text(text, max_tokens=max_tokens, overlap_tokens=overlap)
        return
    chunks = chunk_text(text, max_tokens=max_tokens, overlap_tokens=overlap)
    if not text.strip():
        assert chunks == []
        return
    assert chunks and [c.index for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert c.text.strip()
        assert c.tokens <= max_tokens or estimate_tokens(c.text) <= max_tokens, (c.tokens, max_tokens, c.text[:200])
    joined = " ".join(c.text for c in chunks)
    for word in text.split():  # nothing is dropped (a word may be cut into pieces across chunks)
        if len(word) <= 8 and estimate_tokens(word) <= max(1, max_tokens // 4):
            assert word in joined, word


# ---- config ----------------------------------------------------------------------------------

FIELDS = ["training.mode", "training.learning_rate", "training.batch_size", "training.max_steps",
          "training.max_seq_len", "training.lora.rank", "training.lora.target_modules", "training.lora",
          "training", "scheduler.min_idle_time_ms", "scheduler.max_cpu_usage", "scheduler", "gate.heldout_examples",
          "server.port", "server.host", "server.api_key", "server.cors_origins", "server.max_body_bytes",
          "server.default_max_tokens", "server.max_new_tokens", "server.max_prompt_tokens", "server", "queue",
          "queue.max_examples", "nope", "training.nope", "", ".", "a..b", "server.port.x"]
VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats()
                      | st.text(max_size=20), lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(st.text(max_size=12), c, max_size=3), max_leaves=8)


@settings(max_examples=int(os.environ.get("IDLETUNE_FUZZ_CONFIG", "400")), deadline=None)
@given(overrides=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=20), VALUES, max_size=4),
       toml=st.none() | st.text(max_size=200))
def test_config_load_gives_a_config_or_a_config_error(overrides, toml):
    from idletune.config import Config, ConfigError

    path = None
    with tempfile.TemporaryDirectory() as d:
        if toml is not None:
            path = Path(d) / "idletune.toml"
            path.write_text(toml, encoding="utf-8", errors="surrogatepass")
        try:
            cfg = Config.load(path, overrides)
        except ConfigError as e:
            assert str(e) and ":" in str(e)  # "field: what is wrong"
            return
    assert isinstance(cfg, Config)
    json.dumps(cfg.to_dict())  # a loaded config is plain data
