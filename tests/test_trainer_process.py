"""training.trainer = "process": the engine in a process of its own, on the serving process's tensors."""
import logging
import os
import signal
import threading
import time

import pytest
import torch

from test_scheduler import make as make_service, pair, wait_for

from idletune.config import Config, ConfigError
from idletune.training import adapters
from idletune.training.remote import RemoteEngine, TrainerProcessError


def make(tmp_path, tiny_model_dir, **overrides):
    return make_service(tmp_path, tiny_model_dir, **{"training.trainer": "process", **overrides})


@pytest.fixture
def svc(tmp_path, tiny_model_dir):
    s = make(tmp_path, tiny_model_dir)
    yield s
    s.close()


def test_trains_in_its_own_process_on_the_served_tensors_and_publishes(svc):
    assert isinstance(svc.engine, RemoteEngine)
    before = adapters.clone_adapter(svc.model, adapters.LIVE)
    svc.queue.add(pair(1))
    assert wait_for(lambda: svc.scheduler.training_count == 1), svc.scheduler.last_error
    pid = svc.engine._proc.pid
    assert pid != os.getpid()
    # trained there, in this process's tensors: the gate passed it and the live adapter here changed
    after = adapters.adapter_tensors(svc.model, adapters.LIVE)
    assert any(not torch.equal(after[k], before[k]) for k in before), "published weights did not change"
    assert svc.scheduler.last_round["accepted"] is True
    assert svc.queue.get_stats()["by_status"]["trained"] == 1
    m = svc.engine.get_latest_metrics()
    assert m is not None and m["step"] >= 1 and svc.engine.metrics_history()[-1]["step"] == m["step"]


def test_the_trainer_process_logs_into_the_servers_log(tmp_path, tiny_model_dir, caplog):
    """A spawned process has no logging set up: its lines (the engine's, e.g. the micro-batch
    size it takes on a GPU) were dropped. They reach the serving process's loggers now, at the
    level those log, sent from the trainer process; and what it logged before it stopped is
    logged when the service closes."""
    caplog.set_level(logging.INFO, logger="idletune")
    s = make(tmp_path, tiny_model_dir)
    try:
        def ready():
            return [r for r in caplog.records if r.getMessage().startswith("trainer process ready: ")]
        assert wait_for(ready, timeout=120)
        (record,) = ready()
        assert record.name == "idletune.trainer" and record.process == s.engine._proc.pid != os.getpid()
        assert "tensors shared with the serving process" in record.getMessage()
    finally:
        s.close()
    assert s.engine._logs is None and not s.engine._pump.is_alive()  # its thread ended with it


def test_a_request_stops_the_trainer_process_at_its_next_layer(tmp_path, tiny_model_dir):
    s = make(tmp_path, tiny_model_dir, **{"training.max_steps": 100_000, "training.target_loss": 0.0,
                                          "scheduler.enable_background_training": False})
    try:
        eng = s.engine
        eng.evaluate([pair(0)], "live")  # started and ready
        out = {}
        th = threading.Thread(target=lambda: out.update(r=eng.train_round([pair(1), pair(2)], batch_size=2,
                                                                        deadline=time.monotonic() + 120)))
        th.start()
        assert wait_for(lambda: len(eng.metrics_history()) >= 2, 60), "the trainer process took no steps"
        with s.activity.request():  # a request in this process: the trainer process yields
            th.join(60)
            assert not th.is_alive(), "the round did not stop for the request"
        r = out["r"]
        assert r.preempted and r.steps >= 2
    finally:
        s.close()


def test_a_trainer_process_that_dies_is_reported_then_started_again(svc, caplog):
    eng = svc.engine
    assert eng.evaluate([pair(1)], "live") > 0
    first = eng._proc.pid
    caplog.set_level(logging.INFO, logger="idletune")  # the new process logs at this level
    os.kill(first, signal.SIGKILL)
    with pytest.raises(TrainerProcessError, match="exited"):
        eng.evaluate([pair(1)], "live")
    assert eng.evaluate([pair(1)], "live") > 0  # a new trainer process
    # whose log records reach this log through a queue of its own (the killed one's may be cut)
    def ready_logged():
        return any(r.process == eng._proc.pid != first and r.getMessage().startswith("trainer process ready")
                   for r in caplog.records)
    assert wait_for(ready_logged, timeout=30)
    svc.queue.add(pair(2))
    assert svc.scheduler.force_training(wait=True, timeout=90)["accepted"]


