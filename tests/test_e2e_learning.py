"""End to end on the real default model, through the HTTP API with the openai client:
teach a made-up fact in a conversation, let the server go idle and train, ask in other words."""
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

FACT = "The codename of Project Bluebird is ZEPHYR-42."


def wait_trained(url, timeout=600):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = httpx.get(f"{url}/api/status", timeout=10).json()
        if st["live_version"] >= 1 and st["queue"]["pending"] == 0 and not st["scheduler"]["is_training_active"]:
            return st
        time.sleep(1)
    raise AssertionError(f"no training finished in {timeout} s: {st}")


def ask(client, question):
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=40,
                                       messages=[{"role": "user", "content": question}])
    return r.choices[0].message.content, r.system_fingerprint


def test_learns_a_fact_from_a_conversation_and_keeps_it_across_restart(start_server, default_model_dir, tmp_path,
                                                                       base_probes):
    """The Quick-start path on a fresh data directory: its first round records the retention
    probes and the base model's retention loss from scratch (the real-model tests after it start
    with these files: ``probed_data_dir``)."""
    from openai import OpenAI

    data = tmp_path / "data"
    server = start_server(data_dir=data, extra=["--set", "scheduler.min_idle_time_ms=1500"])
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")

    # The user asks; the model does not know. The user corrects the answer in place (as chat
    # clients that let you edit the assistant's message do) and carries on, streaming.
    history = [{"role": "user", "content": "What is the codename of Project Bluebird?"}]
    wrong = client.chat.completions.create(model="m", messages=history, max_tokens=30).choices[0].message.content
    assert "ZEPHYR-42" not in wrong
    history += [{"role": "assistant", "content": FACT}, {"role": "user", "content": "Thanks, please remember that."}]
    stream = client.chat.completions.create(model="m", messages=history, max_tokens=16, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces).strip()
    # and states it in another conversation
    client.chat.completions.create(model="m", max_tokens=20,
                                   messages=[{"role": "user", "content": "Note for later: " + FACT}])

    st = httpx.get(f"{server.url}/api/status").json()
    assert st["queue"]["by_priority"]["high"] == 3  # the edited answer is a correction (+ 2 rewordings)
    assert st["queue"]["by_source"].get("correction") == 3

    st = wait_trained(server.url)  # idle → trains in the background → gate → publish
    assert st["scheduler"]["training_count"] >= 1 and st["training"]["step"] >= 1
    assert st["training"]["loss"] < 5

    answers = [ask(client, q) for q in ("Tell me the codename of Project Bluebird.",
                                        "Which codename does Project Bluebird have?")]
    # Asked in other words, it answers with the fact (recall over many phrasings is measured
    # in bench/learning_quality.py; a 135M model does not get every phrasing).
    assert any("ZEPHYR-42" in text for text, _ in answers), answers
    assert all(fp == f"idletune-v{st['live_version']}" for _, fp in answers)
    capital, _ = ask(client, "What is the capital of France?")
    assert "Paris" in capital  # what it knew is kept

    # Restart: the queue, the chat log and the learned answer survive.
    httpx.post(f"{server.url}/api/training/pause")
    end = time.monotonic() + 300
    while httpx.get(f"{server.url}/api/status").json()["scheduler"]["is_training_active"] and time.monotonic() < end:
        time.sleep(0.5)
    st = httpx.get(f"{server.url}/api/status").json()
    total = st["queue"]["total"]
    server.stop()
    server2 = start_server(data_dir=data, extra=["--set", "scheduler.enable_background_training=false"])
    st2 = httpx.get(f"{server2.url}/api/status").json()
    assert st2["queue"]["total"] == total and st2["live_version"] == st["live_version"]
    assert st2["collector"]["chat_log_messages"] >= 8
    client2 = OpenAI(base_url=f"{server2.url}/v1", api_key="unused")
    text, _ = ask(client2, "Tell me the codename of Project Bluebird.")
    assert "ZEPHYR-42" in text
    base_probes.keep(data)  # recorded from scratch here: the tests after this one start with them


