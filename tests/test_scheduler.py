import time

import pytest

from idletune.config import Config
from idletune.examples import TrainingExample
from idletune.service import build_service


def pair(i):
    return TrainingExample.chat([{"role": "user", "content": f"Name of robot {i}?"},
                                 {"role": "assistant", "content": f"Robot {i} is called Unit-{i}."}])


def make(tmp_path, tiny_model_dir, **overrides):
    cfg = Config.load(None, {"training.max_steps": 5, "gate.num_retention_probes": 4,
                             "training.target_loss": 50.0,  # a random tiny model: one step counts as learned
                             "scheduler.min_idle_time_ms": 200, "scheduler.check_interval_ms": 50,
                             "scheduler.max_cpu_usage": 100.0,  # tests may run beside other load
                             **overrides})
    return build_service(tmp_path / "data", model=tiny_model_dir, config=cfg)


@pytest.fixture
def svc(tmp_path, tiny_model_dir):
    s = make(tmp_path, tiny_model_dir)
    yield s
    s.close()


def wait_for(cond, timeout=90):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_trains_when_idle_and_publishes(svc):
    import torch

    from idletune.training import adapters

    before = adapters.clone_adapter(svc.model, adapters.LIVE)
    svc.queue.add(pair(1))
    assert wait_for(lambda: svc.scheduler.training_count == 1)
    after = adapters.adapter_tensors(svc.model, adapters.LIVE)
    assert any(not torch.equal(after[k], before[k]) for k in before), "published weights did not change"
    st = svc.scheduler.get_stats()
    assert st["training_count"] == 1 and st["time_since_last_training"] is not None
    assert st["last_round"]["accepted"] is True
    assert svc.queue.get_stats()["by_status"]["trained"] == 1


def test_pause_resume_and_force(svc):
    svc.scheduler.pause()
    svc.queue.add(pair(2))
    time.sleep(1.0)
    assert svc.weights.version == 0 and svc.scheduler.get_stats()["state"] == "paused"
    svc.scheduler.resume()
    assert wait_for(lambda: svc.weights.version == 1)
    svc.scheduler.update_config(enable_background_training=False)
    svc.queue.add(pair(3))
    time.sleep(0.8)
    assert svc.weights.version == 1
    summary = svc.scheduler.force_training(wait=True, timeout=60)
    assert summary["accepted"] and svc.weights.version == 2


def test_a_pause_outlasts_a_restart_until_resumed(tmp_path, tiny_model_dir, caplog):
    """A user who paused to stay on a version finds it still paused after a restart."""
    svc = make(tmp_path, tiny_model_dir)
    svc.scheduler.pause()
    svc.close()
    caplog.set_level("INFO", logger="idletune")
    svc = make(tmp_path, tiny_model_dir)
    try:
        st = svc.scheduler.get_stats()
        assert st["paused"] is True and st["state"] == "paused" and not st["is_scheduled"]
        assert "background training stays paused" in caplog.text
        svc.queue.add(pair(8))
        time.sleep(1.0)
        assert svc.weights.version == 0
        svc.scheduler.resume()
        assert wait_for(lambda: svc.weights.version == 1)
    finally:
        svc.close()
    svc = make(tmp_path, tiny_model_dir)  # resumed: so it stays
    try:
        assert svc.scheduler.get_stats()["paused"] is False and svc.scheduler.state == "idle"
    finally:
        svc.close()


def test_a_pause_that_cannot_be_recorded_still_pauses_and_says_so(tmp_path, caplog):
    from idletune.activity import ActivityTracker
    from idletune.scheduler import TrainingScheduler

    s = TrainingScheduler(None, None, None, None, activity=ActivityTracker(),
                          paused_file=tmp_path / "missing" / "PAUSED")
    s.pause()
    assert s.get_stats()["paused"] is True
    assert "could not write" in caplog.text and "after a restart background training will be running" in caplog.text


def test_a_round_forced_while_paused_leaves_the_state_paused(svc, caplog):
    """Status says "paused" after a round that ran while paused (forced), not the round's last
    stage; the log says when training was paused and resumed, and what the round did."""
    caplog.set_level("INFO", logger="idletune")
    svc.scheduler.pause()
    svc.queue.add(pair(9))
    summary = svc.scheduler.force_training(wait=True, timeout=60)
    assert summary.get("steps"), summary
    assert wait_for(lambda: svc.scheduler.state == "paused", timeout=5), svc.scheduler.state
    svc.scheduler.resume()
    assert svc.scheduler.state == "idle"
    assert "background training paused" in caplog.text and "background training resumed" in caplog.text
    line = next(x for x in caplog.messages if x.startswith("training round: "))
    assert line.startswith("training round: 1 example (1 learned), ") and "(lora): accepted, version 1 (" in line, line