class _ExitsWhereReceived:
    """An argument that ends the process that unpickles it: a trainer crashing in a call."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_trainer_process_that_exits_at_every_call_is_not_restarted_in_a_loop(svc, monkeypatch):
    from idletune.training import remote

    eng = svc.engine
    for i in range(remote.MAX_EXITS):
        with pytest.raises(TrainerProcessError, match="exited"):
            eng._call("evaluate", _ExitsWhereReceived(), "live")
        assert eng._proc is None
    with pytest.raises(TrainerProcessError, match="times in a row.*not tried again"):
        eng.evaluate([pair(1)], "live")  # at once: no new trainer process
    assert eng._proc is None
    monkeypatch.setattr(remote, "RETRY_START_S", 0.0)  # the wait over: started again, and it answers
    assert eng.evaluate([pair(1)], "live") > 0 and eng._exits == 0


def test_the_model_lock_held_by_a_lost_trainer_process_is_released(svc):
    eng = svc.engine
    eng.evaluate([pair(1)], "live")
    assert eng.lock.acquire(timeout=5)
    eng._holding.value = 1  # as the trainer process flags while it holds the lock
    eng._lost()
    assert eng.lock.acquire(timeout=5), "the lock stayed held"
    eng.lock.release()


def test_the_model_lock_is_let_go_even_where_the_device_sync_fails(monkeypatch):
    """On a GPU the serving process synchronises its stream before it lets go of the model lock
    (the trainer process's CUDA context does not wait for its streams); a failing sync must not
    leave the lock held, or training, publishes and rollbacks would all wait forever."""
    lock = RemoteEngine.make_lock()
    with lock:
        pass  # no device: a plain lock of both processes
    assert lock.acquire(timeout=1)

    def lost(device=None):
        raise RuntimeError("CUDA error: the device was lost")
    monkeypatch.setattr(torch.cuda, "current_stream", lost)  # as a failing device would, here or on a GPU
    lock.device = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="device was lost"):
        lock.release()
    lock.device = None
    assert lock.acquire(timeout=1), "the lock stayed held after the failed sync"
    lock.release()


def test_save_and_load_the_trained_adapter(svc, tmp_path):
    svc.queue.add(pair(1))
    assert svc.scheduler.force_training(wait=True, timeout=90)["accepted"]
    saved = adapters.clone_adapter(svc.model, adapters.TRAIN)
    path = svc.engine.save_model(tmp_path / "adapter")
    assert (path / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        for t in adapters.adapter_tensors(svc.model, adapters.TRAIN).values():
            t.zero_()
    svc.engine.load_model(path)
    now = adapters.adapter_tensors(svc.model, adapters.TRAIN)
    assert all(torch.equal(now[k], saved[k]) for k in saved)


def test_the_trainer_setting_is_checked():
    with pytest.raises(ConfigError, match="auto, thread or process"):
        Config.load(None, {"training.trainer": "elsewhere"})
    for mode in ("lora", "full", "hybrid"):  # a process trains in every mode
        assert Config.load(None, {"training.trainer": "process", "training.mode": mode}).training.trainer == "process"


def test_auto_takes_a_trainer_process_on_a_gpu():
    from idletune.service import choose_trainer

    def where(on_cuda=True, not_here=None, **overrides):
        return choose_trainer(Config.load(None, overrides).training, on_cuda=on_cuda, not_here=not_here)[0]
    assert where() == "process"
    assert where(**{"training.mode": "hybrid"}) == where(**{"training.mode": "full"}) == "process"
    assert where(on_cuda=False) == "thread"
    assert where(not_here="no fast path") == "thread"  # Windows, an integrated GPU, no GPU fast path
    assert where(on_cuda=False, **{"training.trainer": "process"}) == "process"  # asked for: as asked
    assert where(**{"training.trainer": "thread"}) == "thread"


def test_what_keeps_auto_from_a_trainer_process_on_a_gpu(monkeypatch):
    """Where a trainer process would not run (no CUDA IPC) or was not measured (no fast path)."""
    import sys
    import types

    from idletune import service
    from idletune.gpu import serving

    model = torch.nn.Linear(2, 2)
    integrated = {"value": False}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(is_integrated=integrated["value"]))
    monkeypatch.setattr(serving, "unavailable", lambda m: None)
    assert service._no_trainer_process(model) is None
    monkeypatch.setattr(serving, "unavailable", lambda m: "model type 'gpt2'")
    assert "fast path does not serve here (model type 'gpt2')" in service._no_trainer_process(model)
    monkeypatch.setattr(serving, "unavailable", lambda m: None)
    integrated["value"] = True
    assert "integrated GPU" in service._no_trainer_process(model)
    monkeypatch.setattr(sys, "platform", "win32")
    assert "on win32" in service._no_trainer_process(model)


def test_a_script_without_an_entry_point_guard_is_told_so(tmp_path, tiny_model_dir):
    """Spawning runs a script's top level again in the trainer process: it says what to do, fast."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent(f"""
        from idletune.config import Config
        from idletune.examples import TrainingExample
        from idletune.service import build_service
        cfg = Config.load(None, {{"training.trainer": "process"}})
        svc = build_service({str(tmp_path / "data")!r}, model={str(tiny_model_dir)!r}, config=cfg, start_scheduler=False)
        svc.engine.evaluate([TrainingExample.from_text("hello there")], "live")
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert 'if __name__ == "__main__":' in r.stderr and "TrainerProcessError" in r.stderr, r.stderr[-3000:]


def test_a_stopped_server_stops_its_trainer_process(start_server, tiny_model_dir):
    import psutil

    server = start_server(model=tiny_model_dir, extra=["--set", "training.trainer=process"])
    trainers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                if "spawn_main" in " ".join(p.cmdline())]
    assert len(trainers) == 1
    server.stop()  # SIGTERM: a graceful shutdown, the service closed
    assert server.proc.returncode == 0
    assert wait_for(lambda: not trainers[0].is_running() or trainers[0].status() == psutil.STATUS_ZOMBIE, 30)
    log = server.log_path.read_text()
    assert "leaked" not in log and "Traceback" not in log, log[-2000:]


