"""The training engine, adapters and weight updater on a tiny model built from a config."""
import gc
import threading
import time

import pytest
import torch

from idletune.config import Config, ConfigError, LoraConfig
from idletune.examples import TrainingExample
from idletune.service import build_service
from idletune.training import adapters
from idletune.training.adapters import LIVE, TRAIN
from idletune.training.engine import Preempted  # noqa: F401  (public)


def fact(i: int = 0) -> TrainingExample:
    ex = TrainingExample.chat([{"role": "user", "content": f"What is the code of vault {i}?"},
                               {"role": "assistant", "content": f"The code of vault {i} is {1000 + i}."}])
    ex.id = i + 1
    return ex


@pytest.fixture
def svc(tmp_path, tiny_model_dir):
    cfg = Config.load(None, {"training.max_steps": 40, "training.target_loss": 0.0, "gate.num_retention_probes": 4})
    s = build_service(tmp_path / "data", model=tiny_model_dir, config=cfg, start_scheduler=False)
    yield s
    s.close()


def test_loss_falls_and_only_the_candidate_adapter_changes(svc):
    base_before = {k: v.clone() for k, v in svc.model.named_parameters() if "lora_" not in k}
    live_before = adapters.clone_adapter(svc.model, LIVE)
    before = svc.engine.evaluate([fact()], TRAIN)
    r = svc.engine.train_round([fact()])
    after = svc.engine.evaluate([fact()], TRAIN)
    assert r.steps == 40 and after < before - 0.25  # a random 2-layer model: slow, but clearly falling
    for k, v in svc.model.named_parameters():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), f"frozen weight {k} changed"
    for k, v in adapters.adapter_tensors(svc.model, LIVE).items():
        assert torch.equal(v, live_before[k]), "the live adapter changed before publish"
    m = svc.engine.get_latest_metrics()
    assert {"step", "loss", "learning_rate", "grad_norm", "examples_processed"} <= set(m)
    assert (svc.data_dir / "metrics.jsonl").read_text().count("\n") == 40


def test_publish_then_rollback_is_bit_exact(svc):
    v0 = adapters.clone_adapter(svc.model, LIVE)
    svc.engine.train_round([fact(0)])
    assert svc.weights.publish({"loss": 1.0}) == 1
    v1 = adapters.clone_adapter(svc.model, LIVE)
    assert any(not torch.equal(v1[k], v0[k]) for k in v0)
    svc.engine.train_round([fact(1)])
    assert svc.weights.publish() == 2
    assert svc.weights.rollback() == 1
    for k, t in adapters.adapter_tensors(svc.model, LIVE).items():
        assert torch.equal(t, v1[k])
    svc.weights._ring.clear()  # force the on-disk path
    assert svc.weights.rollback(0) == 0
    for k, t in adapters.adapter_tensors(svc.model, LIVE).items():
        assert torch.equal(t, v0[k])
    assert svc.weights.rollback(2) == 2  # from disk, checksum verified
    assert [s["version"] for s in svc.weights.list_snapshots()] == [1, 2]


def test_rollback_by_default_undoes_the_last_update(svc):
    """Back to what the live version was trained from, not to the highest older version."""
    for i in range(2):
        svc.engine.train_round([fact(i)])
        svc.weights.publish()
    assert svc.weights.rollback(1) == 1  # v2 left behind
    svc.engine.train_round([fact(2)])
    assert svc.weights.publish() == 3  # trained on v1
    assert {s["version"]: s["parent"] for s in svc.weights.list_snapshots()} == {1: 0, 2: 1, 3: 1}
    assert svc.weights.rollback() == 1  # not 2, the version rolled back away from
    assert svc.weights.rollback() == 0


def test_saved_adapter_loads_in_peft_with_identical_logits(svc, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    svc.engine.train_round([fact()])
    out = svc.engine.save_model(tmp_path / "adapter")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with svc.engine.lock:
        adapters.activate(svc.model, TRAIN)
        svc.model.eval()
        with torch.no_grad():
            ours = svc.model(input_ids=ids).logits
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    with torch.no_grad():
        theirs = ref(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # and back in: load_model restores the same weights
    trained = adapters.clone_adapter(svc.model, TRAIN)
    with svc.engine.lock:
        adapters.copy_adapter(svc.model, LIVE, TRAIN)
    svc.engine.load_model(out)
    for k, t in adapters.adapter_tensors(svc.model, TRAIN).items():
        assert torch.equal(t, trained[k])


def test_steps_run_every_module_in_training_mode(svc):
    """Dropout (and the compiled training layers) need every module in training mode at each
    step, whatever evaluation or a wrapper left: the root's flag alone is not enough (a
    PeftModel starts in training mode around a model that from_pretrained put in eval mode)."""
    seen = []
    layer = adapters.decoder_layers(svc.model)[-1]
    layer.register_forward_pre_hook(lambda m, a: seen.append(all(x.training for x in svc.model.modules())))
    svc.model.eval()
    svc.model.train(False)
    svc.model.training = True  # the root says training; nothing below it is
    svc.engine.config.max_steps = 2
    svc.engine.train_round([fact()])
    svc.engine.evaluate([fact()], TRAIN)  # puts the model in eval mode
    layer.eval()  # and one module on its own
    svc.engine.train_round([fact()])
    assert seen[:2] == [True, True] and seen[-2:] == [True, True], seen


def test_training_passes_build_no_kv_cache(svc, monkeypatch):
    """Training and evaluation passes ask for no KV cache (nothing reads it; on a GPU its guards
    made the compiled layers recompile for each layer and each new batch shape). Asked
    explicitly: transformers versions differ on whether a config's ``use_cache`` applies."""
    from transformers.cache_utils import Cache

    decoder = svc.model.get_base_model().get_decoder()
    asked, caches = [], []
    real = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **kw: asked.append(kw.get("use_cache")) or real(*a, **kw))
    for layer in adapters.decoder_layers(svc.model):
        layer.register_forward_pre_hook(lambda m, a, kw: caches.extend(v for v in kw.values() if isinstance(v, Cache)),
                                        with_kwargs=True)
    svc.model.config.use_cache = True
    svc.engine.config.max_steps = 1
    svc.engine.train_round([fact()])
    svc.engine.evaluate([fact()], TRAIN)
    assert asked and all(x is False for x in asked), asked
    assert not caches


def test_a_request_preempts_a_step_at_a_layer_boundary(svc):
    calls = {"n": 0}

    def should_yield():  # a request "arrives" after a few layer boundaries of the first step
        calls["n"] += 1
        return calls["n"] > 3

    svc.engine.should_yield = should_yield
    r = svc.engine.train_round([fact()])
    assert r.preempted and r.steps == 0
    assert all(p.grad is None for p in svc.model.parameters() if p.requires_grad), "partial step not discarded"
    assert not svc.engine.lock.locked()


def test_a_request_preempts_a_step_between_the_loss_chunks(svc, monkeypatch):
    """The output layer's loss is a step's largest single piece of work: a request that comes
    during it stops the step at the next chunk, not after the whole loss."""
    from idletune.gpu import loss

    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 2 * svc.model.get_base_model().config.vocab_size)  # 2 positions a chunk
    chunks = {"n": 0}
    real_rows = loss._torch_rows

    def counted_rows(*args):
        chunks["n"] += 1
        return real_rows(*args)
    monkeypatch.setattr(loss, "_torch_rows", counted_rows)
    svc.engine.should_yield = lambda: chunks["n"] > 0  # the request comes during the first chunk
    r = svc.engine.train_round([fact()])
    assert r.preempted and r.steps == 0
    assert chunks["n"] == 1, f"the loss ran {chunks['n']} chunks after the request came"
    assert all(p.grad is None for p in svc.model.parameters() if p.requires_grad), "partial step not discarded"
    assert not svc.engine.lock.locked()


