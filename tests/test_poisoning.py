"""Training-data poisoning on the real default model: a burst of garbage sent through the chat
and feedback API (random tokens, one phrase repeated) never reaches
the live model: screening rejects it before it trains (training/screen.py), every example is
marked ``rejected`` with its reason, and the live model answers exactly as before."""
from __future__ import annotations

import random

import httpx
import pytest

from conftest import ServerProcess

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "What do bees make?"]


@pytest.mark.slow  # the real model on CPU
def test_garbage_burst_is_rejected_before_it_trains(default_model_dir, probed_data_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    rng = random.Random(0)

    def random_tokens(n: int) -> str:
        return tok.decode([rng.randrange(len(tok)) for _ in range(n)], skip_special_tokens=True).strip()

    # the default 24 retention probes (12 measure the noise check's reference), as the other
    # real-model tests: their recording is shared (probed_data_dir)
    s = ServerProcess(probed_data_dir, default_model_dir,
                      ["--set", "scheduler.enable_background_training=false", "--set", "gate.heldout_examples=0",
                       "--set", "training.max_steps=24"]).start()
    try:
        def answers() -> list[tuple[str, str]]:
            out = []
            for q in QUESTIONS:
                r = httpx.post(f"{s.url}/v1/chat/completions", timeout=120,
                               json={"messages": [{"role": "user", "content": q}], "max_tokens": 20})
                out.append((r.json()["choices"][0]["message"]["content"], r.json()["system_fingerprint"]))
            return out

        before = answers()
        # Those answers are queued as chat pairs; a thumbs-down withdraws them, so that only the
        # garbage below is left for training.
        for e in httpx.get(f"{s.url}/api/queue?limit=50").json()["data"]:
            if e["metadata"].get("generation_id"):
                httpx.post(f"{s.url}/api/feedback", json={"response_id": e["metadata"]["generation_id"], "rating": -1})
        garbage_ids = []
        for i in range(8):  # corrections whose "right answer" is token soup
            r = httpx.post(f"{s.url}/api/feedback", json={
                "messages": [{"role": "user", "content": f"Tell me something about topic {i}."}],
                "correction": random_tokens(40)})
            garbage_ids.append(r.json()["example_id"])
        for i in range(4):  # one phrase repeated
            r = httpx.post(f"{s.url}/api/feedback", json={
                "messages": [{"role": "user", "content": f"How should I answer message {i}?"}],
                "correction": "BUY CHEAP WATCHES NOW " * 25})
            garbage_ids.append(r.json()["example_id"])
        for _ in range(2):  # garbage chat turns: a user "statement" of random tokens is queued as text
            httpx.post(f"{s.url}/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": random_tokens(30)}], "max_tokens": 4})

        for _ in range(6):  # one round per call; until nothing is pending
            st = httpx.post(f"{s.url}/api/training/force?wait=true", timeout=600).json()["status"]
            if st["queue"]["pending"] == 0:
                break
        rows = {e["id"]: e for e in httpx.get(f"{s.url}/api/queue?limit=200").json()["data"]}
        left = [(e["source"], e["status"], e["reason"], e["text"] or e["messages"][-1]["content"][:80])
                for e in rows.values() if e["status"] != "rejected"]
        assert st["scheduler"]["screened_out"] >= len(garbage_ids) + 2, (st["scheduler"], left)
        for i in garbage_ids:
            assert rows[i]["status"] == "rejected", rows[i]
            assert rows[i]["reason"].startswith(("looks like noise", "repetitive text")), rows[i]
        statements = [e for e in rows.values() if e["source"] == "statement"]  # the random-token chat turns
        assert len(statements) == 2 and all(e["status"] == "rejected" and "noise" in e["reason"] for e in statements)
        assert st["live_version"] == 0 and st["scheduler"]["training_count"] == 0  # nothing was left to train
        assert answers() == before  # the live weights never saw any of it
    finally:
        s.stop()