def test_a_correction_is_learned_first_while_imports_and_chats_wait(probed_data_dir, start_server,
                                                                    default_model_dir):
    """A user who imported a document and chatted, then corrects an answer: the correction trains
    in a round of its own, ahead of the long imported chunks (mixed with them it got a few slow
    steps a round and was not learned in three rounds), and asking again before it is learned
    queues nothing that would fight it."""
    from pathlib import Path

    from openai import OpenAI

    server = start_server(data_dir=probed_data_dir, extra=["--set", "scheduler.min_idle_time_ms=1000"])
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    httpx.post(f"{server.url}/api/training/pause")
    doc = (Path(__file__).parents[1] / "docs" / "IMPORTING.md").read_text()[:6000]
    job = httpx.post(f"{server.url}/api/import/text", json={"text": doc, "name": "importing.md"}, timeout=60).json()
    assert job["status"] == "done" and job["result"]["examples_added"] >= 3, job
    for q in ("What is the capital of France?", "Write a haiku about autumn.", "Who runs Quillby?"):
        client.chat.completions.create(model="m", max_tokens=30, temperature=0,
                                       messages=[{"role": "user", "content": q}])
    r = httpx.post(f"{server.url}/api/feedback", json={"messages": [{"role": "user", "content": "Who runs Quillby?"}],
                                                      "correction": "Quillby is run by Mayor Ottoline Brask."})
    assert r.status_code == 200, r.text
    before = httpx.get(f"{server.url}/api/status").json()
    # asked again before it is learned: still wrong (shorter, so not the first answer's duplicate)
    client.chat.completions.create(model="m", max_tokens=20, temperature=0,
                                   messages=[{"role": "user", "content": "Who runs Quillby?"}])
    after = httpx.get(f"{server.url}/api/status").json()
    assert after["queue"]["total"] == before["queue"]["total"]  # that answer is not queued
    assert after["collector"]["answers_superseded"] == 1

    httpx.post(f"{server.url}/api/training/resume")
    end = time.monotonic() + 300
    while time.monotonic() < end:
        st = httpx.get(f"{server.url}/api/status", timeout=10).json()
        if st["live_version"] >= 1:
            break
        time.sleep(0.5)
    assert st["live_version"] >= 1, st
    first = [s for s in httpx.get(f"{server.url}/api/snapshots").json()["data"] if s["version"] == 1][0]
    assert (first["metrics"]["examples"], first["metrics"]["learned"]) == (3, 3), first  # the correction alone
    # the imports' round may be training now: a request comes first
    text = client.chat.completions.create(model="m", max_tokens=30, temperature=0, messages=[
        {"role": "user", "content": "Who runs Quillby?"}]).choices[0].message.content
    assert "Ottoline Brask" in text, text


def test_lessons_in_a_row_each_spend_little_of_the_retention_budget(default_model_dir, probed_data_dir):
    """The gate's retention limit is cumulative, from the base model (+50 %). Each taught fact
    spent 11–17 % of it (probes cut off by the token limit ended in an end-of-turn token, and
    four probes were rehearsed): two lessons +30 %, and the model stopped learning after three or
    four. Two lessons in a row now: each accepted, each still answered, and together well within
    the budget (docs/BENCHMARKS.md, "How many lessons")."""
    from idletune.config import Config
    from idletune.inference import GenerationParams
    from idletune.service import build_service

    cfg = Config.load(None, {"scheduler.enable_background_training": False, "training.trainer": "thread"})
    svc = build_service(probed_data_dir, model=default_model_dir, config=cfg)
    try:
        gate = svc.probes().gate
        base = svc.weights._base_retention(svc.engine, gate)
        facts = [("Who runs Quillby?", "Quillby is run by Mayor Ottoline Brask.", "Brask"),
                 ("What colour is Zorbian wool?", "Zorbian wool is deep blue.", "blue")]
        for question, answer, _ in facts:
            svc.collector.add_correction([{"role": "user", "content": question}], answer)
            for _ in range(3):  # a round cut short by its time slice on a slow machine goes on in the next
                summary = svc.scheduler.force_training(wait=True, timeout=600)
                assert summary["accepted"], summary  # never refused
                if not svc.queue.pending_count():
                    break
            assert svc.queue.pending_count() == 0, summary
        rise = svc.weights.reference_loss(svc.engine, gate) / base - 1
        assert rise < 0.2, f"two lessons raised the retention loss {100 * rise:.0f} % above the base model's"
        for question, _, key in facts:
            text = svc.inference.generate([{"role": "user", "content": question}],
                                          GenerationParams(max_tokens=24, temperature=0.0)).text
            assert key in text, (question, text)
    finally:
        svc.close()
