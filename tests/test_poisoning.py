"""Training-data poisoning on the real default model: a burst of garbage sent through the chat
and feedback API (random tokens, one phrase repeated) is trained on, rejected by the quality
gate, marked ``rejected`` with the gate's reason, and the live model answers exactly as before."""
from __future__ import annotations

import random

import httpx
import pytest

from conftest import ServerProcess

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "What do bees make?"]


@pytest.mark.slow  # the real model on CPU: about 3 minutes
@pytest.mark.xfail(strict=True, reason="finding (issue 7): the gate's retention/held-out rule accepts this burst "
                   "(13 steps, retention loss within 50 %); see docs/RELIABILITY.md. strict: passes once the gate "
                   "rejects it, so this marker must then be removed")
def test_garbage_burst_is_rejected_by_the_gate(tmp_path, default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    rng = random.Random(0)

    def random_tokens(n: int) -> str:
        return tok.decode([rng.randrange(len(tok)) for _ in range(n)], skip_special_tokens=True).strip()

    s = ServerProcess(tmp_path / "data", default_model_dir,
                      ["--set", "scheduler.enable_background_training=false",
                       "--set", "gate.num_retention_probes=8", "--set", "gate.heldout_examples=0",
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

        result = httpx.post(f"{s.url}/api/training/force?wait=true", timeout=600).json()
        st = result["status"]
        decision = st["weights"]["last_gate_decision"]
        assert st["live_version"] == 0 and st["scheduler"]["rounds_rejected"] >= 1, (result["result"], decision)
        assert decision and not decision["accepted"] and "retention loss rose" in decision["reason"], decision

        rows = {e["id"]: e for e in httpx.get(f"{s.url}/api/queue?limit=100").json()["data"]}
        for i in garbage_ids:
            assert rows[i]["status"] == "rejected", rows[i]
            assert rows[i]["reason"].startswith("update rejected by the quality gate: retention loss rose"), rows[i]
        assert answers() == before  # the live weights never saw any of it
    finally:
        s.stop()