def test_evaluation_preempted_during_the_loss_is_redone_with_the_same_losses(svc, monkeypatch):
    from idletune.gpu import loss

    examples = [fact(i) for i in range(3)]
    expected = svc.engine.example_losses(examples, TRAIN)
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 2 * svc.model.get_base_model().config.vocab_size)
    chunks, fired = {"n": 0}, []
    real_rows = loss._torch_rows

    def counted_rows(*args):
        chunks["n"] += 1
        return real_rows(*args)
    monkeypatch.setattr(loss, "_torch_rows", counted_rows)

    def should_yield():  # one request, during the first chunk of the first evaluation pass
        if chunks["n"] == 1 and not fired:
            fired.append(1)
            return True
        return False
    svc.engine.should_yield = should_yield
    got = svc.engine.example_losses(examples, TRAIN)
    assert fired and chunks["n"] > 1
    assert got == pytest.approx(expected, rel=1e-5)
    assert not svc.engine.lock.locked() and svc.engine._step_thread is None


def test_the_loss_is_queued_a_chunk_at_a_time_only_while_the_user_is_active(svc, monkeypatch):
    import threading

    from idletune.training.engine import AWAY_AFTER_S

    recorded = []

    class Event:  # stands in for torch.cuda.Event: the queue's bookkeeping, without a GPU
        def record(self, stream):
            recorded.append(stream)

        def synchronize(self):
            pass
    monkeypatch.setattr(torch.cuda, "Event", Event)
    eng, idle = svc.engine, [0.0]
    monkeypatch.setattr(eng, "idle_for", lambda: idle[0])
    eng._step_thread, eng._step_stream = threading.get_ident(), "stream"
    try:
        eng._loss_boundary()  # a request a moment ago: this chunk is queued and counted
        assert recorded == ["stream"]
        idle[0] = AWAY_AFTER_S
        eng._loss_boundary()  # away: the loss runs ahead, whole
        assert recorded == ["stream"]
        eng._forward_boundary([1])  # layers are counted either way
        assert recorded == ["stream", "stream"]
    finally:
        eng._step_thread = eng._step_stream = None
        eng._queued.clear()


def test_a_compiled_unit_counts_as_its_layers_in_the_training_queue_while_the_user_is_active(svc, monkeypatch):
    """While the user is active at most ``queued_layers`` layers of a step's work stay queued
    ahead of a request: a unit of several layers counts as that many, so with units larger than
    the limit one unit stays queued, not ``queued_layers`` units (the TTFT cost of units,
    docs/BENCHMARKS.md runs BS, BV). While the user is away, ``queued_layers`` units. In full
    fine-tuning while the user is active, none: the host waits for each layer or unit before it
    queues the next (decoding beside it ×0.983 against ×0.966 with one layer queued, run FM)."""
    import threading

    from idletune.training.engine import AWAY_AFTER_S, QUEUED_LAYERS_FULL_ACTIVE

    events = []

    class Event:  # stands in for torch.cuda.Event: which boundaries the host waits for
        def __init__(self):
            self.waited = False
            events.append(self)

        def record(self, stream):
            pass

        def synchronize(self):
            self.waited = True
    monkeypatch.setattr(torch.cuda, "Event", Event)
    eng = svc.engine
    eng.queued_layers = 3
    idle = [0.0]  # the user is active: loss chunks are queued too
    monkeypatch.setattr(eng, "idle_for", lambda: idle[0])
    eng._step_thread, eng._step_stream = threading.get_ident(), "stream"

    def run(units: list[int]) -> list[bool]:
        eng._queued.clear(), events.clear()
        for n in units:
            eng._forward_boundary(n)
        return [e.waited for e in events]
    try:
        assert run([1] * 5) == [True, True, False, False, False]  # layer by layer: three stay queued
        assert run([4] * 3) == [True, True, False]  # units of 4: one
        assert run([2] * 4) == [True, True, True, False]  # units of 2: one (two would be 4 layers)
        eng._loss_boundary()  # a loss chunk is one: with a unit of 2 queued, that is 3
        assert [e.waited for e in events] == [True, True, True, False, False]
        # units broken by attention kinds (Gemma 3: 5 sliding-window layers, then a full one)
        assert run([4, 1, 1, 4, 1, 1]) == [True, True, True, True, False, False]
        idle[0] = AWAY_AFTER_S
        assert run([4] * 5) == [True, True, False, False, False]  # away: three units (the host runs ahead)
        eng.mode, idle[0] = "full", 0.0  # full fine-tuning, the user active: nothing left queued
        assert run([1] * 4) == [True, True, True, True]
        assert run([4] * 3) == [True, True, True]
        eng.queued_layers_full_active = 1  # as before run FM: one layer stays queued
        assert run([1] * 4) == [True, True, True, False]
        eng.queued_layers_full_active = QUEUED_LAYERS_FULL_ACTIVE
        idle[0] = AWAY_AFTER_S
        assert run([1] * 5) == [True, True, False, False, False]  # away: three again
    finally:
        eng._step_thread = eng._step_stream = None
        eng.mode, eng.queued_layers_full_active = "lora", QUEUED_LAYERS_FULL_ACTIVE
        eng._queued.clear()


def test_restart_serves_the_last_accepted_version(tmp_path, tiny_model_dir):
    cfg = Config.load(None, {"training.max_steps": 10, "gate.num_retention_probes": 4})
    s = build_service(tmp_path / "d", model=tiny_model_dir, config=cfg, start_scheduler=False)
    s.engine.train_round([fact()])
    s.weights.publish()
    published = adapters.clone_adapter(s.model, LIVE)
    s.close()
    (tmp_path / "d" / "snapshots" / ".tmp-v000009-1").mkdir()  # a write cut short by a crash
    s2 = build_service(tmp_path / "d", model=tiny_model_dir, config=cfg, start_scheduler=False)
    assert s2.weights.version == 1
    for k, t in adapters.adapter_tensors(s2.model, LIVE).items():
        assert torch.equal(t, published[k])
    assert not list((tmp_path / "d" / "snapshots").glob(".tmp-*"))
    s2.close()


def test_corrupt_snapshot_falls_back_with_a_reported_problem(tmp_path, tiny_model_dir):
    cfg = Config.load(None, {"training.max_steps": 5, "gate.num_retention_probes": 4})
    s = build_service(tmp_path / "d", model=tiny_model_dir, config=cfg, start_scheduler=False)
    for i in range(2):
        s.engine.train_round([fact(i)])
        s.weights.publish()
    s.close()
    f = tmp_path / "d" / "snapshots" / "v000002" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # truncated
    s2 = build_service(tmp_path / "d", model=tiny_model_dir, config=cfg, start_scheduler=False)
    assert s2.weights.version == 1
    assert any("v000002" in p for p in s2.weights.problems)
    s2.close()


def test_unknown_target_modules_are_named(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ConfigError, match="c_attn.*not found.*q_proj"):
        adapters.attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(target_modules=["c_attn"]))


@pytest.mark.parametrize("length,rows", [(0, 0), (64, 4)], ids=["as-is", "graph-shape"])
def test_right_padded_batches_need_no_mask_and_match_each_example_alone(svc, length, rows):
    """Losses of a right-padded batch (no attention mask: attention is causal and pads come last;
    padded to a bucketed shape with empty rows, as CUDA-graphed training does) equal each
    example's loss alone, empty rows add nothing, and the target-only loss equals the
    full-logits loss with an explicit padding mask."""
    from idletune.training.data import collate, encode, per_example_loss, target_token_losses

    exs = [fact(0), TrainingExample.from_text("Plain text chunk about owls and their nests.")]
    exs[1].id = 9
    enc = [encode(e, svc.tokenizer, 128) for e in exs]
    assert len(enc[0].input_ids) != len(enc[1].input_ids)
    b = collate(enc, svc.tokenizer.pad_token_id, "cpu", length=length, rows=rows)
    longest = max(len(e.input_ids) for e in enc)
    assert tuple(b["input_ids"].shape) == (rows or 2, max(length, longest))
    mask = torch.zeros_like(b["input_ids"])
    for i, e in enumerate(enc):
        mask[i, :len(e.input_ids)] = 1
    with torch.no_grad():
        full = per_example_loss(svc.model(input_ids=b["input_ids"], attention_mask=mask).logits, b["labels"])
        fast = target_token_losses(svc.model, b)
        alone = [target_token_losses(svc.model, collate([e], svc.tokenizer.pad_token_id, "cpu")) for e in enc]
    torch.testing.assert_close(fast[0][:2], full[0][:2], rtol=1e-5, atol=1e-4)
    assert torch.equal(fast[1], full[1])
    torch.testing.assert_close(fast[0][:2], torch.cat([a[0] for a in alone]), rtol=1e-5, atol=1e-4)
    assert not fast[0][2:].any() and not fast[1][2:].any()  # empty rows: no loss, no targets


