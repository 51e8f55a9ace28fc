"""Access and limits through a real `idletune serve`: API key, public bind refusal, Origin/CORS,
chunked bodies over the limit, a full queue (507), and the web page with a key."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from conftest import CHROMIUM, CHROMIUM_FLAGS, ServerProcess, browser_api, free_port

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


class KeyedServer(ServerProcess):
    """A server started with --api-key: its readiness probe sends the key."""

    def start(self, timeout: float = 180) -> "KeyedServer":
        import time

        self.extra = ["--api-key", KEY, *self.extra]
        real_get = httpx.get
        httpx.get = lambda url, **kw: real_get(url, **{**kw, "headers": AUTH})  # only for the probe loop
        try:
            super().start(timeout)
        finally:
            httpx.get = real_get
        return self


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_model_dir):
    s = KeyedServer(tmp_path_factory.mktemp("access") / "data", tiny_model_dir,
                    ["--set", "scheduler.enable_background_training=false",
                       "--set", "server.max_body_bytes=4096",
                       "--set", 'server.cors_origins=["http://allowed.example"]',
                       "--set", 'server.allowed_hosts=["proxy.example"]'])
    s.start()
    yield s
    s.stop()


def test_public_bind_without_key_is_refused_before_loading(tmp_path, tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "idletune.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port()),
                        "--data-dir", str(tmp_path / "d"), "--model", str(tiny_model_dir)],
                       capture_output=True, text=True, timeout=60, env=_env_without_key())
    assert r.returncode == 2
    assert "no API key is set" in r.stderr and "--insecure-no-key" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "d" / "queue.db").exists()  # refused before anything was opened


def test_insecure_opt_out_is_logged_loudly(tmp_path, tiny_model_dir):
    s = ServerProcess(tmp_path / "d", tiny_model_dir, ["--host", "0.0.0.0", "--insecure-no-key",
                                                       "--set", "scheduler.enable_background_training=false"])
    try:
        s.start()
        assert httpx.get(f"{s.url}/api/status").status_code == 200
    finally:
        s.stop()
    assert "SERVING WITHOUT AN API KEY ON 0.0.0.0" in s.log_path.read_text()


@pytest.mark.parametrize("path", ["/api/status", "/v1/models", "/api/queue", "/api/events", "/openapi.json",
                                  "/api/snapshots", "/api/import", "/docs"])
def test_every_endpoint_needs_the_key(keyed, path):
    r = httpx.get(keyed.url + path)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.get(keyed.url + path, headers={"Authorization": "Bearer wrong-key-123456"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "the API key is not valid"
    assert "wrong-key" not in r.text


def test_posts_need_the_key_and_change_nothing_without_it(keyed):
    before = httpx.get(f"{keyed.url}/api/status", headers=AUTH).json()["queue"]["total"]
    for path, body in [("/api/feedback", {"messages": [{"role": "user", "content": "Who?"}], "correction": "Me."}),
                       ("/api/import/text", {"text": "Some text to learn about lighthouses and their keepers."}),
                       ("/api/training/pause", {}), ("/api/snapshots/rollback", {})]:
        assert httpx.post(keyed.url + path, json=body).status_code == 401, path
    assert httpx.get(f"{keyed.url}/api/status", headers=AUTH).json()["queue"]["total"] == before
    assert httpx.get(f"{keyed.url}/api/status", headers=AUTH).json()["scheduler"]["paused"] is False


def test_with_the_key_openai_client_stream_and_events_work(keyed):
    from openai import AuthenticationError, OpenAI

    client = OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY)
    r = client.chat.completions.create(model="x", max_tokens=4, messages=[{"role": "user", "content": "Hi there"}])
    assert r.choices[0].message.content
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{keyed.url}/v1", api_key="not-the-key", max_retries=0).models.list()
    with httpx.stream("GET", f"{keyed.url}/api/events?interval=0.2", headers=AUTH, timeout=30) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: "):
                assert '"live_version"' in line
                break
    schema = httpx.get(f"{keyed.url}/openapi.json", headers=AUTH).json()
    assert schema["security"] == [{"bearer": []}]


def test_web_page_files_stay_public(keyed):
    assert httpx.get(keyed.url + "/").status_code == 200
    assert "authHeaders" in httpx.get(keyed.url + "/static/app.js").text


def test_key_never_logged(keyed):
    httpx.get(f"{keyed.url}/api/status", headers=AUTH)
    httpx.get(f"{keyed.url}/api/status", headers={"Authorization": "Bearer wrong-key-123456"})
    log = keyed.log_path.read_text()
    assert KEY not in log and "wrong-key" not in log


def test_cross_origin_requests_refused_unless_configured(keyed):
    r = httpx.post(f"{keyed.url}/api/training/pause", headers={**AUTH, "Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]["message"]
    same = httpx.get(f"{keyed.url}/api/status", headers={**AUTH, "Origin": keyed.url})
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers
    ok = httpx.get(f"{keyed.url}/api/status", headers={**AUTH, "Origin": "http://allowed.example"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://allowed.example"
    pre = httpx.options(f"{keyed.url}/v1/chat/completions",
                        headers={"Origin": "http://allowed.example", "Access-Control-Request-Method": "POST",
                                 "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and "authorization" in pre.headers["access-control-allow-headers"].lower()


def test_chunked_body_over_the_limit_is_413(keyed):
    def body():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(64):
            yield b"x" * 1024
        yield b'"}]}'

    r = httpx.post(f"{keyed.url}/v1/chat/completions", content=body(), timeout=30,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "4096" in r.json()["error"]["message"]
    r = httpx.post(f"{keyed.url}/api/import/text", content=body(), headers=AUTH, timeout=30)
    assert r.status_code == 413
    # a small chunked body still works
    small = iter([b'{"messages": [{"role": "user", "content": "hi"}], ', b'"max_tokens": 2}'])
    r = httpx.post(f"{keyed.url}/v1/chat/completions", content=small, timeout=60,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text


def test_full_queue_refuses_with_507_and_keeps_everything(tmp_path, tiny_model_dir):
    s = ServerProcess(tmp_path / "d", tiny_model_dir, ["--set", "queue.max_examples=6",
                                                      "--set", "scheduler.enable_background_training=false"])
    s.start()
    try:
        ids = []  # a correction may store more than one example (rewordings): fill up until refused
        for i in range(7):
            r = httpx.post(f"{s.url}/api/feedback", json={"messages": [{"role": "user", "content": f"Question {i}?"}],
                                                          "correction": f"Answer {i}."})
            if r.status_code == 507:
                break
            assert r.status_code == 200, r.text
            ids.append(r.json()["example_id"])
        assert ids and r.status_code == 507, "the queue never filled up"
        stored = httpx.get(f"{s.url}/api/queue?limit=50").json()
        assert stored["stats"]["total"] <= 6 and set(ids) <= {e["id"] for e in stored["data"]}
        refused = [
            httpx.post(f"{s.url}/api/feedback", json={"messages": [{"role": "user", "content": "Question 9?"}],
                                                      "correction": "Answer 9."}),
            httpx.post(f"{s.url}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}),
            httpx.post(f"{s.url}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "stream": True}),
            httpx.post(f"{s.url}/api/import/text", json={"text": "A brand new paragraph about the river Quill."}),
        ]
        for r in refused:
            assert r.status_code == 507, r.text
            err = r.json()["error"]
            assert err["code"] == "queue_full" and "queue.max_examples" in err["message"]
        st = httpx.get(f"{s.url}/api/queue?limit=50").json()  # nothing refused was stored, nothing dropped
        assert st["stats"]["total"] == stored["stats"]["total"] and st["data"] == stored["data"]
        # re-sending what is already stored is not refused (dedup, nothing new to store)
        again = httpx.post(f"{s.url}/api/feedback", json={"messages": [{"role": "user", "content": "Question 0?"}],
                                                          "correction": "Answer 0."})
        assert again.status_code == 200 and again.json()["example_id"] == ids[0]
    finally:
        s.stop()


def _env_without_key() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "IDLETUNE_API_KEY"}


@pytest.mark.browser
def test_web_page_works_with_a_key(keyed):
    sync_api = browser_api()
    expect = sync_api.expect
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_context().new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(keyed.url + "/")  # no key yet: the key form asks for it
            expect(page.locator("#key-form")).to_be_visible(timeout=20_000)
            page.fill("#api-key", KEY)
            page.click("#key-form button")
            expect(page.locator("#conn")).to_have_text("live", timeout=20_000)
            expect(page.locator("#key-form")).to_be_hidden()
            page.fill("#prompt", "Hello with a key")
            page.keyboard.press("Enter")
            expect(page.locator(".msg.assistant footer").first).to_be_visible(timeout=30_000)
            # /?key= is taken once, kept, and removed from the address bar
            page2 = browser.new_context().new_page()
            page2.goto(f"{keyed.url}/?key={KEY}")
            expect(page2.locator("#conn")).to_have_text("live", timeout=20_000)
            assert "key=" not in page2.url
            assert not errors, errors
        finally:
            browser.close()


def test_dns_rebinding_requests_are_refused_by_host(keyed):
    """A page at evil.example re-pointed at 127.0.0.1 is same-origin with itself; its Host header
    gives it away. Loopback names and configured names pass."""
    port = keyed.url.rsplit(":", 1)[1]
    evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    for path in ("/api/status", "/"):
        r = httpx.get(keyed.url + path, headers={**AUTH, **evil})
        assert r.status_code == 421, (path, r.status_code)
        assert "server.allowed_hosts" in r.json()["error"]["message"]
    assert httpx.post(f"{keyed.url}/api/training/pause", headers={**AUTH, **evil}).status_code == 421
    assert httpx.get(f"{keyed.url}/api/status", headers=AUTH).json()["scheduler"]["paused"] is False
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "proxy.example", f"PROXY.example:{port}"):
        assert httpx.get(f"{keyed.url}/api/status", headers={**AUTH, "Host": host}).status_code == 200, host