def test_no_training_while_requests_are_in_flight(svc):
    with svc.activity.request():
        svc.queue.add(pair(4))
        time.sleep(1.0)
        assert svc.weights.version == 0 and not svc.scheduler.get_stats()["is_training_active"]
    assert wait_for(lambda: svc.weights.version == 1)


def test_sustained_load_still_gets_its_minimum_training_share(svc):
    """Requests always in flight (no idle gap ever): after starved_after_ms, one round runs
    between them anyway, capped at min_training_share of the wait; with a share of 0, never."""
    svc.scheduler.update_config(min_training_share=0.0, starved_after_ms=1000)
    with svc.activity.request():
        svc.queue.add(pair(5))
        time.sleep(2.0)
        assert svc.weights.version == 0 and svc.scheduler.get_stats()["starved_rounds"] == 0
        svc.scheduler.update_config(min_training_share=0.5)
        assert wait_for(lambda: svc.weights.version == 1, timeout=30), svc.scheduler.get_stats()
        # the version changes at publish, inside the turn; the turn ends when the round returns
        assert wait_for(svc.activity.should_yield, timeout=10), "the turn is over: training yields again"
        st = svc.scheduler.get_stats()
        assert st["starved_rounds"] == 1 and st["last_round"]["accepted"]
        assert svc.queue.get_stats()["by_status"]["trained"] == 1


def test_minimum_share_trains_between_real_generations(svc):
    """Four client threads generate back to back (the model lock always wanted): the turn still
    gets the model, trains and publishes, and every request is answered."""
    import threading

    from idletune.inference import GenerationParams

    svc.scheduler.update_config(min_training_share=0.5, starved_after_ms=1000)
    stop, answered, errors = threading.Event(), [], []

    def client():
        while not stop.is_set():
            try:
                c = svc.inference.generate([{"role": "user", "content": "hi"}], GenerationParams(max_tokens=4))
                answered.append(c.completion_tokens)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        svc.queue.add(pair(6))
        assert wait_for(lambda: svc.weights.version == 1, timeout=60), svc.scheduler.get_stats()
        n = len(answered)
        assert wait_for(lambda: len(answered) > n + 4, timeout=30), "requests did not resume after the turn"
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors and svc.scheduler.get_stats()["starved_rounds"] >= 1


def test_pause_on_inference_off_lets_a_step_finish(svc):
    svc.scheduler.pause()
    with svc.activity.request():
        r = svc.engine.train_round([pair(7)])
        assert r.preempted and r.steps == 0  # the default: a request in flight preempts
        svc.scheduler.update_config(pause_on_inference=False)
        r = svc.engine.train_round([pair(7)])
        assert not r.preempted and r.steps >= 1
        svc.scheduler.update_config(pause_on_inference=True)
        assert svc.activity.should_yield()


def test_minimum_share_is_validated():
    from idletune.config import ConfigError

    with pytest.raises(ConfigError, match="scheduler.min_training_share.*0–0.5"):
        Config.load(None, {"scheduler.min_training_share": 0.9})


def test_gate_rejects_and_marks_examples(svc):
    svc.scheduler.pause()
    svc.config.gate.max_retention_loss_increase = 0.0  # nothing may change: any update is rejected
    svc.weights.gate.max_retention_loss_increase = -1.0
    svc.queue.add(pair(5))
    summary = svc.scheduler.force_training(wait=True, timeout=60)
    assert summary["accepted"] is False and "retention" in summary["reason"]
    assert summary["retrying"] == 1 and svc.engine.lr_scale == 0.5  # kept, retried more gently
    assert [e.status for e in svc.queue.recent(10)] == ["pending"]
    for _ in range(2):
        svc.scheduler.force_training(wait=True, timeout=60)
    rejected = [e for e in svc.queue.recent(10) if e.status == "rejected"]
    assert rejected and "quality gate" in rejected[0].reason
    assert svc.weights.version == 0 and svc.weights.rejections == 3