def test_graph_shapes_are_few_and_pad_little():
    """With CUDA-graphed layers every micro-batch takes one of a few (rows, length) shapes."""
    from idletune.training.engine import graph_shape

    assert [graph_shape(r, 100)[0] for r in (1, 2, 3, 4, 5, 8, 9, 32)] == [2, 2, 4, 4, 8, 8, 16, 32]
    lengths = {n: graph_shape(4, n)[1] for n in (1, 64, 65, 200, 512, 513, 640, 641, 1024, 1025, 3000, 8192)}
    assert lengths == {1: 64, 64: 64, 65: 128, 200: 256, 512: 512, 513: 640, 640: 640, 641: 768,
                       1024: 1024, 1025: 1280, 3000: 3072, 8192: 8192}
    shapes = {graph_shape(4, n)[1] for n in range(1, 32769)}
    assert len(shapes) == 8 + 4 * 6  # multiples of 64 to 512, then four per doubling to 32768
    assert all(graph_shape(1, n)[1] - n < max(64, n / 4) for n in range(1, 32769))  # under 64 tokens or 25 %


@pytest.mark.parametrize("fused", [False, True], ids=["plain-adamw", "fused-adamw"])
def test_a_step_with_a_non_finite_loss_changes_nothing(svc, monkeypatch, fused):
    """The verdict is taken on the device (fused AdamW's found_inf, as on a GPU) or read on the host."""
    import idletune.training.engine as E

    real = E.target_token_losses
    calls = {"n": 0}

    def sometimes_nan(model, batch, *args):
        calls["n"] += 1
        s, c = real(model, batch, *args)
        return (s * float("nan"), c) if calls["n"] == 2 else (s, c)

    monkeypatch.setattr(E, "target_token_losses", sometimes_nan)
    if fused:
        params = svc.engine._trainable()
        svc.engine._optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    svc.engine.config.max_steps = 1
    svc.engine.train_round([fact()])
    after_one = adapters.clone_adapter(svc.model, TRAIN)
    state_steps = [float(s["step"]) for s in svc.engine._optimizer.state.values()]
    r = svc.engine.train_round([fact()])  # its one step has a NaN loss
    assert r.skipped_nonfinite == 1 and r.steps == 1
    for k, t in adapters.adapter_tensors(svc.model, TRAIN).items():
        assert torch.equal(t, after_one[k]), f"{k} changed by a non-finite step"
    assert [float(s["step"]) for s in svc.engine._optimizer.state.values()] == state_steps
    r = svc.engine.train_round([fact()])
    assert r.skipped_nonfinite == 0 and any(
        not torch.equal(t, after_one[k]) for k, t in adapters.adapter_tensors(svc.model, TRAIN).items())


def test_evaluation_waiting_for_a_gap_gives_up_after_max_wait(svc):
    """Under load that never pauses, an evaluation must not wait forever (the scheduler then
    takes its training turn); with no limit it waits, and runs once the requests are gone."""
    svc.engine.max_wait_s = 0.3
    with svc.activity.request():
        t = time.monotonic()
        with pytest.raises(Preempted):
            svc.engine.evaluate([fact()], LIVE)
        assert time.monotonic() - t < 5
    assert svc.engine.evaluate([fact()], LIVE) > 0


def test_evaluation_preempted_again_and_again_also_gives_up(svc):
    """Requests back to back: each gap lets the batch start, the next request preempts it."""
    calls = {"n": 0}

    def gap_then_request():
        calls["n"] += 1
        return calls["n"] % 2 == 0  # the wait loop sees a gap, the first layer boundary a request

    svc.engine.should_yield = gap_then_request
    svc.engine.max_wait_s = 0.3
    t = time.monotonic()
    with pytest.raises(Preempted):
        svc.engine.evaluate([fact()], LIVE)
    assert time.monotonic() - t < 5 and calls["n"] > 4


def test_micro_batches_bound_tokens_and_give_the_same_gradients(svc):
    from idletune.training.data import encode

    eng = svc.engine
    batch = [encode(fact(i), svc.tokenizer, 128) for i in range(3)]
    longest = max(len(it.input_ids) for it in batch)

    def grads(limit):
        eng.micro_batch_tokens = limit
        parts = eng._micro_batches(batch)
        eng._enter_training()
        eng.model.eval()  # no dropout: the two runs must see the same function
        eng._forward_backward(batch)
        g = [p.grad.clone() for p in eng._trainable()]
        for p in eng._trainable():
            p.grad = None
        return parts, g

    whole, g1 = grads(10**6)
    split, g2 = grads(longest)  # one example per part
    assert len(whole) == 1 and [len(p) for p in split] == [1, 1, 1]
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_should_rollback_applies_the_gate_rule_to_figures(svc):
    tol = svc.weights.gate.max_retention_loss_increase
    assert svc.weights.should_rollback(loss=float("nan"))
    assert svc.weights.should_rollback(accuracy=float("inf"))
    assert not svc.weights.should_rollback(loss=2.0 * (1 + tol) - 0.01, baseline_loss=2.0)
    assert svc.weights.should_rollback(loss=2.0 * (1 + tol) + 0.01, baseline_loss=2.0)
    assert svc.weights.should_rollback(accuracy=0.80, baseline_accuracy=0.90)
    assert not svc.weights.should_rollback(accuracy=0.88, baseline_accuracy=0.90)
    assert not svc.weights.should_rollback()


