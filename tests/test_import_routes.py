"""The import routes mounted on a bare FastAPI app, over a real queue and real importers."""
from __future__ import annotations

import io
import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from idletune.importers import ImportersConfig, ImportJobs, WebImportConfig
from idletune.queue import TrainingQueue
from idletune.server.routes_import import make_import_router

ARTICLE = ("<html><head><title>Zorblax</title></head><body><nav><a href='/a'>Menu</a></nav><article>"
           "<h1>The Zorblax</h1><p>" + "The zorblax hums in groups of seven during the winter solstice. " * 8
           + "</p></article></body></html>").encode()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body, status = {"/": (ARTICLE, 200), "/robots.txt": (b"User-agent: *\nDisallow:\n", 200)}.get(
            self.path, (b"gone", 404))
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if self.path == "/robots.txt" else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def env(tmp_path):
    queue = TrainingQueue(tmp_path / "queue.db")
    jobs = ImportJobs(max_workers=2)
    config = ImportersConfig(web=WebImportConfig(allow_hosts=["127.0.0.1"]), inline_max_bytes=10_000,
                             max_upload_bytes=200_000)
    app = FastAPI()
    app.include_router(make_import_router(queue, jobs, config))
    with TestClient(app) as client:
        yield client, queue, jobs
    jobs.shutdown()
    queue.close()


def poll(client, job_id: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/import/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def assert_error(resp, status: int, code: str, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if param:
        assert err["param"] == param
    return err


def test_url_import_job(env, site):
    client, queue, _ = env
    resp = client.post("/api/import/url", json={"url": site + "/", "depth": 0})
    assert resp.status_code == 202 and resp.json()["status"] in ("queued", "running", "done")
    job = poll(client, resp.json()["job_id"])
    assert job["status"] == "done", job
    assert job["result"]["examples_added"] >= 1 and job["result"]["metadata"]["title"]
    assert job["progress"]["done"] == job["progress"]["total"] == 1
    assert "winter solstice" in queue.recent(1)[0].text
    listed = client.get("/api/import").json()["data"]
    assert listed[0]["job_id"] == job["job_id"]


def test_url_failures(env, site):
    client, queue, _ = env
    assert_error(client.post("/api/import/url", json={"url": "http://10.0.0.1/"}), 400, "blocked_address", "url")
    assert_error(client.post("/api/import/url", json={"url": "ftp://x"}), 400, "invalid_url", "url")
    assert_error(client.post("/api/import/url", json={}), 400, "invalid_url", "url")
    assert_error(client.post("/api/import/url", json={"url": site, "depth": 50}), 400, "invalid_request", "depth")
    assert_error(client.post("/api/import/url", content=b"{nope", headers={"content-type": "application/json"}),
                 400, "invalid_json")
    # A 404 is found by the job, not up front: the job fails with the reason.
    job = poll(client, client.post("/api/import/url", json={"url": site + "/missing"}).json()["job_id"])
    assert job["status"] == "failed" and job["error"]["code"] == "http_404" and "404" in job["error"]["message"]
    assert queue.size() == 0


def test_file_upload_inline(env):
    client, queue, _ = env
    lines = "\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                               {"role": "assistant", "content": f"a{i}"}]}) for i in range(3))
    resp = client.post("/api/import/file", files={"file": ("chats.jsonl", lines.encode(), "application/jsonl")})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "done" and body["result"]["examples_added"] == 3
    assert body["result"]["metadata"]["dataset"] == "openai"
    again = client.post("/api/import/file", files={"file": ("chats.jsonl", lines.encode())}).json()
    assert again["result"]["examples_added"] == 0 and again["result"]["duplicates"] == 3
    assert queue.size() == 3


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract is not installed")
def test_image_upload_is_ocrd(env):
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (640, 120), "white")
    ImageDraw.Draw(img).text((20, 30), "Moss is tasty", fill="black", font=ImageFont.load_default(size=40))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    client, queue, _ = env
    resp = client.post("/api/import/file", files={"file": ("moss.png", buf.getvalue(), "image/png")})
    assert resp.status_code == 200, resp.text
    assert resp.json()["result"]["importer"] == "image"
    assert "moss is tasty" in " ".join(queue.recent(1)[0].messages[-1]["content"].split()).lower()


def test_large_upload_runs_as_job(env):
    client, queue, _ = env
    text = "\n\n".join(f"Paragraph {i} says the zorblax is blue and hums." for i in range(600)).encode()
    assert 10_000 < len(text) < 200_000
    resp = client.post("/api/import/file", files={"file": ("long.txt", text, "text/plain")})
    assert resp.status_code == 202
    job = poll(client, resp.json()["job_id"])
    assert job["status"] == "done" and job["result"]["examples_added"] > 1
    assert job["progress"]["done"] == job["progress"]["total"] > 0


def test_file_errors(env):
    client, queue, _ = env
    assert_error(client.post("/api/import/file", files={"file": ("x.pdf", b"not a pdf")}), 400, "corrupt_file")
    resp = client.post("/api/import/file", files={"file": ("bad.txt", b"caf\xe9")})
    err = assert_error(resp, 400, "invalid_encoding")
    assert "bad.txt" in err["message"] and resp.json()["job_id"]
    assert_error(client.post("/api/import/file", files={"file": ("big.txt", b"x" * 300_000)}), 413, "too_large", "file")
    assert_error(client.post("/api/import/file", files={"other": ("x.txt", b"hi")}), 400, "invalid_request", "file")
    assert_error(client.post("/api/import/file", json={"file": "x"}), 400, "invalid_request", "file")
    assert_error(client.post("/api/import/file", files={"file": ("f.bin", b"\x7fELF\x02\x01")}), 415,
                 "unsupported_format")
    assert queue.size() == 0


def test_text_import(env):
    client, queue, _ = env
    resp = client.post("/api/import/text", json={"text": "# Zorblax\n\nZorblaxes are blue.", "name": "note"})
    assert resp.status_code == 200 and resp.json()["result"]["metadata"]["format"] == "markdown"
    assert queue.recent(1)[0].metadata["file"] == "note"
    assert_error(client.post("/api/import/text", json={"text": "   "}), 400, "empty", "text")
    assert_error(client.post("/api/import/text", json={"text": 5}), 400, "invalid_request", "text")
    assert_error(client.post("/api/import/text", json={"text": "x", "format": "rtf"}), 415, "unsupported_format",
                 "format")
    assert_error(client.post("/api/import/text", json={"text": "{oops", "format": "json"}), 400, "corrupt_file")
    assert_error(client.post("/api/import/text", json=[1, 2]), 400, "invalid_json")


def test_unknown_job(env):
    client, _, _ = env
    assert_error(client.get("/api/import/nope"), 404, "job_not_found", "job_id")
