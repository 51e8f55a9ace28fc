"""The web page in a real browser (Debian's Chromium, headless) against a real `idletune serve`.

One server (tiny random model, background training off so rounds start only when a test asks)
is shared by the tests of this file; each test opens its own page. Screenshots of each state go
to test-artifacts/web/.
"""
from __future__ import annotations

import functools
import http.server
import re
import threading
import time

import httpx
import pytest

from conftest import CHROMIUM, CHROMIUM_FLAGS, ROOT, ServerProcess, browser_api

pytestmark = pytest.mark.browser

SHOTS = ROOT / "test-artifacts" / "web"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}

sync_api = browser_api(module_level=True)
expect = sync_api.expect
expect.set_options(timeout=20_000)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    extra = ["--set", 'server.import_allow_hosts=["127.0.0.1"]',
             "--set", "scheduler.enable_background_training=false",
             "--set", "training.max_steps=6",
             "--set", "gate.num_retention_probes=4",
             "--set", "server.default_max_tokens=48",
             "--set", "server.max_prompt_tokens=300"]
    s = ServerProcess(tmp_path_factory.mktemp("web") / "data", tiny_model_dir, extra).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser, server):
    """open_page(viewport) -> a page on the server's web page, live; fails the test on any JS error."""
    contexts, errors = [], []

    def open_(viewport=DESKTOP):
        ctx = browser.new_context(viewport=viewport)
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        expect(page.locator("#conn")).to_have_text("live")
        return page

    yield open_
    for ctx in contexts:
        ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, name: str, full_page: bool = False) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def status(server) -> dict:
    return httpx.get(server.url + "/api/status", timeout=10).json()


def send_chat(page, text: str):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    answer = page.locator(".msg.assistant").last
    expect(answer.locator("footer .version")).to_be_visible()
    return answer


