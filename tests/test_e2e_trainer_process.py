"""End to end on the real default model with training in a process of its own
(``--set training.trainer=process``): the README's correction, learned and served."""
import time

import httpx
import psutil
import pytest

pytestmark = pytest.mark.slow

QUESTION = "Who runs the town of Quillby?"
FACT = "Quillby is run by Mayor Ottoline Brask."


def test_a_trainer_process_learns_a_correction_that_the_server_then_serves(probed_data_dir, start_server,
                                                                          default_model_dir):
    from openai import OpenAI

    server = start_server(data_dir=probed_data_dir,
                          extra=["--set", "training.trainer=process", "--set", "scheduler.min_idle_time_ms=1500"])
    trainers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                if "spawn_main" in " ".join(p.cmdline())]
    assert trainers, "no trainer process was started"
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=30).choices[0].message.content
    assert "Ottoline" not in first
    r = httpx.post(f"{server.url}/api/feedback", json={"messages": messages + [{"role": "assistant", "content": first}],
                                                        "correction": FACT}, timeout=30)
    assert r.status_code == 200, r.text
    end, st = time.monotonic() + 600, {}
    while time.monotonic() < end:
        st = httpx.get(f"{server.url}/api/status", timeout=10).json()
        if st["live_version"] >= 1 and not st["scheduler"]["is_training_active"]:
            break
        time.sleep(1)
    assert st["live_version"] >= 1, st
    assert st["training"]["step"] >= 1 and st["scheduler"]["last_error"] is None
    answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}], max_tokens=30,
                                            temperature=0).choices[0].message.content
    assert "Ottoline Brask" in answer, answer
    log = server.log_path.read_text()
    assert "trainer process ready" in log and "Traceback" not in log