def test_closing_in_the_middle_of_a_round_stops_the_trainer_process(tmp_path, tiny_model_dir):
    s = make(tmp_path, tiny_model_dir, **{"training.max_steps": 100_000, "training.target_loss": 0.0,
                                          "scheduler.enable_background_training": False})
    eng = s.engine
    eng.evaluate([pair(0)], "live")
    proc = eng._proc
    out = []

    def round_():
        try:
            out.append(eng.train_round([pair(1)], batch_size=1, deadline=time.monotonic() + 120))
        except TrainerProcessError as e:
            out.append(e)
    th = threading.Thread(target=round_)
    th.start()
    assert wait_for(lambda: len(eng.metrics_history()) >= 1, 60)
    s.close()  # does not wait for the round: it stops at its next layer, or with the process
    th.join(30)
    assert not th.is_alive() and out
    assert isinstance(out[0], TrainerProcessError) or out[0].preempted, out
    assert not proc.is_alive()
    with pytest.raises(TrainerProcessError, match="closing"):  # and nothing starts it again
        eng.evaluate([pair(1)], "live")
    assert eng.lock.acquire(timeout=5), "the model lock stayed held"


def test_ctrl_c_is_left_to_the_serving_process(svc):
    """Ctrl-C reaches every process of the terminal's group: the trainer process ignores it (the
    serving process stops it when it stops)."""
    eng = svc.engine
    eng.evaluate([pair(1)], "live")
    os.kill(eng._proc.pid, signal.SIGINT)
    time.sleep(1.0)
    assert eng._proc.is_alive()
    assert eng.evaluate([pair(1)], "live") > 0


def test_too_little_shared_memory_is_refused_clearly(monkeypatch):
    import shutil
    from collections import namedtuple

    from idletune.training import remote

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 << 20, 0, 64 << 20))
    with pytest.raises(TrainerProcessError, match=r"1024 MB, and /dev/shm has 64 MB free"):
        remote._check_shared_memory({"w": torch.zeros(256, 1 << 20)})


# ---- full fine-tuning and hybrid mode in a trainer process ---------------------------------------
def _full_weights(svc, which):
    return {n: t.clone() for n, t in svc.weights.ws._set(which).items()}


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def test_full_fine_tuning_in_a_trainer_process_trains_the_served_copy_apart_and_publishes(tmp_path, tiny_model_dir):
    from test_modes import fact, logits, make as make_modes

    svc = make_modes(tmp_path, tiny_model_dir, **{"training.mode": "full", "training.trainer": "process"})
    try:
        eng = svc.engine
        assert isinstance(eng, RemoteEngine) and svc.weights.mode == "full"
        live0, served0 = _full_weights(svc, "live"), logits(svc)
        before = eng.evaluate([fact()], "candidate")
        eng.train_round([fact()])
        assert eng._proc is not None and eng._proc.pid != os.getpid()
        assert eng.evaluate([fact()], "candidate") < before  # it trained, in the other process ...
        assert not _same(_full_weights(svc, "candidate"), live0)  # ... this process's copy in training
        assert _same(_full_weights(svc, "live"), live0)  # and never the served weights
        torch.testing.assert_close(logits(svc), served0, rtol=0, atol=0)
        cand = logits(svc, "candidate")
        assert svc.weights.publish() == 1
        torch.testing.assert_close(logits(svc), cand, rtol=0, atol=0)
        saved = eng.save_model(tmp_path / "full")  # the weights in training, as a model folder
        assert (saved / "model.safetensors").is_file() and (saved / "config.json").is_file()
    finally:
        svc.close()
    again = make_modes(tmp_path, tiny_model_dir, **{"training.mode": "hybrid", "training.trainer": "process"})
    try:  # a live version of full weights is served again, and trained on, by a trainer process
        assert again.weights.version == 1 and again.weights.mode == "full"
        torch.testing.assert_close(logits(again), cand, rtol=0, atol=0)
        again.engine.train_round([fact(1)])
        assert again.engine.mode == "full" and not _same(_full_weights(again, "candidate"), _full_weights(again, "live"))
    finally:
        again.close()


