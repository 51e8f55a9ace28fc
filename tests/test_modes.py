"""Full and hybrid fine-tuning on a tiny model: the weight sets stay apart, publish and rollback
are exact, the hybrid switch keeps the served function and can go back."""
import pytest
import torch

from idletune.config import Config
from idletune.examples import TrainingExample
from idletune.service import build_service


def fact(i: int = 0) -> TrainingExample:
    ex = TrainingExample.chat([{"role": "user", "content": f"What is the code of vault {i}?"},
                               {"role": "assistant", "content": f"The code of vault {i} is {1000 + i}."}])
    ex.id = i + 1
    return ex


IDS = torch.tensor([[1, 5, 9, 200, 3000, 7]])


def logits(svc, which="live"):
    with svc.engine.lock, torch.no_grad():
        svc.weights.ws.use(which)
        svc.model.eval()
        return svc.model(input_ids=IDS).logits.clone()


def make(tmp_path, model, **overrides):
    cfg = Config.load(None, {"training.max_steps": 8, "training.target_loss": 0.0, "gate.num_retention_probes": 4,
                             "scheduler.enable_background_training": False, **overrides})
    return build_service(tmp_path / "data", model=model, config=cfg, start_scheduler=False)


def test_full_mode_trains_all_weights_apart_from_the_served_ones(tmp_path, tiny_model_dir):
    svc = make(tmp_path, tiny_model_dir, **{"training.mode": "full"})
    assert svc.weights.mode == "full"
    live0 = logits(svc)
    before = svc.engine.evaluate([fact()], "candidate")
    svc.engine.train_round([fact()])
    assert svc.engine.evaluate([fact()], "candidate") < before
    torch.testing.assert_close(logits(svc), live0, rtol=0, atol=0)  # serving still sees the accepted weights
    cand = logits(svc, "candidate")
    assert not torch.allclose(cand, live0)
    assert svc.weights.publish() == 1
    torch.testing.assert_close(logits(svc), cand, rtol=0, atol=0)
    svc.engine.train_round([fact(1)])
    svc.weights.publish()
    assert svc.engine._optimizer is not None
    assert svc.weights.rollback(1) == 1
    assert svc.engine._optimizer is None  # AdamW's moments belonged to the trajectory rolled back
    svc.weights._ring.clear()
    torch.testing.assert_close(logits(svc), cand, rtol=0, atol=0)  # bit-exact, from disk
    assert svc.weights.rollback(0) == 0
    torch.testing.assert_close(logits(svc), live0, rtol=0, atol=0)
    assert svc.weights.mode == "full"  # version 0 of full fine-tuning: the original weights, still trained whole
    svc.close()


def test_full_weights_save_as_a_hf_folder(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    svc = make(tmp_path, tiny_model_dir, **{"training.mode": "full"})
    svc.engine.train_round([fact()])
    out = svc.engine.save_model(tmp_path / "full")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, logits(svc, "candidate"), rtol=0, atol=1e-5)
    svc.close()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_snapshot_weights_get_the_mode_of_the_other_files(tmp_path, tiny_model_dir, mode):
    """safetensors writes through a temporary file of mode 0600: the weights must still get
    0666 less the umask, like meta.json beside them."""
    import os
    import stat

    umask = os.umask(0o027)
    try:
        svc = make(tmp_path, tiny_model_dir, **{"training.mode": mode})
        svc.weights.publish()
        snap = svc.data_dir / "snapshots" / "v000001"
        weights = snap / ("model.safetensors" if mode == "full" else "adapter_model.safetensors")
        assert stat.S_IMODE(weights.stat().st_mode) == stat.S_IMODE((snap / "meta.json").stat().st_mode) == 0o640
        svc.close()
    finally:
        os.umask(umask)


