"""Screening before a round: repetition, superseded corrections, noise — each rejected with why."""
import pytest

from idletune.config import Config, GateConfig
from idletune.examples import TrainingExample
from idletune.service import build_service
from idletune.training.screen import screen


def chat(q, a, source="correction", i=0):
    ex = TrainingExample.chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}], source=source)
    ex.id = i
    return ex


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_model_dir):
    svc = build_service(tmp_path_factory.mktemp("screen") / "d", model=tiny_model_dir,
                        config=Config.load(None, {"gate.num_retention_probes": 4}), start_scheduler=False)
    yield svc.engine
    svc.close()


def test_repetition_and_superseded_corrections(engine):
    spam = chat("How should I reply?", "BUY CHEAP WATCHES NOW " * 25, i=1)
    old = chat("Capital of Atlantis?", "Atlantis has no capital.", i=2)
    new = chat("Capital of Atlantis?", "The capital of Atlantis is Poseidonis.", i=3)
    fine = chat("Who leads Project Owl?", "Dr. Mira Tam leads Project Owl.", source="chat", i=4)
    keep, rejected = screen([spam, old, new, fine], engine, GateConfig(), reference_loss=None)
    assert keep == [new, fine]
    reasons = {ex.id: why for ex, why in rejected}
    assert "repetitive text" in reasons[1]
    assert "superseded by a later correction" in reasons[2] and "example 3" in reasons[2]


def test_a_looping_answer_of_the_model_is_not_learned(engine):
    loop = chat("How do I boil an egg?", "Boil an egg:\n\n" * 7 + "Bo", source="chat", i=6)  # as the default model said
    steps = chat("How do I boil an egg?", "Boil water.\nAdd the egg.\nWait nine minutes.\nCool it.", source="chat", i=7)
    taught = chat("Say it three times.", "Hello. Hello. Hello.", i=8)  # a user's correction may repeat itself
    keep, rejected = screen([loop, steps, taught], engine, GateConfig(), reference_loss=None)
    assert keep == [steps, taught]
    assert [(ex.id, "loops ('Boil an egg:' 7 times)" in why) for ex, why in rejected] == [(6, True)]


def test_noise_is_measured_against_natural_text(engine):
    ex = chat("Tell me something.", "Something plain and ordinary.", source="chat", i=5)
    assert screen([ex], engine, GateConfig(), reference_loss=None)[0] == [ex]  # no reference: no noise check
    loss = engine.example_losses([ex], "live")[0]
    keep, rejected = screen([ex], engine, GateConfig(max_example_loss_margin=1.0), reference_loss=loss - 2)
    assert keep == [] and "looks like noise" in rejected[0][1]
    keep, _ = screen([ex], engine, GateConfig(max_example_loss_margin=1.0), reference_loss=loss)
    assert keep == [ex]
    assert screen([ex], engine, GateConfig(max_example_loss_margin=0), reference_loss=-100)[0] == [ex]  # off
