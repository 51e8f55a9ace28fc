"""The composition root: builds every component once, wired together, for one data directory."""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .activity import ActivityTracker
from .collect import ChatLog, DataCollector
from .config import Config
from .inference import InferenceEngine
from .models import load_model, resolve_model_dir
from .queue import TrainingQueue
from .recovery import check_sqlite
from .scheduler import TrainingScheduler
from .training import probes as probes_mod
from .training.adapters import attach_lora, decoder_layers
from .training.batching import BatchManager
from .training.engine import TrainingEngine
from .training.remote import TRAINER_PROCESS_NAME, RemoteEngine
from .training.weights import WeightUpdater

log = logging.getLogger("idletune")


@dataclass
class Service:
    config: Config
    data_dir: Path
    model_dir: Path
    model: object
    tokenizer: object
    queue: TrainingQueue
    collector: DataCollector
    engine: TrainingEngine | RemoteEngine
    weights: WeightUpdater
    batches: BatchManager
    scheduler: TrainingScheduler
    inference: InferenceEngine
    activity: ActivityTracker
    import_jobs: object = None
    importers_config: object = None
    problems: list[str] = field(default_factory=list)
    """What was found wrong at start (damaged files moved aside, ...); shown in /api/status."""
    _probes: probes_mod.ProbeSet | None = field(default=None, repr=False)
    _probes_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def probes(self) -> probes_mod.ProbeSet:
        """Retention probes (the gate's and the rehearsal's), recorded with the base model on first use."""
        with self._probes_lock:
            if self._probes is None:
                w = self.weights
                self._probes = probes_mod.load_or_record(
                    self.data_dir / "probes.json", self.model, self.tokenizer, self.config.gate.num_retention_probes,
                    str(self.model_dir), rehearsal=self.config.training.rehearsal_probes, lock=self.engine.lock,
                    from_base=w.version == 0 or (w.mode == "lora" and w.base_id == "original"), problems=self.problems)
        return self._probes

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    def close(self) -> None:
        self.activity.stopping()  # a round in progress stops at its next layer, unpublished
        if isinstance(self.engine, RemoteEngine):
            self.scheduler.stop(timeout=5)
            self.engine.close()  # and whatever the trainer process still does is stopped with it
        else:
            self.scheduler.stop()
        if self.import_jobs is not None:
            self.import_jobs.shutdown(wait=False)
        self.queue.close()
        self.collector.chat_log.close()