@pytest.mark.parametrize("trainer", ["thread", "process"])
def test_hybrid_switches_on_plateau_keeps_the_function_and_goes_back(tmp_path, tiny_model_dir, caplog, trainer):
    caplog.set_level("INFO", logger="idletune.training")
    # plateau_min_delta=1: the loss can never improve by 100 %, so the plateau is forced
    svc = make(tmp_path, tiny_model_dir, **{"training.mode": "hybrid", "training.plateau_window": 3,
                                            "training.plateau_min_delta": 1.0, "training.trainer": trainer})
    sched = svc.scheduler
    svc.queue.add(fact(0))
    assert svc.weights.mode == "lora"
    sched.run_round(forced=True)
    assert sched.last_round["accepted"]
    v1 = logits(svc)
    assert svc.weights.mode == "full" and "plateaued" in svc.weights.mode_reason
    assert svc.engine.mode == "full"
    assert "training mode switched from lora to full at version 1: LoRA loss plateaued" in caplog.text
    torch.testing.assert_close(logits(svc), v1, rtol=1e-5, atol=1e-5)  # merged: the same function
    assert (svc.data_dir / "snapshots" / "base-v000001" / "model.safetensors").exists()
    # full fine-tuning rejected by the gate → back to LoRA on the merged weights
    svc.weights.gate.max_retention_loss_increase = -1.0
    svc.queue.add(fact(1))
    sched.run_round(forced=True)
    assert not sched.last_round["accepted"]
    assert svc.weights.mode == "lora" and "rejected" in svc.weights.mode_reason
    assert "training mode switched from full to lora at version 1: full fine-tuning rejected by the gate" in caplog.text
    torch.testing.assert_close(logits(svc), v1, rtol=1e-5, atol=1e-5)
    # LoRA on the merged base trains and publishes; a restart restores base + adapter
    svc.weights.gate.max_retention_loss_increase = 10.0
    svc.queue.add(fact(2))
    sched.run_round(forced=True)
    assert sched.last_round["accepted"] and svc.weights.version == 2
    v2 = logits(svc)
    svc.close()
    again = make(tmp_path, tiny_model_dir, **{"training.mode": "hybrid", "training.trainer": trainer})
    assert again.weights.version == 2 and again.weights.base_id == "base-v000001"
    torch.testing.assert_close(logits(again), v2, rtol=1e-5, atol=1e-5)
    # and back across the merge, to the plain LoRA version 1 on the original base
    again.weights.rollback(1)
    torch.testing.assert_close(logits(again), v1, rtol=1e-5, atol=1e-5)
    assert "rolled back from version 2 to version 1 (requested)\n" in caplog.text
    again.weights.rollback(0)
    assert again.weights.base_id == "original"
    again.close()


def test_status_shows_mode_and_reason(tmp_path, tiny_model_dir):
    from idletune.server.routes_api import status_of

    svc = make(tmp_path, tiny_model_dir, **{"training.mode": "hybrid"})
    st = status_of(svc)
    assert st["mode"] == "lora" and "hybrid" in st["mode_reason"]
    svc.close()


def test_export_merged_gives_the_served_function(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from idletune.training.export import export_merged

    svc = make(tmp_path, tiny_model_dir)
    svc.engine.train_round([fact()])
    svc.weights.publish()
    out = export_merged(svc, tmp_path / "merged")
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=IDS).logits, logits(svc), rtol=1e-4, atol=1e-4)
    svc.close()


def fast_path(svc):
    """The GPU serving path's parts on the CPU: the decoder runs eagerly, no stream."""
    from idletune.gpu.decoder import FastDecoder
    from idletune.gpu.serving import attach

    dec = FastDecoder(svc.model, "live", max_len=64, use_graphs=False, served=svc.weights.ws.served)
    return attach(svc, dec, None)


def served(svc, fast):
    svc.weights.ws.use("candidate")  # the parameters show the weights in training, as between steps
    with fast.session():
        return fast.decoder.prefill(IDS[0].tolist()).clone()


def check_served(svc, fast):
    live = logits(svc)[0, -1]
    torch.testing.assert_close(served(svc, fast), live, rtol=1e-4, atol=1e-4)
    return live