def test_graph_mode_bookkeeping_trains_the_same_weights(tmp_path, tiny_model_dir, monkeypatch):
    """What the engine does for CUDA-graphed layers (micro-batches padded to bucketed shapes,
    empty rows included, a new graph iteration per micro-batch, gradient buffers kept between
    steps) must not change what is learned: two rounds give the same adapter as the plain path.
    The graphs themselves need a GPU (bench/gpu_graphs_check.py)."""
    cfg = Config.load(None, {"training.max_steps": 3, "training.target_loss": 0.0, "training.lora.dropout": 0.0,
                             "training.warmup_steps": 0, "training.replay_examples": 0})
    import idletune.training.engine as E

    widths, marks = [], []
    real_collate = E.collate

    def recording_collate(items, pad_id, device, length=0, rows=0):
        b = real_collate(items, pad_id, device, length=length, rows=rows)
        widths.append((len(items), *b["input_ids"].shape, max(len(x.input_ids) for x in items)))
        return b

    trained, start = [], None
    for graphs in (False, True):
        torch.manual_seed(0)
        s = build_service(tmp_path / f"data{graphs}", model=tiny_model_dir, config=cfg, start_scheduler=False)
        widths.clear()
        marks.clear()
        try:
            start = start or adapters.clone_adapter(s.model, TRAIN)
            s.engine.graphs = graphs
            s.engine.micro_batch_tokens = 160  # several micro-batches per step, some of two examples
            monkeypatch.setattr(E, "collate", recording_collate)
            monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
            r = s.engine.train_round([fact(i) for i in range(3)], batch_size=3)
            monkeypatch.undo()
            assert r.steps == 3 and not r.preempted
            if graphs:
                # after the first graphed steps the heap is frozen once (no full-collection pauses)
                frozen = gc.get_freeze_count()
                gc.unfreeze()  # before asserting: a failure must not leave the test session frozen
                assert s.engine._heap_frozen and frozen > 0
                assert all(p.grad is not None and not p.grad.any() for p in s.engine._trainable())
                # every micro-batch padded to a graph shape (rows: a power of two, at least 2;
                # the length: a multiple of 64) and marked as a new graph iteration
                assert len(widths) > 3 and all(r in (2, 4) and r >= n and w % 64 == 0 for n, r, w, _ in widths)
                assert any(r > n for n, r, _, _ in widths) and len(marks) == len(widths)
                assert s.engine._recorded == {(r, w) for _, r, w, _ in widths}
            else:  # as they are: no empty rows, no padding past the longest
                assert all(r == n and w == longest for n, r, w, longest in widths)
                assert not marks and not s.engine._heap_frozen
            trained.append(adapters.clone_adapter(s.model, TRAIN))
        finally:
            s.close()
    assert trained[0].keys() == trained[1].keys()
    moved = max(float((trained[0][k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # (Adam steps of ~lr each; the paths differ by float rounding only)
    for k in trained[0]:
        torch.testing.assert_close(trained[0][k], trained[1][k], rtol=1e-4, atol=moved * 1e-2)


def test_heap_settles_after_rounds_that_compiled(svc, monkeypatch):
    """Graph mode: one full collection and a freeze after the first graphed steps, then again
    only after a round during which something was compiled; and while torch compiles, no full
    collection runs (young ones do)."""
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    import idletune.gpu.training as T
    from idletune.gpu.training import _gc_hold_end, _gc_hold_start, _hold_full_collections, compilations

    _hold_full_collections()
    callback_handler.remove_start_callback(_gc_hold_start)  # as torch._dynamo.reset() drops them
    callback_handler.remove_end_callback(_gc_hold_end)
    _hold_full_collections()  # registered again
    _hold_full_collections()  # and once only
    assert callback_handler.start_callbacks.count(_gc_hold_start) == 1
    assert callback_handler.end_callbacks.count(_gc_hold_end) == 1
    before, threshold = compilations(), gc.get_threshold()
    with callback_handler.install_callbacks(CallbackTrigger.DYNAMO, "test"):
        assert gc.get_threshold()[:2] == threshold[:2] and gc.get_threshold()[2] >= 1 << 30
    assert gc.get_threshold() == threshold and compilations() == before + 1
    with pytest.raises(RuntimeError):  # a compilation that fails restores the threshold too
        with callback_handler.install_callbacks(CallbackTrigger.DYNAMO, "test"):
            raise RuntimeError("inductor failed")
    assert gc.get_threshold() == threshold and compilations() == before + 2

    collected, count = [], [0]
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(1) or 0)
    monkeypatch.setattr(gc, "freeze", lambda: None)  # the test session's heap stays as it is
    eng = svc.engine
    monkeypatch.setattr(T, "compilations", lambda: count[0])  # what the engine reads
    eng.graphs = True
    eng._settle_heap(2)
    assert not collected  # compiling and recording take the first steps
    eng._settle_heap(1)
    assert len(collected) == 1 and eng._heap_frozen
    eng._settle_heap(5)
    assert len(collected) == 1  # nothing compiled since
    count[0] += 1  # a new batch shape compiled during the round
    eng.should_yield = lambda: True  # ... and the round ended for a request: not now
    eng._settle_heap(1)
    assert len(collected) == 1
    eng.should_yield = lambda: False
    eng._settle_heap(1)
    assert len(collected) == 2


def test_new_graph_shapes_wait_for_the_user_to_be_away(svc, monkeypatch):
    """With CUDA-graphed layers a shape not recorded yet is recorded only after
    AWAY_AFTER_S with no request; until then the smallest recorded shape that holds the
    micro-batch serves it (within the token limit, however much larger: run DI)."""
    from idletune.training.data import IGNORE, Encoded
    from idletune.training.engine import AWAY_AFTER_S

    def part(rows, length):
        return [Encoded(i, [5] * length, [IGNORE] + [5] * (length - 1), "text") for i in range(rows)]

    eng = svc.engine
    idle = [1.0]
    monkeypatch.setattr(eng, "graphs", True)
    monkeypatch.setattr(eng, "idle_for", lambda: idle[0])
    monkeypatch.setattr(eng, "micro_batch_tokens", 16384)
    monkeypatch.setattr(eng, "_recorded", {(8, 512), (16, 512), (4, 384)})
    assert eng._shape(part(8, 500)) == (8, 512)  # recorded
    assert eng._shape(part(4, 300)) == (4, 384)  # (4, 320) is not: the smallest that holds it
    assert eng._shape(part(3, 400)) == (8, 512)  # (4, 448) is not recorded
    assert eng._shape(part(2, 100)) == (4, 384)  # 6 × its area: still no recording while the user is active
    eng.micro_batch_tokens = 2048
    assert eng._shape(part(3, 400)) == (4, 448)  # (8, 512) is over the token limit
    eng.micro_batch_tokens = 1024
    assert eng._shape(part(1, 600)) == (1, 640)  # alone over half the limit: no empty row
    assert eng._shape(part(1, 400)) == (2, 448)  # under half: 2 rows (no batch-of-one compilation)
    idle[0] = AWAY_AFTER_S
    eng.micro_batch_tokens = 16384
    assert eng._shape(part(4, 300)) == (4, 320)  # the user is away: its own shape, recorded now
    monkeypatch.setattr(eng, "graphs", False)
    assert eng._shape(part(3, 300)) == (3, 300)


def test_gpu_micro_batches_are_sized_to_the_free_memory():
    """training.micro_batch_tokens = 0 on a GPU: as many tokens as half the free memory holds
    (a power of two within 512–16384), so a 32-example batch after long idle cannot run the card
    out of memory; the estimate per token matches what runs AQ–AT measured (8 × 512 tokens)."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, Qwen2Config

    from idletune.training.engine import gpu_micro_batch_tokens

    def shape(h, i, n, cls=Qwen2Config):
        return SimpleNamespace(config=cls(hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                                          num_attention_heads=8, num_key_value_heads=2))

    q15 = shape(1536, 8960, 28)
    assert gpu_micro_batch_tokens(q15, 80e9) == 16384  # an H100 with the model loaded: unchanged
    assert gpu_micro_batch_tokens(q15, 18e9) == 4096  # a 24 GB card: a 32 × 512 batch in 4 parts
    assert gpu_micro_batch_tokens(q15, 1e9) == 512  # never below
    assert gpu_micro_batch_tokens(q15, 18e9, checkpointing=True) == 16384  # layer inputs only
    assert gpu_micro_batch_tokens(q15, 18e9, compiled=False) == 2048  # eager layers keep more
    assert gpu_micro_batch_tokens(q15, 18e9, head_logits=True) == 2048  # a training output layer's logits
    # measured peak from start of a graphed 8 × 512 step (MB) vs the estimate for 4096 tokens
    measured = {(896, 4864, 24): 4045, (1536, 8960, 28): 7864, (4096, 14336, 32): 18600}
    for (h, i, n), mb in measured.items():
        per_token = 2 * n * (6 * h + 3 * i)
        assert abs(4096 * per_token / 2**20 - mb) / mb < 0.1
        m = shape(h, i, n, LlamaConfig)
        assert gpu_micro_batch_tokens(m, 2 * 4096 * per_token) == 4096  # the step fits in half the free memory
        assert gpu_micro_batch_tokens(m, 2 * 4096 * per_token - 1) == 2048  # it does not: rounded down


def test_a_trainer_process_takes_fewer_tokens_a_part_for_a_large_model():
    """A trainer process's automatic size takes at most 2048 tokens and at most about 7 GiB of
    activations: 2048 at the Qwen2.5-0.5B, 1.5B and 3B shapes, 1024 from about 7B (2048-token parts
    at 8B took 21.6 % of the plain PEFT loop's peak there, 1024-token ones 11.2 %: run FI; at 3B
    1024-token ones cost 17 % of the speed: run FP), never under 512; the serving side's
    RemoteEngine takes it from its model (no process started)."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, Qwen2Config

    from idletune.training.engine import PROCESS_ACTIVATION_BYTES, activation_bytes_per_token, process_most_tokens
    from idletune.training.remote import RemoteEngine

    def shape(h, i, n, cls=Qwen2Config, vocab=151936):
        return SimpleNamespace(config=cls(hidden_size=h, intermediate_size=i, num_hidden_layers=n, vocab_size=vocab,
                                          num_attention_heads=8, num_key_value_heads=2))

    q05, q15, l8 = shape(896, 4864, 24), shape(1536, 8960, 28), shape(4096, 14336, 32, LlamaConfig, 128256)
    assert [process_most_tokens(m) for m in (q05, q15, l8)] == [2048, 2048, 1024]
    assert 1024 * activation_bytes_per_token(l8) <= PROCESS_ACTIVATION_BYTES < 2048 * activation_bytes_per_token(l8)
    assert process_most_tokens(shape(2048, 11008, 36)) == 2048  # Qwen2.5-3B: 3.26 MB a token
    assert process_most_tokens(shape(3584, 18944, 28)) == 1024  # Qwen2.5-7B: 4.39 MB
    assert process_most_tokens(shape(8192, 28672, 80, LlamaConfig)) == 512  # a 70B shape: never below 512
    tiny = SimpleNamespace(config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4), parameters=lambda: iter([torch.zeros(1)]))
    assert RemoteEngine(tiny, None, None, lock=SimpleNamespace(), model_dir="x", activity=None).auto_most_tokens == 2048


def test_the_automatic_micro_batch_is_set_once_at_the_first_step(svc, monkeypatch):
    """On a GPU the automatic size is taken at the first step (the decoder's KV cache and serving
    copies are allocated by then), from the free memory plus what torch's allocator holds unused,
    less the gradients and optimizer state to come. (The CUDA memory queries are stand-ins here.)"""
    from idletune.training.engine import gpu_micro_batch_tokens
    from idletune.training.data import encode

    eng = svc.engine
    cfg = eng.model.get_base_model().config
    per_token = 2 * cfg.num_hidden_layers * (6 * cfg.hidden_size + 3 * cfg.intermediate_size)
    free = 2 * 4096 * per_token  # 4096 tokens fit exactly, before the state to come is counted
    calls = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: calls.append(1) or (free - 1000, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2000)
    monkeypatch.setattr(eng, "micro_batch_tokens", 0)
    monkeypatch.setattr("idletune.gpu.training.layers_compiled", lambda model: True)  # as on a GPU
    batch = [encode(fact(i), eng.tokenizer, 128) for i in range(3)]
    eng._micro_batches(batch)
    eng._micro_batches(batch)
    assert gpu_micro_batch_tokens(eng.model, free) == 4096
    assert eng.micro_batch_tokens == 2048 and len(calls) == 1
    # a switch of weight set (hybrid mode) trains other tensors: sized and recorded again
    monkeypatch.setattr(eng, "device", torch.device("cuda"))
    monkeypatch.setattr(eng, "_recorded", {(2, 64)})
    eng.set_weights(eng.ws)
    assert eng.micro_batch_tokens == 0 and not eng._recorded
    # a driver that cannot say how much is free: a fixed size, and training goes on

    def unknown(device=None):
        raise RuntimeError("not supported")
    monkeypatch.setattr(torch.cuda, "mem_get_info", unknown)
    eng._micro_batches(batch)
    assert eng.micro_batch_tokens == 4096
    # a trainer process's engine takes at most the cap the serving side sends it (2048 shipped)
    monkeypatch.setattr(eng, "auto_most_tokens", 1024)
    eng.micro_batch_tokens = 0
    eng._micro_batches(batch)
    assert eng.micro_batch_tokens == 1024  # the memory unknown
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free - 1000, 80 * 2**30))
    eng.set_weights(eng.ws)
    eng._micro_batches(batch)
    assert eng.micro_batch_tokens == 1024  # 2048 fit


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own, compiling
@pytest.mark.parametrize("dynamic_dims", [True, False], ids=["marked", "unmarked"])
def test_compiled_layers_compile_once_for_every_batch_size_and_length(tmp_path, tiny_model_dir, dynamic_dims):
    """The compiled training layers mark their inputs' batch and length dimensions dynamic: one
    compilation serves rounds of other batch sizes and lengths. Left to dynamo (unmarked), a new
    length and a new batch size each compiled again — tens of seconds at 1.5B on a GPU, with
    the interpreter lock held (docs/BENCHMARKS.md, run AP). Dynamo's own backend here, so the
    CPU does not build kernels; what gets compiled, and when, is dynamo's decision either way."""
    from torch._dynamo.utils import counters

    from idletune.gpu.training import compile_layers
    from idletune.training.data import encode

    cfg = Config.load(None, {"training.max_steps": 1, "training.target_loss": 0.0, "training.replay_examples": 0})
    s = build_service(tmp_path / "data", model=tiny_model_dir, config=cfg, start_scheduler=False)
    torch._dynamo.reset()
    try:
        compile_layers(s.model, dynamic_dims=dynamic_dims, backend="aot_eager")
        s.engine.graphs = True  # bucketed shapes, as with CUDA graphs
        before = counters["stats"]["unique_graphs"]
        long_text = TrainingExample.from_text("Owls nest in hollow trees and old barns. " * 12)
        long_text.id = 50
        shapes, compiled = [], []
        for examples in ([fact(0), fact(1)], [fact(i) for i in range(3)], [fact(0), long_text]):
            shapes.append(s.engine._shape([encode(e, s.tokenizer, 512) for e in examples]))
            assert s.engine.train_round(examples, batch_size=len(examples)).steps == 1
            compiled.append(counters["stats"]["unique_graphs"] - before)
        assert shapes == [(2, 64), (4, 64), (2, 128)]
        # the first round compiles two entries (the first layer's input carries no gradient,
        # the others' do); with marks nothing more, without them as much again per new shape
        assert compiled[0] == 2
        assert compiled == ([2, 2, 2] if dynamic_dims else [2, 4, 6])
    finally:
        s.close()
        torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own, compiling