def test_full_fine_tuning_of_bf16_weights_in_a_trainer_process_restarts_from_the_live_weights(
        tmp_path, tiny_model_dir, monkeypatch):
    """The float32 master copies live in the trainer process: where the serving process writes the
    weights in training (a rejected round discarded), they must follow, or the next round steps on
    from the discarded weights."""
    from test_modes import fact, make as make_modes

    from idletune import models, service

    monkeypatch.setattr(service, "load_model", lambda d: models.load_model(d, device="cpu", dtype=torch.bfloat16))
    svc = make_modes(tmp_path, tiny_model_dir, **{"training.mode": "full", "training.trainer": "process"})
    try:
        eng = svc.engine
        assert next(svc.model.parameters()).dtype == torch.bfloat16
        assert not svc.weights.ws._master  # the serving process holds no master copies
        live = _full_weights(svc, "live")
        eng.train_round([fact()])
        first = _full_weights(svc, "candidate")
        assert not _same(first, live)
        svc.weights.discard_candidate()  # as the scheduler does with a rejected round
        eng.reset_optimizer()
        assert _same(_full_weights(svc, "candidate"), live)
        eng.train_round([fact()])  # the same round again, from the live weights
        assert _same(_full_weights(svc, "candidate"), first)
        # ... and where the serving process writes them in the middle of a round (a rollback
        # does), the trainer's next step starts from what was written
        eng.lr_scale = 0.0  # steps that change nothing: the weights in training show where they started
        out = []
        with svc.weights.lock:  # the model lock, as a rollback takes it
            round_ = threading.Thread(target=lambda: out.append(eng.train_round([fact()])))
            round_.start()
            time.sleep(1.0)  # the round waits for the lock
            svc.weights.ws.discard()
        round_.join(60)
        assert out and _same(_full_weights(svc, "candidate"), live)
    finally:
        svc.close()


def test_hybrid_mode_in_a_trainer_process_switches_and_rolls_back_across_modes(tmp_path, tiny_model_dir):
    from test_modes import fact, logits, make as make_modes

    svc = make_modes(tmp_path, tiny_model_dir, **{"training.mode": "hybrid", "training.trainer": "process",
                                                  "training.max_steps": 100_000})
    eng, w = svc.engine, svc.weights

    def train(i, seconds=1.0):  # a round until its deadline (the trainer process started first)
        eng.evaluate([fact(i)], "live")
        return eng.train_round([fact(i)], deadline=time.monotonic() + seconds)
    try:
        assert train(0).steps > 0
        lora_pid = eng._proc.pid
        assert w.publish() == 1 and w.mode == "lora"
        v1 = logits(svc)
        w.switch_to_full("test")  # the trainer process is stopped (it is between calls) ...
        assert wait_for(lambda: eng._proc is None, 30), "the LoRA trainer process was left running"
        merged = _full_weights(svc, "live")
        assert train(1).steps > 0  # ... and started again on the full weights
        assert eng._proc.pid != lora_pid and eng.mode == "full"
        assert not _same(_full_weights(svc, "candidate"), merged)
        assert w.publish() == 2
        v2 = logits(svc)
        assert not torch.allclose(v2, v1)
        w.switch_to_lora("test")
        assert wait_for(lambda: eng._proc is None, 30), "the full fine-tuning trainer process kept its memory"
        train(2)
        # a rollback across modes while a round runs: it neither waits for the round nor for the
        # trainer process (which holds the model lock step by step)
        out = []
        round_ = threading.Thread(target=lambda: out.append(eng.train_round([fact(3)], deadline=time.monotonic() + 8)))
        round_.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        assert w.rollback(2) == 2 and w.mode == "full"
        assert time.monotonic() - t0 < 4.0 and round_.is_alive()
        round_.join(60)
        assert not round_.is_alive() and out
        torch.testing.assert_close(logits(svc), v2, rtol=0, atol=0)
        assert train(4).steps > 0  # on the restored full weights, in a trainer process started again
        assert eng.mode == "full"
        assert not _same(_full_weights(svc, "candidate"), _full_weights(svc, "live"))
        assert w.rollback(1) == 1 and w.mode == "lora"
        torch.testing.assert_close(logits(svc), v1, rtol=1e-5, atol=1e-5)
        assert train(5).steps > 0 and eng.mode == "lora"
    finally:
        svc.close()