def test_the_fast_path_serves_full_fine_tuning_never_the_weights_in_training(tmp_path, tiny_model_dir):
    from idletune.inference import GenerationParams

    svc = make(tmp_path, tiny_model_dir, **{"training.mode": "full"})
    fast = fast_path(svc)
    live0 = check_served(svc, fast)
    svc.engine.train_round([fact()])
    torch.testing.assert_close(served(svc, fast), live0, rtol=1e-4, atol=1e-4)  # the candidate is not served
    cand = logits(svc, "candidate")[0, -1]
    assert not torch.allclose(cand, live0, atol=1e-3)
    ws, seen = svc.weights.ws, []
    publish = ws.publish
    ws.publish = lambda: (seen.append(fast.lock.locked()), publish())  # requests wait while it copies
    svc.weights.publish()
    assert seen == [True] and svc.weights.version == fast.decoder.version == 1
    torch.testing.assert_close(check_served(svc, fast), cand, rtol=1e-4, atol=1e-4)  # merged at publish
    svc.engine.train_round([fact(1)])
    torch.testing.assert_close(served(svc, fast), cand, rtol=1e-4, atol=1e-4)  # and again not the candidate
    svc.weights.rollback(0)
    torch.testing.assert_close(check_served(svc, fast), live0, rtol=1e-4, atol=1e-4)
    # a chat reply through the fast path is the portable path's
    messages = [{"role": "user", "content": "What is the code of vault 0?"}]
    got = svc.inference.generate(messages, GenerationParams(max_tokens=8, temperature=0))
    svc.inference.fast = None
    want = svc.inference.generate(messages, GenerationParams(max_tokens=8, temperature=0))
    assert got.text == want.text and got.completion_tokens == 8
    svc.close()


def test_the_fast_path_follows_hybrid_switches_and_rollbacks(tmp_path, tiny_model_dir):
    svc = make(tmp_path, tiny_model_dir, **{"training.mode": "hybrid", "training.plateau_window": 3,
                                            "training.plateau_min_delta": 1.0})
    fast = fast_path(svc)
    v0 = check_served(svc, fast)
    addresses = fast.decoder._sig  # what the decoder's CUDA graphs would hold
    svc.queue.add(fact(0))
    svc.scheduler.run_round(forced=True)  # LoRA, published, then the plateau: full fine-tuning
    assert svc.weights.mode == "full" and svc.weights.version == 1
    v1 = check_served(svc, fast)
    assert fast.decoder._sig == addresses  # the live weights kept the base's storage: no graph captured again
    assert not torch.allclose(v1, v0, atol=1e-3)
    svc.queue.add(fact(1))
    svc.scheduler.run_round(forced=True)  # full fine-tuning, published
    assert svc.scheduler.last_round["accepted"] and svc.weights.version == 2
    v2 = check_served(svc, fast)
    assert not torch.allclose(v2, v1, atol=1e-3)
    svc.weights.gate.max_retention_loss_increase = -1.0
    svc.queue.add(fact(2))
    svc.scheduler.run_round(forced=True)  # rejected: back to LoRA on the full weights
    assert svc.weights.mode == "lora" and svc.weights.version == 2
    torch.testing.assert_close(check_served(svc, fast), v2, rtol=1e-4, atol=1e-4)
    svc.weights.rollback(1)  # across bases: LoRA version 1 on the original weights
    torch.testing.assert_close(check_served(svc, fast), v1, rtol=1e-4, atol=1e-4)
    svc.weights.rollback(2)  # and forward again, into full weights
    assert svc.weights.mode == "full"
    torch.testing.assert_close(check_served(svc, fast), v2, rtol=1e-4, atol=1e-4)
    svc.close()