def test_layers_compiled_in_units_train_the_same_weights_with_a_boundary_per_unit(tmp_path, default_model_dir):
    """With small micro-batches several consecutive layers are compiled as one unit: one call from
    Python and one preemption boundary per unit, not per layer (the host's time per layer call
    limited such steps on a GPU, docs/BENCHMARKS.md). What is learned stays the same, a request
    still stops a step at a unit's end, and evaluation runs (and can stop at) every layer."""
    from conftest import make_tiny_llama
    from idletune.gpu.training import compile_layers, layers_per_unit

    assert [layers_per_unit(n) for n in (0, 256, 1024, 2048, 3000, 4096, 8192, 16384)] == [1, 8, 8, 4, 2, 2, 1, 1]
    model_dir = make_tiny_llama(tmp_path / "tiny5", default_model_dir, layers=5)
    cfg = Config.load(None, {"training.max_steps": 2, "training.target_loss": 0.0, "training.lora.dropout": 0.0,
                             "training.warmup_steps": 0, "training.replay_examples": 0})
    trained, counted, start = [], [], None
    torch._dynamo.reset()
    try:
        for per_unit in (None, 2):  # eager, layer by layer; then units of 2, 2 and 1 layers
            torch.manual_seed(0)
            s = build_service(tmp_path / f"data{per_unit}", model=model_dir, config=cfg, start_scheduler=False)
            try:
                if per_unit:
                    assert compile_layers(s.model, layers_per_unit=per_unit, backend="aot_eager") == 5
                start = start or adapters.clone_adapter(s.model, TRAIN)
                eng, n, layers = s.engine, {"boundaries": 0}, []
                real_boundary = eng._boundary

                def boundary(queue=True, layers=None):
                    n["boundaries"] += 1
                    seen.append(layers)
                    real_boundary(queue, layers)
                eng._boundary = boundary
                seen = layers
                r = eng.train_round([fact(0), fact(1)], batch_size=2)
                assert r.steps == 2 and not r.preempted
                # each boundary's layers of work, forward (each unit's own) then backward (the
                # unit after it, whose backward the boundary closes: past the last, 1)
                assert layers == 2 * ([2, 2, 1, 1, 1, 2] if per_unit else [1] * 10)
                seen = []
                trained.append(adapters.clone_adapter(s.model, TRAIN))
                per_step, n["boundaries"] = n["boundaries"] / 2, 0
                eng.evaluate([fact(0)], LIVE)
                counted.append((per_step, n["boundaries"]))
                # a request during the step: stopped at the second boundary, nothing kept
                eng.should_yield = lambda: n["boundaries"] >= 2
                n["boundaries"] = 0
                r = eng.train_round([fact(2)])
                assert r.preempted and r.steps == 0 and n["boundaries"] == 2
                assert all(p.grad is None for p in eng._trainable())
            finally:
                s.close()
    finally:
        torch._dynamo.reset()
    # per step: forward and backward, at 5 layers, then at 3 units; evaluation: every layer
    assert counted == [(10, 5), (6, 5)]
    moved = max(float((trained[0][k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3
    for k in trained[0]:
        torch.testing.assert_close(trained[0][k], trained[1][k], rtol=1e-4, atol=moved * 1e-2)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's, compiling
def test_regrouped_units_keep_recomputing_cheap_activations(tmp_path, default_model_dir):
    """A trainer process compiles its layers for bounded memory (units of 4, cheap activations
    recomputed) and, on a card where the automatic size comes out smaller (1024 tokens), regroups
    them into larger units at the first step: still recomputing, the memory it was sized for."""
    from conftest import make_tiny_llama
    from idletune.gpu.training import compile_layers, regroup_units
    from idletune.models import load_model

    model, _ = load_model(make_tiny_llama(tmp_path / "tiny5", default_model_dir, layers=5))
    layers = adapters.decoder_layers(model)

    def units():  # layers a unit, as each unit's first layer records it
        return [layer.forward._idletune_layers for layer in layers if hasattr(layer.forward, "_idletune_layers")]
    compile_layers(model, layers_per_unit=4, recompute_cheap=True, backend="aot_eager")
    assert units() == [4, 1]
    assert regroup_units(model, 8)
    assert units() == [5]
    assert layers[0].forward._idletune_compilation.recompute_cheap


def test_the_automatic_micro_batch_size_regroups_compiled_layers_into_units_before_the_first_pass(
        tmp_path, default_model_dir, caplog):
    """With the automatic size (a GPU's default) the service compiles layer by layer; at the first
    step, once the engine has taken its size, a small size regroups the layers into units as a
    size set would (2048 tokens: units of 4 and 1 layers), a large one leaves them one by one.
    The same weights are learned as eagerly. A later re-sizing (after a switch of weight set)
    keeps the units: a compiled pass has run by then. (The size from the free GPU memory is a
    stand-in here.)"""
    from conftest import make_tiny_llama
    from idletune.gpu.training import compile_layers
    from idletune.training.data import encode

    model_dir = make_tiny_llama(tmp_path / "tiny5", default_model_dir, layers=5)
    cfg = Config.load(None, {"training.max_steps": 2, "training.target_loss": 0.0, "training.lora.dropout": 0.0,
                             "training.warmup_steps": 0, "training.replay_examples": 0})
    assert cfg.training.max_seq_len <= 2048  # units are sized for the longer of it and the micro-batch size
    trained, counted, start = [], [], None
    torch._dynamo.reset()
    try:
        for compiled in (False, True):
            torch.manual_seed(0)
            s = build_service(tmp_path / f"data{compiled}", model=model_dir, config=cfg, start_scheduler=False)
            try:
                eng, layers = s.engine, adapters.decoder_layers(s.model)
                start = start or adapters.clone_adapter(s.model, TRAIN)
                if compiled:
                    assert compile_layers(s.model, backend="aot_eager") == 5
                    eng.micro_batch_tokens, eng._free_memory_micro_batch = 0, lambda: 16384
                    forwards = [layer.forward for layer in layers]
                    eng._micro_batches([encode(fact(0), eng.tokenizer, 128)])
                    assert eng.micro_batch_tokens == 16384
                    assert [layer.forward for layer in layers] == forwards  # one by one
                    eng.micro_batch_tokens, eng._free_memory_micro_batch = 0, lambda: 2048
                seen, real_boundary = [], eng._boundary
                eng._boundary = lambda queue=True, layers=None: seen.append(layers) or real_boundary(queue, layers)
                with caplog.at_level("INFO", logger="idletune.training"):
                    assert eng.train_round([fact(0), fact(1)], batch_size=2).steps == 2
                counted.append(seen)
                trained.append(adapters.clone_adapter(s.model, TRAIN))
                if compiled:
                    assert "training: 4 layers a unit for the automatic micro-batches of 2048 tokens" in caplog.text
                    # sized again (as after a switch of weight set), smaller: a compiled pass
                    # has run, the units stay (1024 tokens alone would make one unit of 5)
                    eng.micro_batch_tokens, eng._free_memory_micro_batch = 0, lambda: 1024
                    counted.append(seen := [])
                    assert eng.train_round([fact(0), fact(1)], batch_size=2).steps == 2
                    assert eng.micro_batch_tokens == 1024
            finally:
                s.close()
    finally:
        torch._dynamo.reset()
    # each step's boundaries with the layers of work each closes, forward (each unit's own) then
    # backward (the unit after it: past the last, 1): every layer eagerly; in units of 4 and 1
    # from the first step on, and still after the re-sizing
    assert counted == [2 * [1] * 10, 2 * [4, 1, 1, 1], 2 * [4, 1, 1, 1]]
    moved = max(float((trained[0][k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3
    for k in trained[0]:
        torch.testing.assert_close(trained[0][k], trained[1][k], rtol=1e-4, atol=moved * 1e-2)


def test_units_never_mix_attention_kinds_or_unknown_decoder_loops(svc, monkeypatch):
    """A unit's layers all take its first layer's arguments: units break where the attention
    kind changes (full vs sliding window: other masks, in Gemma 3 other rotary embeddings), and
    a model type whose decoder loop is not known to pass every layer of a kind the same
    arguments (e.g. Gemma 3n's inputs per layer) compiles layer by layer."""
    import idletune.gpu.training as G

    kinds = ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention",
             "full_attention"]
    assert G._units(list(range(6)), 2, kinds) == [[0], [1, 2], [3], [4, 5]]
    assert G._units(list(range(6)), 4) == [[0, 1, 2, 3], [4, 5]]
    sizes = []
    monkeypatch.setattr(G, "_compile_unit", lambda unit, *a: sizes.append(len(unit)))
    assert G.compile_layers(svc.model, layers_per_unit=2) == 2 and sizes == [2]  # a Llama
    sizes.clear()
    monkeypatch.setattr(svc.model.get_base_model().config, "model_type", "gemma3n_text")
    assert G.compile_layers(svc.model, layers_per_unit=2) == 2 and sizes == [1, 1]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own, compiling
def test_bounded_memory_keeps_fewer_activations_and_the_dropout_masks(tmp_path, tiny_model_dir):
    """With ``recompute_cheap`` (the service's choice when micro_batch_tokens is set) the
    compiler's partitioner recomputes cheap activations in the backward pass instead of keeping
    them: fewer bytes kept per step. Dropout's masks are still kept, never drawn afresh in the
    backward pass (other masks than the forward's: wrong gradients); and the same weights are
    learned. Here with the compiler's own partitioner and no kernels built (the CPU)."""
    from idletune.gpu.training import compile_layers

    kept, trained, start = [], [], None
    torch._dynamo.reset()
    try:
        for dropout, cheap in ((0.05, False), (0.05, True), (0.0, None), (0.0, True)):
            cfg = Config.load(None, {"training.max_steps": 2, "training.target_loss": 0.0, "training.warmup_steps": 0,
                                     "training.replay_examples": 0, "training.lora.dropout": dropout})
            torch.manual_seed(0)
            s = build_service(tmp_path / f"data{dropout}{cheap}", model=tiny_model_dir, config=cfg,
                              start_scheduler=False)
            try:
                if cheap is not None:  # None: eager
                    compile_layers(s.model, recompute_cheap=cheap, backend="aot_eager_decomp_partition")
                params = {p.data_ptr() for p in s.model.parameters()}
                saved = []  # every tensor kept for a backward pass (weights aside), as it is kept

                def pack(t):
                    if t.data_ptr() not in params:
                        saved.append((t.dtype, t.numel() * t.element_size()))
                    return t
                start = start or adapters.clone_adapter(s.model, TRAIN)
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    assert s.engine.train_round([fact(0), fact(1)], batch_size=2).steps == 2
                kept.append((sum(n for _, n in saved), sum(d == torch.bool for d, _ in saved)))
                trained.append(adapters.clone_adapter(s.model, TRAIN))
            finally:
                s.close()
                torch._dynamo.reset()
    finally:
        torch._dynamo.reset()
    (plain, plain_masks), (cheap, cheap_masks) = kept[0], kept[1]
    assert cheap < 0.9 * plain, kept
    assert cheap_masks >= plain_masks > 0, kept  # boolean tensors kept: dropout's masks among them
    # the same masks drawn in the forward pass, then used in the backward pass: the same weights
    # as without the option (masks drawn afresh in the backward pass would train others)
    for a, b in ((0, 1), (2, 3)):  # and without dropout, the same as eager
        for k in trained[a]:
            torch.testing.assert_close(trained[a][k], trained[b][k], rtol=1e-4, atol=1e-5)


def test_service_marks_the_engine_for_graphed_layers(tmp_path, tiny_model_dir, monkeypatch):
    """Where training.compile asks for graphs, the layers are compiled with graphs *and* the
    engine runs in graph mode (padding, iteration marks, its own gradient accumulation): graphs
    without graph mode lost gradient contributions on a GPU (docs/BENCHMARKS.md, runs K, L).
    With micro_batch_tokens set (bounded memory) the layers are compiled in units and keep fewer
    activations; with the automatic size (a trainer thread's), one layer a unit and the
    partitioner's default."""
    import idletune.gpu.training as G

    calls = []
    monkeypatch.setattr(G, "wanted", lambda setting, model, fast_path=True: "graphs")
    monkeypatch.setattr(G, "compile_layers", lambda model, graphs=False, layers_per_unit=1, recompute_cheap=False:
                        calls.append((graphs, layers_per_unit, recompute_cheap)) or 2)
    for tokens, expected in ((0, (True, 1, False)), (2048, (True, 4, True))):
        cfg = Config.load(None, {"training.micro_batch_tokens": tokens})
        s = build_service(tmp_path / f"data{tokens}", model=tiny_model_dir, config=cfg, start_scheduler=False)
        try:
            assert calls.pop() == expected and s.engine.graphs
        finally:
            s.close()


def test_bounded_memory_is_the_trainer_process_default_on_a_gpu(tmp_path, tiny_model_dir, monkeypatch):
    """The layers compile for bounded memory (units, cheap activations recomputed) where
    micro_batch_tokens is set, and for the automatic size where it is bounded: in a trainer
    process on a GPU, at most 2048 tokens, which the trainer process is sent (its chat tail
    measured +1.42 to +1.80 ms at p99 against +0.56 to +1.50 ms unsplit, runs EQ–EY). A trainer
    thread keeps the automatic size unsplit, layer by layer (its tail was measured worse, runs
    DP–DS), and so does a CPU, whatever the trainer."""
    import multiprocessing

    from idletune.service import training_compile_args
    from idletune.training.remote import RemoteEngine

    def args(tokens=0, auto=2048, max_seq_len=512, how="graphs"):
        tc = Config.load(None, {"training.micro_batch_tokens": tokens, "training.max_seq_len": max_seq_len}).training
        a = training_compile_args(tc, how, auto_tokens=auto)
        return a["graphs"], a["layers_per_unit"], a["recompute_cheap"]

    assert args() == (True, 4, True)
    assert args(auto=0) == (True, 1, False)
    assert args(1024, auto=0) == args(1024) == (True, 8, True)
    assert args(max_seq_len=4096) == (True, 2, True)  # one example alone makes a part that long
    assert args(how="compile") == (False, 4, True)
    # a trainer process on a CPU, layers compiled where asked: unsplit (512-token parts there)
    ctx, sent = multiprocessing.get_context("spawn"), []
    real = ctx.Process
    monkeypatch.setattr(ctx, "Process", lambda *a, **kw: sent.append(kw["args"]) or real(*a, **kw))
    cfg = Config.load(None, {"training.trainer": "process", "training.compile": "on"})
    s = build_service(tmp_path / "data", model=tiny_model_dir, config=cfg, start_scheduler=False)
    try:
        assert isinstance(s.engine, RemoteEngine)
        assert s.engine.compile_layers == {"graphs": False, "layers_per_unit": 1, "recompute_cheap": False}
        s.engine.start()
        (sent,) = sent
        assert sent[-4:-2] == (s.engine.compile_layers, 2048)  # the cap, sent (used on a GPU)
    finally:
        s.close()


def test_training_compile_setting_on_the_cpu():
    """training.compile: "auto" leaves CPU training eager (graphs only where CUDA and the GPU
    serving path are); "on" compiles anywhere; "graphs" without CUDA compiles without graphs."""
    from idletune.gpu.training import wanted

    model = torch.nn.Linear(2, 2)
    assert wanted("auto", model) is None and wanted("off", model) is None
    assert wanted("on", model) == "compile" and wanted("graphs", model) == "compile"
    with pytest.raises(ValueError, match="training.compile"):
        Config.load(None, {"training.compile": "fast"})


def test_retention_probes_never_set_the_shared_tokenizer_padding(tiny_model_dir):
    """A fast tokenizer keeps its padding setting on the one object every thread uses: a batch
    padded by it while a request's or an import's call turned padding off came out ragged
    ("expected sequence of length 37 at dim 1 (got 40)"). The probes pad themselves."""
    from idletune.models import load_model
    from idletune.training.probes import record_probes

    model, tok = load_model(tiny_model_dir)
    calls = []
    real_call = type(tok).__call__

    class Spy(type(tok)):
        def __call__(self, *args, **kwargs):
            calls.append(kwargs)
            return real_call(self, *args, **kwargs)
    tok.__class__ = Spy
    probes = record_probes(model, tok, 4, max_new_tokens=4)
    assert calls and not any(kw.get("padding") for kw in calls)
    assert len(probes) == 4 and tok.padding_side == "right"


def test_probes_cut_off_by_the_token_limit_train_and_measure_without_an_end_of_turn(tmp_path, tiny_model_dir):
    """A probe answer cut off at ``max_new_tokens`` ended with an end-of-turn token where the base
    model wanted to go on: about 10 nats on that one token, a third of the probes' loss, and
    replaying it taught the model to stop in the middle of its answers. Probes recorded that way
    (no ``format``) are recorded again; the gate's and the rehearsal's are disjoint."""
    import json

    from idletune.models import load_model
    from idletune.training import probes as probes_mod
    from idletune.training.data import encode

    model, tok = load_model(tiny_model_dir)
    path = tmp_path / "probes.json"
    old = {"model": "m", "probes": [{"prompt": p, "answer": "Cut off in the mid"} for p in probes_mod.PROMPTS[:6]]}
    path.write_text(json.dumps(old))
    ps = probes_mod.load_or_record(path, model, tok, 6, "m", rehearsal=3)
    data = json.loads(path.read_text())
    assert data["format"] == probes_mod.FORMAT and all("complete" in p for p in data["probes"])
    assert len(ps.gate) == 3 and len(ps.rehearsal) == 3 + 3
    assert not {e.messages[0]["content"] for e in ps.gate} & {e.messages[0]["content"] for e in ps.rehearsal}
    assert {e.messages[0]["content"] for e in ps.rehearsal} >= set(probes_mod.REHEARSAL_PROMPTS[:3])
    # a random 2-layer model seldom stops within 48 tokens: its answers are cut off
    cut = [e for e in ps.gate + ps.rehearsal if e.metadata.get("open_end")]
    assert cut
    for e in ps.gate + ps.rehearsal:
        labels = encode(e, tok, 512).labels
        assert (labels[-1] == tok.eos_token_id) == (not e.metadata.get("open_end"))
    # what a complete answer is, read from what was generated
    data["probes"][0].update(answer="Paris.", complete=True)
    data["probes"][1].update(complete=False)
    path.write_text(json.dumps(data))
    again = probes_mod.load_or_record(path, model, tok, 6, "m", rehearsal=3)
    assert not again.rehearsal[0].metadata.get("open_end") and again.gate[0].metadata.get("open_end")
    assert encode(again.rehearsal[0], tok, 512).labels[-1] == tok.eos_token_id


def test_cut_off_probe_answers_are_told_from_complete_ones(default_model_dir):
    """On the real default model: an answer that ended is complete, one the token limit cut is not."""
    from idletune.models import load_model
    from idletune.training.probes import record_probes

    model, tok = load_model(default_model_dir)
    probes = record_probes(model, tok, 8, max_new_tokens=12)
    assert {p["complete"] for p in probes} == {True, False}, probes
    for p in probes:
        ids = tok(p["answer"], add_special_tokens=False)["input_ids"]
        assert p["complete"] or len(ids) >= 11, p  # cut only where the limit was reached


def test_the_base_models_retention_loss_is_measured_again_for_new_probes(tmp_path, tiny_model_dir):
    """BASELINE.json keeps the base model's retention loss with the probes it was measured on;
    probes recorded again (another format, count or model) are measured again, not compared
    with a figure measured on other text."""
    import json

    from idletune.training import probes as probes_mod

    cfg = Config.load(None, {"gate.num_retention_probes": 4, "training.rehearsal_probes": 2})
    s = build_service(tmp_path / "d", model=tiny_model_dir, config=cfg, start_scheduler=False)
    try:
        gate = s.probes().gate
        f = tmp_path / "d" / "snapshots" / "BASELINE.json"
        f.write_text(json.dumps({"retention_loss": 123.0}))  # measured on probes of another time
        measured = s.weights._base_retention(s.engine, gate)
        assert measured != 123.0 and abs(measured - s.engine.evaluate(gate, LIVE)) < 1e-4
        kept = json.loads(f.read_text())
        assert kept == {"retention_loss": measured, "probes": probes_mod.fingerprint(gate)}
        f.write_text(json.dumps(dict(kept, retention_loss=1.5)))
        s.weights._baselines.clear()
        assert s.weights._base_retention(s.engine, gate) == 1.5  # the same probes: read, not measured
    finally:
        s.close()


def test_live_weights_past_the_retention_limit_when_the_probes_are_measured_anew_go_on_learning(tmp_path, tiny_model_dir):
    """The limit counts from the base model. Probes measured anew (an upgrade corrected them) can
    find the live weights past it already, and every later round was refused: the live weights'
    loss then is kept as a ceiling that updates may reach, not pass."""
    import json

    from idletune.training import probes as probes_mod

    cfg = Config.load(None, {"gate.num_retention_probes": 4, "training.rehearsal_probes": 0, "gate.heldout_examples": 0,
                             "gate.max_retention_loss_increase": 0.2})
    s = build_service(tmp_path / "d", model=tiny_model_dir, config=cfg, start_scheduler=False)
    try:
        gate = s.probes().gate
        base = s.engine.evaluate(gate, LIVE)  # v0: the base model
        with s.weights.lock:  # a v1 far from the base model
            noisy = {k: t + 3.0 * torch.randn_like(t) for k, t in adapters.adapter_tensors(s.model, TRAIN).items()}
            adapters.load_adapter_tensors(s.model, TRAIN, noisy)
        s.weights.publish()
        live = s.engine.evaluate(gate, LIVE)
        assert live > 1.2 * base
        f = tmp_path / "d" / "snapshots" / "BASELINE.json"
        f.write_text(json.dumps({"retention_loss": base / 2}))  # measured on the probes of an earlier version
        s.weights._baselines.clear()
        assert abs(s.weights._base_retention(s.engine, gate) - base) < 1e-4  # measured anew, on the base model
        kept = json.loads(f.read_text())
        assert kept["probes"] == probes_mod.fingerprint(gate) and abs(kept["ceiling"] - live) < 1e-4
        d = s.weights.evaluate(s.engine, gate, [])  # the candidate is the live weights: adds nothing
        assert d.accepted and "the live weights had when the probes were measured anew" in d.reason, d
        # a ceiling below the candidate's loss: refused, and the reason says what was allowed
        f.write_text(json.dumps(dict(kept, ceiling=(1.2 * base + live) / 2)))
        s.weights._baselines.clear()
        worse = s.weights.evaluate(s.engine, gate, [])
        assert not worse.accepted and "allowed, the live weights' when the probes were measured anew" in worse.reason
    finally:
        s.close()


def test_probes_of_an_earlier_version_are_kept_where_the_base_model_is_gone(tmp_path, tiny_model_dir):
    """In full fine-tuning, or on an adapter's merged base, the model with its adapters disabled is
    trained weights: probes recorded again from it would move the gate's anchor. Probes of an
    earlier form are brought up to this one's instead (an answer as long as the limit was cut),
    and that the rehearsal probes are missing is said."""
    import json

    from idletune.models import load_model
    from idletune.training import probes as probes_mod

    model, tok = load_model(tiny_model_dir)
    path = tmp_path / "probes.json"
    long = " ".join(["word"] * 60)
    old = {"model": "m", "probes": [{"prompt": p, "answer": a} for p, a in
                                     zip(probes_mod.PROMPTS[:4], ["Paris.", long, "42.", long])]}
    path.write_text(json.dumps(old))
    problems: list[str] = []
    ps = probes_mod.load_or_record(path, model, tok, 4, "m", rehearsal=3, from_base=False, problems=problems)
    assert [e.messages[-1]["content"] for e in ps.gate] == [long, long]  # kept, not recorded again
    assert all(e.metadata.get("open_end") for e in ps.gate)
    assert [bool(e.metadata.get("open_end")) for e in ps.rehearsal] == [False, False]  # "Paris.", "42."
    assert problems and "rehearsal probes" in problems[0]
    # from the base model, the same file is recorded again
    again = probes_mod.load_or_record(path, model, tok, 4, "m", rehearsal=3)
    assert len(again.rehearsal) == 2 + 3 and json.loads(path.read_text())["rehearsal"] == 3


def test_each_round_rehearses_every_rehearsal_probe_and_trained_examples(tmp_path):
    from idletune.config import TrainingConfig
    from idletune.examples import Status
    from idletune.queue import TrainingQueue
    from idletune.training.batching import BatchManager

    q = TrainingQueue(tmp_path / "q.db")
    ids = [q.add(TrainingExample.chat([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]))
           for i in range(12)]
    q.mark_trained(ids)
    probes = [TrainingExample.chat([{"role": "user", "content": f"p{i}"}, {"role": "assistant", "content": "x"}],
                                   source="probe") for i in range(30)]
    pool = BatchManager(TrainingConfig(replay_examples=2)).replay(q, probes)
    assert [e for e in pool if e.source == "probe"] == probes
    trained = [e for e in pool if e.source != "probe"]
    assert len(trained) == 8 and all(e.status == Status.TRAINED for e in trained)
    assert BatchManager(TrainingConfig(replay_examples=0)).replay(q, probes) == []
    q.close()


def test_a_batch_replays_an_earlier_lesson_and_a_probe_in_turn():
    """Drawn evenly from forty probes and eight lessons, an import's round rehearsed a lesson in
    one step of eight and forgot the lessons taught just before it: half the replayed places
    (rounded up) go to earlier lessons while there are any."""
    from idletune.config import TrainingConfig
    from idletune.training.batching import BatchManager
    from idletune.training.data import Encoded

    def item(key):
        return Encoded(key, [1, 2, 3], [-100, 2, 3])

    todo = [item(100 + i) for i in range(6)]
    lessons, probes = [item(i) for i in range(8)], [item(None) for _ in range(40)]
    bm = BatchManager(TrainingConfig(replay_examples=2))
    for step in range(20):
        batch = bm.compose(todo, lessons + probes, 4, step)
        assert [b.key >= 100 for b in batch[:2]] == [True, True]
        assert sum(b in lessons for b in batch[2:]) == 1 and sum(b in probes for b in batch[2:]) == 1
    only_probes = bm.compose(todo, probes, 4)
    assert len(only_probes) == 4 and all(b in probes for b in only_probes[2:])
    three = BatchManager(TrainingConfig(replay_examples=3)).compose(todo, lessons + probes, 6)
    assert sum(b in lessons for b in three[3:]) == 2 and sum(b in probes for b in three[3:]) == 1
    # one replayed place: a lesson and a probe in turn, not the lessons alone
    one = BatchManager(TrainingConfig(replay_examples=1))
    assert [one.compose(todo, lessons + probes, 2, step)[-1] in lessons for step in range(4)] == [True, False] * 2


def test_a_batch_over_the_token_budget_drops_new_examples_before_its_rehearsal():
    """After long idle a batch of 32 long chunks is cut to the token budget; cut from the end, it
    lost both replayed places first and an import's round trained with no rehearsal at all."""
    from idletune.config import TrainingConfig
    from idletune.training.batching import BatchManager
    from idletune.training.data import Encoded

    todo = [Encoded(100 + i, [1] * 512, [-100] + [1] * 511, kind="text") for i in range(32)]
    lesson, probe = Encoded(1, [1] * 40, [-100] + [1] * 39), Encoded(None, [1] * 80, [-100] + [1] * 79)
    batch = BatchManager(TrainingConfig(replay_examples=2), token_budget=8192).compose(todo, [lesson, probe], 32)
    assert lesson in batch and probe in batch
    assert len(batch) == 16 and 512 * len(batch) <= 8192