def build_service(data_dir: str | Path, *, model: str | Path | None = None, config: Config | None = None,
                  cache_dir: str | Path | None = None, start_scheduler: bool = True) -> Service:
    import multiprocessing

    if multiprocessing.current_process().name == TRAINER_PROCESS_NAME:
        # a script without an entry-point guard, run again by the trainer process it started
        raise RuntimeError("build_service() was called again while its trainer process started: spawning "
                           "runs the script's top level again. Put the script's code under "
                           'if __name__ == "__main__": (or set training.trainer = "thread")')
    config = config or Config()
    data_dir = Path(data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # new: private (chats and what they trained)
    model_dir = resolve_model_dir(model, cache_dir)
    _check_same_model(data_dir, model_dir)
    base, tokenizer = load_model(model_dir)
    import torch

    torch.manual_seed(config.training.seed)  # the same adapters' initial weights, run after run
    peft_model = attach_lora(base, config.training.lora)
    on_cuda = next(base.parameters()).is_cuda
    trainer, why = choose_trainer(config.training, on_cuda=on_cuda,
                                  not_here=_no_trainer_process(peft_model) if on_cuda else None)
    in_process = trainer == "process"
    log.info("training: in a %s (%s)", "trainer process of its own" if in_process else "trainer thread", why)
    lock = RemoteEngine.make_lock() if in_process else threading.Lock()
    activity = ActivityTracker()
    problems = [p for p in (check_sqlite(data_dir / "queue.db"), check_sqlite(data_dir / "chatlog.db")) if p]
    queue = TrainingQueue(data_dir / "queue.db", max_examples=config.queue.max_examples)
    importers_config, import_jobs, import_url = _importers(config, queue, tokenizer)
    collector = DataCollector(queue, chat_log=ChatLog(data_dir / "chatlog.db"), import_url=import_url)
    batches = BatchManager(config.training)
    weights = WeightUpdater(peft_model, data_dir, lock=lock, gate=config.gate, base_model_path=str(model_dir),
                            mode=config.training.mode)
    if in_process:  # the engine in a trainer process of its own, on this model's tensors
        engine = RemoteEngine(peft_model, tokenizer, config.training, model_dir=model_dir, lock=lock,
                              activity=activity, metrics_path=data_dir / "metrics.jsonl", weights=weights.ws)
    else:
        engine = TrainingEngine(peft_model, tokenizer, config.training, lock=lock, should_yield=activity.should_yield,
                                idle_for=activity.idle_for, metrics_path=data_dir / "metrics.jsonl",
                                batch_manager=batches, weights=weights.ws, is_stopping=activity.is_stopping)
    weights.on_mode_change.append(engine.set_weights)
    weights.on_restore.append(engine.reset_optimizer)  # the moments of a trajectory rolled back
    restored = weights.restore_at_start()
    for problem in weights.problems:
        log.warning(problem)
    inference = InferenceEngine(peft_model, tokenizer, weights, lock, activity,
                                max_prompt_tokens=config.server.max_prompt_tokens)
    svc = Service(config, data_dir, model_dir, peft_model, tokenizer, queue, collector, engine, weights, batches,
                  None, inference, activity, import_jobs, importers_config,  # type: ignore[arg-type]
                  problems + list(weights.problems))
    _gpu_path(svc)
    _compile_training(config, engine, fast_path=svc.inference.fast is not None)
    if in_process and start_scheduler:
        # before any request: on a CPU, sending the tensors moves them into shared memory (a
        # command that trains without serving starts it at its first call instead)
        engine.start()
    svc.scheduler = TrainingScheduler(queue, engine, weights, batches, activity=activity, config=config.scheduler,
                                      probes=svc.probes, heldout_examples=config.gate.heldout_examples,
                                      training_mode=config.training.mode, paused_file=data_dir / "PAUSED")
    if restored:
        log.info("serving weights version %d", restored)
    if svc.scheduler.paused and start_scheduler:
        log.info("background training stays paused, as it was left (%s): "
                 "POST /api/training/resume or the web page's Resume starts it again", data_dir / "PAUSED")
    if start_scheduler:
        svc.scheduler.start()
    return svc


def choose_trainer(config, *, on_cuda: bool, not_here: str | None = None) -> tuple[str, str]:
    """Where training runs ("thread" or "process") for ``training.trainer``, and why.

    "auto" takes a trainer process where it was measured to help and can serve: on a CUDA GPU
    whose fast decoding path serves chat (there a trainer thread's Python added to chat's time
    to first token). ``not_here``: why a trainer process would not run or help on this machine
    (:func:`_no_trainer_process`). A CPU keeps the thread: there the model would move into
    shared memory, which containers often keep small, for no measured gain."""
    if config.trainer != "auto":
        return config.trainer, f'training.trainer = "{config.trainer}"'
    if not on_cuda:
        return "thread", 'training.trainer = "auto", on a CPU'
    if not_here:
        return "thread", f'training.trainer = "auto": {not_here}'
    return "process", 'training.trainer = "auto", on a GPU'


def _no_trainer_process(model) -> str | None:
    """Why a trainer process would not run, or was not measured to help, beside this model on
    this machine (None: it would)."""
    import sys

    import torch

    from .gpu.serving import unavailable

    if not sys.platform.startswith("linux"):
        return f"on {sys.platform}, where a trainer process is not supported (it shares the model by CUDA IPC)"
    device = next(model.parameters()).device
    if getattr(torch.cuda.get_device_properties(device), "is_integrated", False):
        return "an integrated GPU, whose memory CUDA IPC does not share"
    reason = unavailable(model)
    if reason:
        return f"the GPU fast path does not serve here ({reason}); a trainer process was measured only beside it"
    return None


def training_compile_args(tc, how: str, *, auto_tokens: int = 0) -> dict:
    """How the decoder layers compile for training (gpu/training.py's ``compile_layers``
    arguments), for ``training`` settings ``tc`` and ``how`` (``wanted``'s "graphs" or "compile").

    Bounded memory: parts of at most ``micro_batch_tokens``, kept fast in units of layers, and
    fewer activations kept (recomputed in the backward pass). One example alone makes a part as
    long as ``max_seq_len``, so units are sized for that too. The automatic size (0) compiles
    the same way for ``auto_tokens``, the most it takes where that is bounded (a trainer process
    on a GPU: ``RemoteEngine.auto_most_tokens``), and is regrouped at the first step where it
    takes less (``TrainingEngine._regroup_units``). Otherwise (``auto_tokens`` 0): with a
    trainer thread on a GPU layer by layer here, regrouped likewise, every activation kept; on a
    CPU (512-token parts, never re-sized or regrouped; layers compile only where asked) layer by
    layer."""
    from .gpu.training import layers_per_unit

    tokens = tc.micro_batch_tokens or auto_tokens
    return {"graphs": how == "graphs", "layers_per_unit": layers_per_unit(tokens, tc.max_seq_len),
            "recompute_cheap": tokens > 0}


def _compile_training(config: Config, engine, fast_path: bool) -> None:
    from .gpu.training import compile_layers, wanted

    how = wanted(config.training.compile, engine.model, fast_path=fast_path)
    if how:
        in_process = isinstance(engine, RemoteEngine)
        on_gpu = next(engine.model.parameters()).device.type == "cuda"
        args = training_compile_args(config.training, how,
                                     auto_tokens=engine.auto_most_tokens if in_process and on_gpu else 0)
        if in_process:  # compiled there, on its copy of the structure
            engine.compile_layers = args
            n = len(decoder_layers(engine.model))
        else:
            n = compile_layers(engine.model, **args)
        engine.graphs = args["graphs"]
        per_unit = args["layers_per_unit"]
        log.info("training: %d decoder layers compiled for training steps%s%s%s (the first step compiles)", n,
                 f", {per_unit} layers a unit" if per_unit > 1 else "",
                 ", cheap activations recomputed" if args["recompute_cheap"] else "",
                 ", replayed as CUDA graphs" if engine.graphs else "")


def _gpu_path(svc: Service) -> None:
    """On a GPU: fast decoding from merged weights on a high-priority stream, training on a
    low-priority one (idletune/gpu). Elsewhere nothing changes."""
    from .gpu import install

    reason = install(svc)
    if reason and svc.model.device.type == "cuda":
        log.info("GPU fast path off: %s", reason)


def _check_same_model(data_dir: Path, model_dir: Path) -> None:
    """Adapters are only valid on the base they were trained on: refuse to mix models."""
    marker = data_dir / "model.json"
    if marker.exists():
        known = json.loads(marker.read_text(encoding="utf-8")).get("model_dir")
        if known and Path(known).name != model_dir.name:
            raise ValueError(f"data directory {data_dir} belongs to model {known}; "
                             f"use another --data-dir for {model_dir}")
    else:
        marker.write_text(json.dumps({"model_dir": str(model_dir)}), encoding="utf-8")


def _importers(config: Config, queue: TrainingQueue, tokenizer):
    """Import settings (chunks sized by the model's own tokenizer), the job runner, and the
    function the collector calls for links found in chat messages."""
    from .importers import ImportersConfig, ImportJobs, WebsiteImporter

    cfg = ImportersConfig.for_server(config.server,
                                     count_tokens=lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"]))
    jobs = ImportJobs()
    web = WebsiteImporter(queue, cfg.web, count_tokens=cfg.count_tokens)

    def import_url(url: str) -> str:
        url = web.check_url(url)  # refused URLs raise here, with the reason
        return jobs.submit(web.import_website, url, kind="url", source=url)

    return cfg, jobs, import_url
