"""Configuration: plain dataclasses, validated with messages that name the field.

One TOML file (``idletune.toml`` in the data directory, or ``--config FILE``) can set any field;
command-line options override it. Sections: ``[training]`` (with ``[training.lora]``),
``[scheduler]``, ``[gate]``, ``[server]``, ``[queue]``.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is out of range or of the wrong type; the message names it."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


# Generic module names mapped to each architecture's own (Llama/Qwen/Mistral/Gemma/Phi-3 share
# the Llama names; GPT-2 style models fuse q/k/v and are listed separately).
GENERIC_TARGETS = {
    "attention.q": "q_proj", "attention.k": "k_proj", "attention.v": "v_proj", "attention.o": "o_proj",
    "ffn.gate": "gate_proj", "ffn.up": "up_proj", "ffn.down": "down_proj",
}


@dataclass
class LoraConfig:
    rank: int = 8
    """LoRA rank r (4–16)."""
    alpha: float = 16.0
    """LoRA scaling numerator; the update is scaled by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the LoRA input (0–0.1)."""
    target_modules: list[str] = field(default_factory=lambda: ["attention.q", "attention.v", "ffn.gate", "ffn.up"])
    """Generic names (attention.q/k/v/o, ffn.gate/up/down) or the architecture's raw module names."""
    enable_bias: bool = False
    """Also train the biases of the target modules (PEFT bias='lora_only')."""

    def __post_init__(self) -> None:
        _check(isinstance(self.rank, int) and 4 <= self.rank <= 16, "lora.rank", f"must be an integer in 4–16, got {self.rank!r}")
        _check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha!r}")
        _check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout <= 0.1, "lora.dropout", f"must be in 0–0.1, got {self.dropout!r}")
        _check(isinstance(self.target_modules, list) and self.target_modules and all(isinstance(t, str) and t for t in self.target_modules),
               "lora.target_modules", "must be a non-empty list of module names")

    def module_names(self) -> list[str]:
        """Generic names resolved to Llama-style module names; raw names pass through."""
        return [GENERIC_TARGETS.get(t, t) for t in self.target_modules]