def test_full_fine_tuning_of_bf16_weights_steps_float32_master_copies(tiny_model_dir):
    """On a GPU the weights are bf16, whose spacing at 1.0 is 0.0078: full fine-tuning's updates
    (learning rate 1e-4) to the norms' weights were all lost when AdamW stepped them in bf16."""
    from idletune.config import LoraConfig, TrainingConfig
    from idletune.models import load_model
    from idletune.training.adapters import attach_lora
    from idletune.training.engine import TrainingEngine
    from idletune.training.weightsets import FullWeights

    base, tok = load_model(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    model = attach_lora(base, LoraConfig())
    ws = FullWeights(model)
    eng = TrainingEngine(model, tok, TrainingConfig(max_steps=6, target_loss=0.0), weights=ws)
    norm = "model.norm.weight"
    before = ws.clone("candidate")
    eng.train_round([fact()])
    after = ws.clone("candidate")
    masters = ws._master
    assert masters and all(m.dtype == torch.float32 for m in masters.values())
    # the updates add up in float32 (a few 1e-4 so far), where bf16 kept 1.0 exactly each step
    assert (masters[norm] - before[norm].float()).abs().max() > 2e-4
    assert all(torch.equal(after[n], m.to(torch.bfloat16)) for n, m in masters.items())  # rounded into the weights
    ws.discard()  # the weights in training written another way: the master copies follow
    live = ws.clone("live")
    assert all(torch.equal(live[n], m.to(torch.bfloat16)) for n, m in masters.items())
    eng.train_round([fact()])  # and training goes on from there, not from the discarded weights
    assert ws.is_finite()


def test_after_full_fine_tuning_a_lora_publish_never_writes_into_the_base(tmp_path, tiny_model_dir):
    """In full mode the decoder serves o/down straight from the live weights; back in LoRA with
    adapters on o/down it must merge them into buffers of its own, not into those weights."""
    every = ["attention.q", "attention.k", "attention.v", "attention.o", "ffn.gate", "ffn.up", "ffn.down"]
    svc = make(tmp_path, tiny_model_dir, **{"training.mode": "hybrid", "training.lora.target_modules": every})
    fast = fast_path(svc)
    svc.weights.switch_to_full("test")
    svc.weights.switch_to_lora("test")
    base = {n: p.detach().clone() for n, p in svc.model.named_parameters() if "lora_" not in n}
    for i in range(2):
        svc.engine.train_round([fact(i)])
        svc.weights.publish()
        check_served(svc, fast)
    assert all(torch.equal(p, base[n]) for n, p in svc.model.named_parameters() if "lora_" not in n)
    svc.close()


def test_a_rollback_to_damaged_full_weights_changes_nothing(tmp_path, tiny_model_dir, monkeypatch, caplog):
    import idletune.training.weights as W

    caplog.set_level("INFO", logger="idletune.training")
    svc = make(tmp_path, tiny_model_dir, **{"training.mode": "hybrid"})
    fast = fast_path(svc)
    svc.weights.switch_to_full("test")
    svc.engine.train_round([fact()])
    svc.weights.publish()  # v1: full weights
    svc.weights.rollback(0)  # LoRA on the original weights
    assert ("rolled back from version 1 to version 0 (requested); training mode switched from full to lora"
            in caplog.text)
    svc.engine.reset_optimizer()
    svc.engine.train_round([fact(1)])
    svc.weights.publish()  # v2: LoRA
    v2 = check_served(svc, fast)
    real = W.read_base_weights

    def damaged(path, params):  # what a checksum cannot catch: the weights were written non-finite
        t = real(path, params)
        last = sorted(t)[-1]
        t[last] = t[last].clone()
        t[last].view(-1)[0] = float("nan")
        return t
    monkeypatch.setattr(W, "read_base_weights", damaged)
    with pytest.raises(ValueError, match="non-finite"):
        svc.weights.rollback(1)
    assert svc.weights.version == 2 and svc.weights.mode == "lora"
    torch.testing.assert_close(check_served(svc, fast), v2, rtol=1e-4, atol=1e-4)
    svc.close()


def test_a_rollback_while_a_round_trains_is_not_undone_by_that_round(tmp_path, tiny_model_dir):
    """A rollback (the API's thread) replaces the weights a round is training: that round must
    not then publish them as a new version, and its examples stay pending."""
    svc = make(tmp_path, tiny_model_dir)
    svc.weights.gate.max_retention_loss_increase = 10.0
    svc.queue.add(fact(0))
    svc.scheduler.run_round(forced=True)
    assert svc.weights.version == 1
    svc.queue.add(fact(1))
    pending = svc.queue.pending_count()
    evaluate = svc.weights.evaluate

    def rolled_back_meanwhile(*args, **kwargs):
        svc.weights.rollback(0)
        return evaluate(*args, **kwargs)
    svc.weights.evaluate = rolled_back_meanwhile
    svc.scheduler.run_round(forced=True)
    assert svc.weights.version == 0 and not svc.scheduler.last_round["accepted"]
    assert "rollback" in svc.scheduler.last_round["reason"]
    assert svc.queue.pending_count() == pending
    svc.weights.evaluate = evaluate
    svc.scheduler.run_round(forced=True)  # and the next round trains and publishes as usual
    assert svc.scheduler.last_round["accepted"] and svc.weights.version == 2
    svc.close()