def test_chat_streams_answer_shows_version_and_rates(open_page, server):
    page = open_page()
    # Count how often the answer's text grows while it is still streaming.
    page.evaluate("""() => {
        window.streamedLengths = [];
        new MutationObserver(() => {
            const body = document.querySelector('.msg.assistant.streaming .body');
            if (body) window.streamedLengths.push(body.textContent.length);
        }).observe(document.querySelector('#messages'), {childList: true, subtree: true, characterData: true});
    }""")
    answer = send_chat(page, "What is the capital of Zorbia?")
    lengths = page.evaluate("window.streamedLengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), f"answer was not streamed: {lengths}"
    assert page.locator(".msg.user").last.inner_text() == "What is the capital of Zorbia?"
    expect(answer.locator(".version")).to_have_text(f"v{status(server)['live_version']}")
    expect(page.locator("#stop")).to_be_hidden()

    # What the page shows is what the model wrote: the logged exchange holds the same text.
    text = page.evaluate("chat.turns[1].content")
    assert text.strip()
    queued = httpx.get(server.url + "/api/queue?limit=50", timeout=10).json()["data"]
    logged = [e for e in queued if e["messages"] and e["messages"][0]["content"] == "What is the capital of Zorbia?"]
    assert logged and logged[0]["messages"][-1]["content"].strip() == text.strip()

    before = status(server)["collector"]["feedback"]
    answer.locator("button.rate.up").click()
    expect(answer.locator(".feedback-status")).to_have_text(re.compile("rated good"))
    expect(answer.locator("button.rate.up")).to_have_attribute("aria-pressed", "true")
    assert status(server)["collector"]["feedback"] == before + 1
    shot(page, "01-chat-streamed-answer")

    # A second turn carries the history; "New conversation" clears it.
    send_chat(page, "And its population?")
    assert page.evaluate("chat.turns.length") == 4
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    assert page.evaluate("chat.turns.length") == 0


def test_markdown_is_rendered_and_escaped(open_page):
    page = open_page()
    html = page.evaluate("""() => renderMarkdown(
        '# Title\\n**bold** and *it* and `<b>code</b>`\\n\\n- one\\n- [link](https://example.org/a_b_c)\\n\\n' +
        '```\\n<script>alert(1)</script>\\n```\\n<img src=x onerror="window.pwned=1"> [bad](javascript:alert(1))')""")
    page.evaluate("html => { const d = document.createElement('div'); d.id = 'md'; d.innerHTML = html; "
                  "document.body.append(d); }", html)
    md = page.locator("#md")
    expect(md.locator("strong")).to_have_text("bold")
    expect(md.locator("em")).to_have_text("it")
    expect(md.locator("code").first).to_have_text("<b>code</b>")
    expect(md.locator("li")).to_have_count(2)
    expect(md.locator("a")).to_have_count(1)
    assert md.locator("a").get_attribute("href") == "https://example.org/a_b_c"
    expect(md.locator("pre code")).to_have_text("<script>alert(1)</script>")
    assert md.locator("img, script, b").count() == 0
    assert page.evaluate("window.pwned") is None


def test_correction_raises_high_priority_count(open_page, server):
    page = open_page()
    answer = send_chat(page, "Who wrote the Zorbian anthem?")
    high = int(page.inner_text("#q-high"))
    answer.locator("button.correct").click()
    answer.locator("textarea.edit").fill("The Zorbian anthem was written by **Ada Quill** in 1901.")
    shot(page, "02-correction-editing")
    answer.locator("button[type=submit]").click()
    expect(answer.locator(".feedback-status")).to_have_text("corrected: queued at high priority")
    expect(answer.locator(".body strong")).to_have_text("Ada Quill")
    # through the live status stream: the correction and its two rewordings (collect.correction_examples)
    expect(page.locator("#q-high")).to_have_text(str(high + 3))
    expect(page.locator("#qp-high")).not_to_have_text("0")
    queued = httpx.get(server.url + "/api/queue?limit=50", timeout=10).json()["data"]
    fix = [e for e in queued if e["source"] == "correction"
           and e["messages"][0]["content"] == "Who wrote the Zorbian anthem?"]
    assert fix and fix[0]["priority"] == "high"
    assert fix[0]["messages"][-1]["content"] == "The Zorbian anthem was written by **Ada Quill** in 1901."
    shot(page, "03-correction-queued")


@pytest.fixture
def site(tmp_path):
    """A small website on 127.0.0.1 (the server allows that host for imports)."""
    root = tmp_path / "site"
    root.mkdir()
    para = "The Zorbian cheese festival is held every spring in Zorbville. " * 8
    (root / "festival.html").write_text(
        "<!doctype html><html><head><title>Zorbian cheese festival</title></head><body>"
        "<nav><a href='/'>home</a></nav><main><h1>Zorbian cheese festival</h1>"
        f"<p>{para}</p><p>Visitors taste forty kinds of cheese and vote for the best one.</p></main></body></html>",
        encoding="utf-8")
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_imports_show_progress_and_results(open_page, server, site, tmp_path):
    page = open_page()
    jobs = page.locator("#jobs .job")

    notes = tmp_path / "zorbia-notes.md"
    notes.write_text("# Zorbia\n\nZorbia is a small country. Its capital is Zorbville.\n\n"
                     "## Economy\n\nZorbia exports cheese and wool.\n", encoding="utf-8")
    page.set_input_files("#files", str(notes))
    card = jobs.filter(has_text="zorbia-notes.md")
    expect(card).to_have_attribute("data-status", "done")
    expect(card.locator(".job-result")).to_contain_text(re.compile(r"[1-9]\d* examples? generated: [1-9]\d* new"))
    expect(card.locator(".job-result")).to_contain_text("markdown")

    # Dropping a file works like picking it.
    page.evaluate("""() => {
        const dt = new DataTransfer();
        dt.items.add(new File(['question,answer\\nWhat do Zorbians eat?,Cheese and bread.\\n'], 'faq.csv',
                              {type: 'text/csv'}));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""")
    expect(jobs.filter(has_text="faq.csv")).to_have_attribute("data-status", "done")

    # An import that left something out is done, and lists what (the API sends {what, why} objects).
    page.set_input_files("#files", files=[{"name": "chats.jsonl", "mimeType": "application/json", "buffer": (
        b'{"messages": [{"role": "user", "content": "What do Zorbians drink?"}, '
        b'{"role": "assistant", "content": "Zorbians drink goat milk."}]}\n{"unknown": 1}\n')}])
    card = jobs.filter(has_text="chats.jsonl")
    expect(card).to_have_attribute("data-status", "done")
    expect(card.locator(".job-result")).to_contain_text("1 skipped")
    card.locator(".job-result summary").click()
    expect(card.locator(".job-result li")).to_contain_text("line 2")

    page.fill("#paste", "Zorbian wool is dyed blue with the leaves of the zorb tree.")
    page.fill("#paste-name", "wool note")
    page.click("#text-form button[type=submit]")
    expect(jobs.filter(has_text="wool note")).to_have_attribute("data-status", "done")

    # A URL import runs as a job: the card is polled until it is done.
    page.fill("#url", site + "/festival.html")
    page.click("#url-form button[type=submit]")
    card = jobs.filter(has_text="festival.html")
    expect(card).to_have_attribute("data-status", "done")
    expect(card.locator(".job-result")).to_contain_text("Zorbian cheese festival")
    expect(card.locator(".job-result")).to_contain_text(re.compile(r"[1-9]\d* examples? generated"))

    # Failures show the server's reason.
    page.fill("#url", site + "/missing.html")
    page.click("#url-form button[type=submit]")
    card = jobs.filter(has_text="missing.html")
    expect(card).to_have_attribute("data-status", "failed")
    expect(card.locator(".error")).to_contain_text("404")
    page.set_input_files("#files", files=[{"name": "broken.png", "mimeType": "image/png", "buffer": b"\x89PNG not really"}])
    card = jobs.filter(has_text="broken.png")
    expect(card).to_have_attribute("data-status", "failed")
    expect(card.locator(".error")).to_contain_text("broken.png")

    by_source = status(server)["queue"]["by_source"]
    assert by_source.get("web", 0) >= 1 and by_source.get("dataset", 0) >= 1, by_source  # the page and faq.csv
    page.locator("#jobs").scroll_into_view_if_needed()
    shot(page, "04-imports")


def test_train_now_updates_step_chart_and_rollback(open_page, server):
    page = open_page()
    httpx.post(server.url + "/api/feedback", timeout=10, json={
        "messages": [{"role": "user", "content": "What colour is Zorbian wool?"}],
        "correction": "Zorbian wool is blue."}).raise_for_status()
    expect(page.locator("#qp-high")).not_to_have_text("0")
    before = status(server)
    step_before = page.inner_text('#train-stats [data-k="step"]')
    version_before = before["live_version"]

    page.click("#train-now")
    expect(page.locator("#train-msg")).to_contain_text("Training round started")
    expect(page.locator("#live-version")).to_have_text(f"v{version_before + 1}", timeout=60_000)
    # the message says how the round it started ended
    expect(page.locator("#train-msg")).to_have_text(
        re.compile(rf"Round done: now serving v{version_before + 1} \(\d+ of \d+ examples? learned\)\."))
    after = status(server)
    assert after["training"]["step"] > (before["training"] or {}).get("step", 0)
    expect(page.locator('#train-stats [data-k="step"]')).to_have_text(str(after["training"]["step"]))
    assert page.inner_text('#train-stats [data-k="step"]') != step_before
    expect(page.locator('#train-stats [data-k="loss"]')).not_to_have_text("–")
    expect(page.locator("#gate")).to_contain_text("accepted")
    expect(page.locator("#last-round")).to_contain_text(f"→ v{version_before + 1}")

    # The chart draws every step of the history, not only those the status stream happened to see.
    steps = len(httpx.get(server.url + "/api/metrics?limit=500", timeout=10).json()["data"])
    polyline = page.locator("#loss-chart polyline")
    expect(polyline).to_have_attribute("points", re.compile(r"^(\S+ ){%d}\S+$" % (steps - 1)))
    expect(page.locator("#chart-caption")).to_contain_text(f"last {steps} steps")
    shot(page, "05-trained")

    # Roll back to the version before (listed as the default choice) and see it served.
    expect(page.locator("#snapshots option")).to_have_count(version_before + 2)
    assert page.input_value("#snapshots") == str(version_before)
    page.once("dialog", lambda d: d.accept())
    page.click("#rollback-form button[type=submit]")
    expect(page.locator("#live-version")).to_have_text(f"v{version_before}")
    expect(page.locator("#rollbacks")).to_contain_text(f"v{version_before + 1} → v{version_before}")
    expect(page.locator("#train-msg")).to_have_text(f"Rolled back: now serving v{version_before}.")
    assert status(server)["live_version"] == version_before
    shot(page, "06-rolled-back")


def test_pause_and_resume(open_page, server):
    page = open_page()
    expect(page.locator("#pause")).to_have_text("Pause")
    page.click("#pause")
    expect(page.locator("#sched-state")).to_have_text("paused")
    expect(page.locator("#pause")).to_have_text("Resume")
    assert status(server)["scheduler"]["paused"] is True
    shot(page, "07-paused")
    page.click("#pause")
    expect(page.locator("#sched-state")).to_have_text("idle")
    expect(page.locator("#pause")).to_have_text("Pause")
    assert status(server)["scheduler"]["paused"] is False


def test_errors_and_unreachable_server(open_page):
    page = open_page()
    # The server's own message for a request it refuses.
    send = "zorb " * 400
    page.fill("#prompt", send)
    page.press("#prompt", "Enter")
    expect(page.locator(".msg.error")).to_contain_text("the limit is 300")
    expect(page.locator("#prompt")).to_have_value(send.strip())  # given back to edit
    shot(page, "08-server-error")

    # Cut the page off from the server: the banner shows, chat says why, and it recovers.
    page.route(re.compile(r".*/(api|v1)/.*"), lambda route: route.abort())
    page.reload()
    expect(page.locator("#unreachable")).to_be_visible()
    expect(page.locator("#conn")).to_have_text("unreachable")
    page.fill("#prompt", "hello?")
    page.press("#prompt", "Enter")
    expect(page.locator(".msg.error").last).to_contain_text("unreachable")
    shot(page, "09-unreachable")
    page.unroute(re.compile(r".*/(api|v1)/.*"))
    expect(page.locator("#conn")).to_have_text("live", timeout=15_000)
    expect(page.locator("#unreachable")).to_be_hidden()


def test_phone_width_layout(open_page):
    page = open_page(PHONE)
    overflow = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    expect(page.locator(".tabs")).to_be_visible()
    expect(page.locator("#chat")).to_be_visible()
    expect(page.locator("#training")).to_be_hidden()
    send_chat(page, "Hi from a phone")
    assert page.evaluate(overflow) <= 0
    shot(page, "10-phone-chat")
    for tab in ("training", "import"):
        page.click(f"[data-tab={tab}]")
        expect(page.locator(f"#{tab}")).to_be_visible()
        expect(page.locator("#chat")).to_be_hidden()
        assert page.evaluate(overflow) <= 0, f"{tab} is wider than the phone"
        shot(page, f"11-phone-{tab}", full_page=True)
    page.set_viewport_size(DESKTOP)  # all three panels side by side
    for panel in ("#chat", "#training", "#import"):
        expect(page.locator(panel)).to_be_visible()
    expect(page.locator(".tabs")).to_be_hidden()
    shot(page, "12-desktop")
