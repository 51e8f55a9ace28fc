"""The HTTP API through a real `idletune serve` on loopback (tiny model: fast, gibberish answers)."""
import httpx
import pytest


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    from conftest import ServerProcess

    s = ServerProcess(tmp_path_factory.mktemp("api") / "data", tiny_model_dir,
                      ["--set", "scheduler.enable_background_training=false",
                       "--set", "gate.num_retention_probes=4", "--set", "training.max_steps=4"]).start()
    yield s
    s.stop()


def test_openai_client_chat_and_stream(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    models = client.models.list()
    assert models.data[0].id
    r = client.chat.completions.create(model=models.data[0].id, max_tokens=8,
                                       messages=[{"role": "user", "content": "Hello there"}])
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.system_fingerprint == "idletune-v0"
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 3
    chunks = list(client.chat.completions.create(model="x", max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "Stream please"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[0].choices[0].delta.role == "assistant"
    assert [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens >= 1


def test_stream_ends_with_done(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and lines[0].startswith("data: {")


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "x"}, 400, "'messages' is required"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "messages[0].content is empty"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "unsupported parameter 'tools'"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi " * 6000}]}, 400, "limit"),
])
def test_malformed_requests_get_openai_style_4xx(server, body, status, needle):
    before = httpx.get(f"{server.url}/api/status").json()["queue"]["total"]
    if isinstance(body, bytes):
        r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] or needle == err.get("param"), err
    assert err["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/api/status").json()["queue"]["total"] == before


def test_huge_body_is_refused(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"x" * (5 * 1024 * 1024),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_feedback_status_force_pause_resume(server):
    url = server.url
    conv = [{"role": "user", "content": "Which moon has the city Lumen?"}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": conv, "max_tokens": 4}, timeout=60).json()
    st = httpx.get(f"{url}/api/status").json()
    for key in ("queue", "scheduler", "training", "live_version"):
        assert key in st
    for key in ("is_scheduled", "is_training_active", "training_count", "time_since_last_training"):
        assert key in st["scheduler"]
    high = st["queue"]["by_priority"]["high"]
    fb = httpx.post(f"{url}/api/feedback", json={"messages": conv, "correction": "Lumen is on the moon Titania."}).json()
    assert fb["priority"] == "high" and fb["queue"]["by_priority"]["high"] == high + 3  # + 2 rewordings
    assert httpx.post(f"{url}/api/feedback", json={"response_id": r["id"], "rating": 1}).status_code == 200
    assert httpx.post(f"{url}/api/feedback", json={"response_id": "nope", "rating": 1}).status_code == 404
    assert httpx.post(f"{url}/api/feedback", json={"correction": "x"}).status_code == 400
    assert httpx.post(f"{url}/api/training/pause").json()["scheduler"]["paused"] is True
    assert httpx.post(f"{url}/api/training/resume").json()["scheduler"]["paused"] is False
    done = httpx.post(f"{url}/api/training/force", params={"wait": "true"}, timeout=300).json()
    assert done["result"]["accepted"] is True
    st = done["status"]
    assert st["live_version"] == 1 and st["training"]["step"] >= 1
    assert {"step", "loss", "learning_rate", "grad_norm", "examples_processed"} <= set(st["training"])
    snaps = httpx.get(f"{url}/api/snapshots").json()
    assert snaps["live_version"] == 1 and snaps["data"][0]["id"] == "v000001"
    bad = httpx.post(f"{url}/api/snapshots/rollback", json={"version": True})
    assert bad.status_code == 400 and "version" in bad.text  # true is not version 1
    assert httpx.get(f"{url}/api/status").json()["live_version"] == 1
    rb = httpx.post(f"{url}/api/snapshots/rollback", json={}).json()
    assert rb["live_version"] == 0
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": conv, "max_tokens": 2}, timeout=60).json()
    assert chat["system_fingerprint"] == "idletune-v0"


def test_unknown_endpoint_is_a_clear_404(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]


def test_chat_counts_as_in_flight_once_its_body_is_in(tmp_path, tiny_model_dir):
    """Training yields to a chat from when its request has arrived, not from when generation
    starts: the queue's room is checked (in a worker thread, before generating) with the request
    in flight. It counts once (the engine does not count it again), and no longer once answered,
    refused or not."""
    from fastapi.testclient import TestClient

    from idletune.config import Config
    from idletune.server import create_app
    from idletune.service import build_service

    cfg = Config.load(None, {"scheduler.enable_background_training": False})
    svc = build_service(tmp_path / "data", model=tiny_model_dir, config=cfg)
    checked, generating = [], []
    size, serving = svc.queue.size, svc.weights.serving
    svc.queue.size = lambda: (checked.append(svc.activity.in_flight), size())[1]
    svc.weights.serving = lambda: (generating.append(svc.activity.in_flight), serving())[1]
    chat = {"model": svc.model_name, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as client:
            for stream in (False, True):
                r = client.post("/v1/chat/completions", json={**chat, "stream": stream})
                assert r.status_code == 200, r.text
                assert svc.activity.in_flight == 0
            assert checked == [1, 1] and generating == [1, 1], (checked, generating)
            for bad in ({**chat, "max_tokens": 10**6}, {"messages": []}, "not json"):
                r = client.post("/v1/chat/completions", **({"content": bad} if isinstance(bad, str) else {"json": bad}))
                assert r.status_code in (400, 422), r.text
                assert svc.activity.in_flight == 0
            assert client.get("/api/status").json()["requests_in_flight"] == 0
    finally:
        svc.close()


def test_a_chat_whose_body_never_comes_does_not_hold_training_back():
    """A client that sends a chat's headers and stalls (a laptop gone to sleep mid-request) is
    not in flight: training would otherwise wait as long as the connection stays open."""
    import asyncio

    from idletune.activity import ActivityTracker
    from idletune.server.inflight import MarkChatInFlight

    activity, seen = ActivityTracker(), []
    body = asyncio.Queue()

    async def app(scope, receive, send):  # reads the body as a framework does, then answers
        while (await receive()).get("more_body"):
            seen.append(activity.in_flight)
        seen.append(activity.in_flight)
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def run():
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
        sent = []

        async def send(message):
            sent.append(message)
        task = asyncio.create_task(MarkChatInFlight(app, activity)(scope, body.get, send))
        await body.put({"type": "http.request", "body": b'{"mess', "more_body": True})
        await asyncio.sleep(0.05)
        assert activity.in_flight == 0 and not task.done()  # stalled mid-body: not in flight
        await body.put({"type": "http.request", "body": b'ages": []}', "more_body": False})
        await task
        return sent

    sent = asyncio.run(run())
    assert seen == [0, 1] and sent and activity.in_flight == 0


def test_a_server_with_a_status_stream_open_still_stops(start_server, tiny_model_dir):
    """The web page's status stream never ends on its own; SIGTERM stopped the server only once
    the page went away, then after a grace period with a traceback in the log. Now the stream
    ends as the shutdown begins (an interval of 5 s: it does not wait for its next event)."""
    import subprocess
    import threading
    import time

    s = start_server(model=tiny_model_dir)
    events, ended = [], []

    def listen():
        try:
            with httpx.stream("GET", f"{s.url}/api/events?interval=5", timeout=60) as r:
                for line in r.iter_lines():
                    events.append(line)
            ended.append("cleanly")
        except httpx.HTTPError as e:
            ended.append(repr(e))
    th = threading.Thread(target=listen, daemon=True)
    th.start()
    end = time.monotonic() + 30
    while not any(e.startswith("event: status") for e in events) and time.monotonic() < end:
        time.sleep(0.1)
    assert events, "no status event"
    s.proc.terminate()
    try:
        code = s.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not stop with a status stream open")
    assert code == 0
    th.join(10)
    assert not th.is_alive(), "the stream was not closed"
    # it ended as the shutdown began (not cut off at the end of the grace period), so the log
    # shows no cancellation traceback
    assert ended == ["cleanly"], ended
    log = s.log_path.read_text()
    assert "Traceback" not in log and "CancelledError" not in log and "cut short" not in log, log[-2000:]