@dataclass
class TrainingConfig:
    mode: str = "lora"
    """"lora" (adapter only), "full" (all weights) or "hybrid" (LoRA, then full when LoRA plateaus)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    learning_rate: float = 1e-3
    """Peak learning rate (1e-5–1e-3). Learning a new fact from one example in tens of steps needs
    the top of the range (measured: 1e-4 learns nothing in 60 steps); see docs/CONFIGURATION.md."""
    batch_size: int = 4
    """Examples per optimizer step while the user is active; the batch manager grows it after long idle (1–32)."""
    gradient_accumulation_steps: int = 1
    micro_batch_tokens: int = 0
    """Most padded tokens in one forward/backward; a larger batch is split into micro-batches
    whose gradients add up to the same step (bounds memory). 0: 512 on a CPU; on a GPU sized at
    the first step to half the free memory (a power of two from 512), at most 2048 in a trainer
    process (the GPU default; 1024 for models of about 7B parameters and more, e.g. Llama-3-8B:
    at most about 7 GiB of activations by the compiled-layer estimate,
    engine.process_most_tokens) and 16384 with a trainer thread (engine.AUTO_MOST_TOKENS). Set, or
    automatic in a trainer process on a GPU, the compiled layers (``compile``; by default only
    on a GPU) keep fewer activations, and at 4096 tokens or fewer (and ``max_seq_len`` no
    longer) run in units of several layers (gpu/training.py: ``RECOMPUTE_CHEAP``,
    ``layers_per_unit``); with a trainer thread an automatic size that small gets the units
    too, from the first step, but keeps every activation."""
    max_grad_norm: float = 1.0
    weight_decay: float = 0.01
    warmup_steps: int = 3
    max_steps: int = 60
    """Most optimizer steps in one training round."""
    max_seq_len: int = 512
    """Longer examples are truncated from the left (context), keeping the target."""
    target_loss: float = 0.05
    """A round stops early once every new example's mean token loss is below this (it is learned)."""
    target_loss_text: float = 0.5
    """The same for text chunks: their opening words cannot be predicted from nothing, so
    memorising them verbatim is neither possible in a few steps nor the point."""
    replay_examples: int = 2
    """Replayed examples in each batch (in its ``batch_size``): already-trained ones, so old lessons
    are kept, and the base model's own answers to generic prompts, so general behaviour is."""
    rehearsal_probes: int = 40
    """Generic prompts (besides the gate's) whose base-model answers are only replayed: the more
    varied, the less a lesson moves the rest (0–40; docs/BENCHMARKS.md, "How many lessons")."""
    full_learning_rate_factor: float = 0.1
    """Full fine-tuning (and hybrid after the switch) uses learning_rate times this."""
    plateau_window: int = 20
    """Hybrid: steps over which the loss EMA must improve by plateau_min_delta, or it has plateaued."""
    plateau_min_delta: float = 0.01
    gradient_checkpointing: bool = False
    compile: str = "auto"
    """Compile the decoder layers for training steps with torch.compile: "auto" (on a CUDA GPU
    whose requests the GPU fast path serves, in every mode: compiled and replayed as CUDA
    graphs), "graphs" (the same wherever CUDA is), "on" (compiled, no graphs) or "off". The
    first step compiles (tens of seconds, once per process), then steps run 1.6–2.0× the plain
    PEFT loop with graphs, 1.2–1.6× without (docs/BENCHMARKS.md); evaluation and chat never use
    the compiled layers."""
    trainer: str = "auto"
    """Where training runs: "thread" (a thread of the serving process), "process" (a process of its
    own, sharing the model's tensors with the serving process: no second copy; every mode), or
    "auto": a process on a CUDA GPU under Linux whose fast decoding path serves the model, a
    thread otherwise. In a process training no longer shares Python's interpreter lock with
    chat; on an H100, over HTTP, it added 0.0–0.3 ms to the median time to first token where a
    thread added 0.8–0.9 ms, trained LoRA as fast (full fine-tuning at 0.89× the thread's steps a
    second), and took 0.8–1.1 GB more GPU memory (a second CUDA context; docs/BENCHMARKS.md,
    "Fifteenth session", "Seventeenth session")."""
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = _build(LoraConfig, self.lora, "training.lora")
        _check(self.mode in ("lora", "full", "hybrid"), "training.mode", f"must be lora, full or hybrid, got {self.mode!r}")
        _check(_num(self.learning_rate) and 1e-5 <= self.learning_rate <= 1e-3, "training.learning_rate", f"must be in 1e-5–1e-3, got {self.learning_rate!r}")
        _check(_int(self.batch_size) and 1 <= self.batch_size <= 32, "training.batch_size", f"must be an integer in 1–32, got {self.batch_size!r}")
        _check(_int(self.gradient_accumulation_steps) and self.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps", "must be ≥ 1")
        _check(_int(self.micro_batch_tokens) and (self.micro_batch_tokens == 0 or self.micro_batch_tokens >= 16),
               "training.micro_batch_tokens", f"must be 0 (automatic) or ≥ 16, got {self.micro_batch_tokens!r}")
        _check(_num(self.max_grad_norm) and self.max_grad_norm > 0, "training.max_grad_norm", f"must be > 0, got {self.max_grad_norm!r}")
        _check(_num(self.weight_decay) and 0 <= self.weight_decay <= 1, "training.weight_decay", f"must be in 0–1, got {self.weight_decay!r}")
        _check(_int(self.warmup_steps) and self.warmup_steps >= 0, "training.warmup_steps", "must be ≥ 0")
        _check(_int(self.max_steps) and 1 <= self.max_steps <= 100_000, "training.max_steps", f"must be in 1–100000, got {self.max_steps!r}")
        _check(_int(self.max_seq_len) and 16 <= self.max_seq_len <= 32768, "training.max_seq_len", "must be in 16–32768")
        _check(_num(self.target_loss) and self.target_loss >= 0, "training.target_loss", "must be ≥ 0")
        _check(_num(self.target_loss_text) and self.target_loss_text >= 0, "training.target_loss_text", "must be ≥ 0")
        _check(_int(self.replay_examples) and 0 <= self.replay_examples <= 16, "training.replay_examples", "must be in 0–16")
        _check(_int(self.rehearsal_probes) and 0 <= self.rehearsal_probes <= 40, "training.rehearsal_probes",
               f"must be an integer in 0–40, got {self.rehearsal_probes!r}")
        _check(_num(self.full_learning_rate_factor) and 0 < self.full_learning_rate_factor <= 1, "training.full_learning_rate_factor", "must be in (0, 1]")
        _check(_int(self.plateau_window) and self.plateau_window >= 2, "training.plateau_window", "must be ≥ 2")
        _check(self.compile in ("auto", "graphs", "on", "off"), "training.compile",
               f"must be auto, graphs, on or off, got {self.compile!r}")
        _check(self.trainer in ("auto", "thread", "process"), "training.trainer",
               f"must be auto, thread or process, got {self.trainer!r}")


@dataclass
class SchedulerConfig:
    enable_background_training: bool = True
    """Train automatically when idle. Off: only `force_training()` / POST /api/training/force train."""
    max_idle_time_ms: int = 60_000
    """Longest slice of training before the scheduler yields, evaluates and publishes."""
    min_idle_time_ms: int = 2_000
    """How long no request must have been in flight before training starts."""
    check_interval_ms: int = 250
    """How often the scheduler looks for idle time and pending examples."""
    max_cpu_usage: float = 90.0
    """Do not start training while other processes use more than this share of the CPU (percent)."""
    pause_on_inference: bool = True
    """Preempt a running training step (at the next layer boundary) when a request arrives."""
    min_training_share: float = 0.05
    """Under load that leaves no idle gap for ``starved_after_ms``, training still takes this
    share of the time (0–0.5): one round between requests, its training capped at this share
    of the time it waited, without yielding to requests. 0: train only in idle gaps."""
    starved_after_ms: int = 120_000
    """How long examples may wait with no idle gap before the minimum share applies."""

    def __post_init__(self) -> None:
        _check(isinstance(self.enable_background_training, bool), "scheduler.enable_background_training", "must be true or false")
        _check(_int(self.max_idle_time_ms) and self.max_idle_time_ms >= 100, "scheduler.max_idle_time_ms", "must be ≥ 100")
        _check(_int(self.min_idle_time_ms) and self.min_idle_time_ms >= 0, "scheduler.min_idle_time_ms", "must be ≥ 0")
        _check(_int(self.check_interval_ms) and 10 <= self.check_interval_ms <= 60_000, "scheduler.check_interval_ms", "must be in 10–60000")
        _check(_num(self.max_cpu_usage) and 0 < self.max_cpu_usage <= 100, "scheduler.max_cpu_usage", "must be in (0, 100]")
        _check(isinstance(self.pause_on_inference, bool), "scheduler.pause_on_inference", "must be true or false")
        _check(_num(self.min_training_share) and 0 <= self.min_training_share <= 0.5, "scheduler.min_training_share",
               f"must be in 0–0.5, got {self.min_training_share!r}")
        _check(_int(self.starved_after_ms) and self.starved_after_ms >= 1000, "scheduler.starved_after_ms", "must be ≥ 1000")


@dataclass
class GateConfig:
    max_retention_loss_increase: float = 0.5
    """Reject an update if the loss on retention probes rises by more than this fraction (0.5 = +50 %)."""
    max_heldout_loss_increase: float = 0.25
    """Reject an update if the loss on held-out examples rises by more than this fraction."""
    max_example_loss_margin: float = 8.0
    """Screening: an example whose mean token loss under the live model is more than this many
    nats above the model's loss on natural text (its retention probes) is noise. On the default
    model: probes ~0.7, natural text in English, German or code 1.5–6.5, random tokens 14+.
    0 turns it off."""
    min_compression_ratio: float = 0.12
    """Screening: a target of 200+ bytes that compresses below this share of its size is
    repetition, not content."""
    num_retention_probes: int = 24
    heldout_examples: int = 32

    def __post_init__(self) -> None:
        _check(_num(self.max_retention_loss_increase) and self.max_retention_loss_increase >= 0, "gate.max_retention_loss_increase", "must be ≥ 0")
        _check(_num(self.max_heldout_loss_increase) and self.max_heldout_loss_increase >= 0, "gate.max_heldout_loss_increase", "must be ≥ 0")
        _check(_num(self.max_example_loss_margin) and self.max_example_loss_margin >= 0, "gate.max_example_loss_margin", "must be ≥ 0")
        _check(_num(self.min_compression_ratio) and 0 <= self.min_compression_ratio < 1, "gate.min_compression_ratio", "must be in [0, 1)")
        _check(_int(self.num_retention_probes) and 0 <= self.num_retention_probes <= 64, "gate.num_retention_probes", "must be in 0–64")
        _check(_int(self.heldout_examples) and 0 <= self.heldout_examples <= 1024, "gate.heldout_examples", "must be in 0–1024")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 1024
    default_max_tokens: int = 256
    import_allow_hosts: list[str] = field(default_factory=list)
    """Hosts or networks that imports may fetch even though they are private or loopback
    (by default such URLs are refused, against server-side request forgery)."""
    max_upload_bytes: int = 64 * 1024 * 1024
    """Largest file accepted by POST /api/import/file."""
    api_key: str | None = field(default=None, repr=False)
    """Required as ``Authorization: Bearer KEY`` on every endpoint but the web page's static
    files (also ``--api-key`` or ``$IDLETUNE_API_KEY``). Never logged or reported."""
    insecure_no_key: bool = False
    """Allow serving without a key on an address other than loopback (``--insecure-no-key``):
    anyone who can reach the port can then use, teach and roll back the model. Logged loudly."""
    cors_origins: list[str] = field(default_factory=list)
    """Web origins (``https://host:port``) whose pages may call the API; empty = none (CORS off)."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Names the server may be addressed by (the ``Host`` header), besides loopback ones when it
    is bound to loopback; a request naming another host gets 421 (against DNS rebinding). On a
    non-loopback address, empty = any name."""

    def __post_init__(self) -> None:
        _check(self.api_key is None or (isinstance(self.api_key, str) and len(self.api_key) >= 8
                                        and self.api_key.isprintable() and not any(c.isspace() for c in self.api_key)),
               "server.api_key", "must be at least 8 printable characters without spaces")
        _check(isinstance(self.insecure_no_key, bool), "server.insecure_no_key", "must be true or false")
        _check(isinstance(self.cors_origins, list) and all(isinstance(o, str) and (o == "*" or o.startswith(("http://", "https://")))
                                                           for o in self.cors_origins),
               "server.cors_origins", "must be a list of origins like \"https://example.org\" (or \"*\")")
        _check(isinstance(self.host, str) and self.host.strip() != "", "server.host", f"must be an address, got {self.host!r}")
        _check(isinstance(self.allowed_hosts, list) and all(isinstance(h, str) and h.strip() and "/" not in h
                                                            for h in self.allowed_hosts),
               "server.allowed_hosts", "must be a list of host names or addresses (no scheme, no port)")
        _check(isinstance(self.import_allow_hosts, list) and all(isinstance(h, str) for h in self.import_allow_hosts),
               "server.import_allow_hosts", "must be a list of host names or networks")
        _check(_int(self.max_upload_bytes) and self.max_upload_bytes >= 1024, "server.max_upload_bytes", "must be ≥ 1024")
        _check(_int(self.port) and 0 <= self.port <= 65535, "server.port", f"must be in 0–65535, got {self.port!r}")
        _check(_int(self.max_body_bytes) and self.max_body_bytes >= 1024, "server.max_body_bytes", "must be ≥ 1024")
        _check(_int(self.max_prompt_tokens) and self.max_prompt_tokens >= 1, "server.max_prompt_tokens", "must be ≥ 1")
        _check(_int(self.max_new_tokens) and self.max_new_tokens >= 1, "server.max_new_tokens", "must be ≥ 1")
        _check(_int(self.default_max_tokens) and 1 <= self.default_max_tokens <= self.max_new_tokens, "server.default_max_tokens", "must be in 1–max_new_tokens")


@dataclass
class QueueConfig:
    max_examples: int = 1_000_000
    """Most examples the queue stores (every status counts). When it is full, new examples are
    refused with HTTP 507 ``queue_full``; nothing already stored is dropped."""

    def __post_init__(self) -> None:
        _check(_int(self.max_examples) and self.max_examples >= 1, "queue.max_examples",
               f"must be an integer ≥ 1, got {self.max_examples!r}")


@dataclass
class Config:
    training: TrainingConfig = field(default_factory=TrainingConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "Config":
        """Read a TOML file (if given and present) and apply dotted overrides like {"training.mode": "full"}."""
        data: dict[str, Any] = {}
        if path is not None and Path(path).exists():
            try:
                data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for key, value in (overrides or {}).items():
            parts = key.split(".") if isinstance(key, str) else [""]
            if not all(parts):
                raise ConfigError(f"{key!r}: an override names a field as section.field, e.g. training.learning_rate")
            node = data
            for i, p in enumerate(parts[:-1]):
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{key}: {'.'.join(parts[:i + 1])} is a value, not a section")
            node[parts[-1]] = value
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        """All fields; the API key, if set, as "***" (secrets are never logged or reported)."""
        out = dataclasses.asdict(self)
        if out["server"]["api_key"] is not None:
            out["server"]["api_key"] = "***"
        return out


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: must be a table, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        sub = {Config: {"training": TrainingConfig, "scheduler": SchedulerConfig, "gate": GateConfig,
                        "server": ServerConfig, "queue": QueueConfig}, TrainingConfig: {"lora": LoraConfig}}.get(cls, {}).get(name)
        kwargs[name] = _build(sub, value, f"{where + '.' if where else ''}{name}") if sub else value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def default_data_dir() -> Path:
    """Per-user data directory: $IDLETUNE_HOME, else $XDG_DATA_HOME/idletune, else ~/.local/share/idletune."""
    if os.environ.get("IDLETUNE_HOME"):
        return Path(os.environ["IDLETUNE_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "idletune"


def default_cache_dir() -> Path:
    """Where converted models are kept: $IDLETUNE_CACHE, else $XDG_CACHE_HOME/idletune, else ~/.cache/idletune."""
    if os.environ.get("IDLETUNE_CACHE"):
        return Path(os.environ["IDLETUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "idletune"
