import pytest

from idletune.config import Config, ConfigError, LoraConfig, SchedulerConfig, TrainingConfig


def test_defaults_are_valid():
    c = Config()
    assert c.training.mode == "lora" and c.training.lora.rank == 8
    assert c.training.lora.module_names() == ["q_proj", "v_proj", "gate_proj", "up_proj"]
    assert SchedulerConfig().pause_on_inference is True


@pytest.mark.parametrize("kwargs, field", [
    ({"learning_rate": 1e-2}, "training.learning_rate"),
    ({"batch_size": 0}, "training.batch_size"),
    ({"mode": "qlora"}, "training.mode"),
    ({"max_steps": 0}, "training.max_steps"),
])
def test_training_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        TrainingConfig(**kwargs)


def test_lora_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"lora\.rank.*4–16"):
        LoraConfig(rank=64)
    with pytest.raises(ConfigError, match=r"lora\.dropout"):
        LoraConfig(dropout=0.5)


def test_toml_file_and_overrides(tmp_path):
    f = tmp_path / "idletune.toml"
    f.write_text('[training]\nlearning_rate = 5e-4\n[training.lora]\nrank = 4\n[scheduler]\nmin_idle_time_ms = 100\n')
    c = Config.load(f, {"training.lora.rank": 16})
    assert c.training.learning_rate == 5e-4 and c.training.lora.rank == 16
    assert c.scheduler.min_idle_time_ms == 100


def test_unknown_and_malformed(tmp_path):
    with pytest.raises(ConfigError, match="unknown field.*lerning_rate"):
        Config.load(None, {"training.lerning_rate": 1e-4})
    f = tmp_path / "bad.toml"
    f.write_text("[training\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(f)