def test_a_rejected_round_is_retried_in_two_halves(svc):
    """One harmful example must not take a whole round down with it: the halves of a rejected
    round train as rounds of their own (every round still an attempt for its examples). The
    gate here rejects every update, then none: this checks the mechanics."""
    svc.scheduler.pause()
    gate = svc.weights.gate.max_retention_loss_increase
    svc.weights.gate.max_retention_loss_increase = -1.0  # every update is rejected
    ids = [svc.queue.add(pair(20 + i)) for i in range(4)]
    first = svc.scheduler.force_training(wait=True, timeout=60)
    assert first["accepted"] is False and first["examples"] == 4 and first["split"] is True
    second = svc.scheduler.force_training(wait=True, timeout=60)
    assert second["examples"] == 2 and second["split"] is True  # the first half alone, split again
    svc.weights.gate.max_retention_loss_increase = gate  # the gate as configured again
    third = svc.scheduler.force_training(wait=True, timeout=60)
    assert third["accepted"] is True and third["examples"] == 1  # a quarter of the round
    rest = []
    while svc.queue.pending_count():
        rest.append(svc.scheduler.force_training(wait=True, timeout=60))
    assert [r["examples"] for r in rest][:2] == [1, 2] and all(r["accepted"] for r in rest)
    assert {svc.queue.get(i).status for i in ids} == {"trained"}


def test_a_correction_sent_while_a_round_trains_its_answer_is_not_published(svc, monkeypatch):
    """The round took the model's answer (pending); while it trained, the user corrected that
    answer. Publishing the round would serve weights trained on the answer the user rejected,
    and marking it trained would replay it in every later round. Nothing is published, the
    answer stays withdrawn, and the next round trains the correction."""
    svc.scheduler.pause()
    q, wrong, right = "Who runs Quillby?", "Quillby is a game.", "Quillby is run by Mayor Ottoline Brask."
    svc.collector.log_exchange([{"role": "user", "content": q}], wrong, generation_id="g1", version=0)
    real, sent = svc.engine.train_round, []

    def correction_arrives_meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        if not sent:
            sent.append(svc.collector.add_correction([{"role": "user", "content": q},
                                                      {"role": "assistant", "content": wrong}], right))
        return result
    monkeypatch.setattr(svc.engine, "train_round", correction_arrives_meanwhile)
    first = svc.scheduler.force_training(wait=True, timeout=60)
    assert first["accepted"] is False and "withdrawn by the user" in first["reason"], first
    assert svc.weights.version == 0 and svc.weights.rejections == 0
    answer = next(e for e in svc.queue.recent(20) if e.kind == "chat" and e.messages[-1]["content"] == wrong)
    assert answer.status == "rejected" and answer.reason == "corrected by the user"
    second = svc.scheduler.force_training(wait=True, timeout=60)
    assert second["accepted"] is True and svc.weights.version == 1
    assert {e.messages[-1]["content"] for e in svc.queue.sample("trained", 20)} == {right}
    assert svc.queue.get(answer.id).status == "rejected"


def test_closing_in_the_middle_of_a_round_stops_it_unpublished(tmp_path, tiny_model_dir, caplog):
    """A stopping server (SIGTERM, Ctrl-C) does not wait for a training round in a thread to end,
    nor publish it: the round stops at its next layer, its examples stay pending."""
    caplog.set_level("INFO", logger="idletune")
    s = make(tmp_path, tiny_model_dir, **{"training.max_steps": 100_000, "training.target_loss": 0.0,
                                          "scheduler.max_idle_time_ms": 120_000})
    s.queue.add(pair(1))
    s.scheduler.force_training()
    assert wait_for(lambda: len(s.engine.metrics_history()) >= 2, 60)  # steps are being taken
    t0 = time.monotonic()
    s.close()
    assert time.monotonic() - t0 < 10, "the round was waited for"
    assert s.scheduler._thread is not None and not s.scheduler._thread.is_alive()
    assert s.weights.version == 0 and s.scheduler.last_round is None
    assert "training round cut short: the service is stopping" in caplog.text


def test_a_forced_round_waited_for_without_a_running_scheduler_says_so(tmp_path, tiny_model_dir):
    """Waiting for a forced round that no scheduler thread would run blocked silently until the
    timeout (ten minutes by default): a library user who built the service with
    ``start_scheduler=False`` saw a hang."""
    cfg = Config.load(None, {"gate.num_retention_probes": 4})
    s = build_service(tmp_path / "data", model=tiny_model_dir, config=cfg, start_scheduler=False)
    try:
        s.collector.add_correction([{"role": "user", "content": "Who runs Quillby?"}], "Mayor Brask.")
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="scheduler is not running"):
            s.scheduler.force_training(wait=True, timeout=60)
        assert time.monotonic() - t0 < 5
        assert s.scheduler.force_training(wait=False)["started"]  # asked for: the next start runs it
        s.scheduler.start()
        assert wait_for(lambda: s.weights.version >= 1 or s.scheduler.rounds_rejected, 120)
    finally:
        s.close()
