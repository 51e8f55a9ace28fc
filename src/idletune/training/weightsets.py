"""The two weight sets — ``live`` (served) and ``candidate`` (trained) — for each mode.

Modes are data: which tensors train, and how the two sets are kept apart.

- :class:`LoraWeights`: two PEFT adapters on one frozen base; switching is a lookup.
- :class:`FullWeights`: every base weight trains. The candidate set is a second copy of the
  base tensors (the live set keeps their storage); switching swaps each parameter's storage
  pointer (no copy), so a request is served from the accepted weights while the candidate
  weights are mid-training.

Both offer the same small interface, used by the engine (``use``, ``trainable``, ``optimized``,
``before_step``, ``after_step``), by the WeightUpdater (``publish``, ``discard``, ``clone``,
``load``, ``write``, ``read``), by the GPU decoder (``served``) and by a trainer process
(``trainer_tensors``, ``share_writes``, ``written_elsewhere``: training/remote.py).
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from . import adapters
from .adapters import LIVE, TRAIN


class LoraWeights:
    kind = "lora"

    def __init__(self, model, base_model_path: str | None = None):
        self.model = model
        self.base_model_path = base_model_path
        for layer in adapters._lora_layers(model):
            layer._disable_adapters = False

    def use(self, which: str) -> None:
        adapters.activate(self.model, LIVE if which == "live" else TRAIN)

    def trainable(self) -> list[torch.nn.Parameter]:
        return adapters.trainable_tensors(self.model)

    def served(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor that holds ``param``'s live weights: the frozen base weight itself."""
        return param

    def optimized(self) -> list[torch.Tensor]:
        """What the optimizer updates: the adapters themselves (float32)."""
        return self.trainable()

    def share_writes(self, counter) -> None:
        pass

    def trainer_tensors(self) -> tuple[dict[str, torch.Tensor], None]:
        """What a trainer process binds: every tensor of the model, both adapters included."""
        return adapters.shared_tensors(self.model), None

    def written_elsewhere(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def publish(self) -> None:
        adapters.copy_adapter(self.model, TRAIN, LIVE)

    def discard(self) -> None:
        adapters.copy_adapter(self.model, LIVE, TRAIN)

    def clone(self, which: str = "live") -> dict[str, torch.Tensor]:
        return adapters.clone_adapter(self.model, LIVE if which == "live" else TRAIN)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Into both sets (after a rollback or at start)."""
        adapters.load_adapter_tensors(self.model, LIVE, tensors)
        adapters.copy_adapter(self.model, LIVE, TRAIN)

    def load_candidate(self, tensors: dict[str, torch.Tensor]) -> None:
        """Into the adapter in training only (``TrainingEngine.load_model``)."""
        adapters.load_adapter_tensors(self.model, TRAIN, tensors)

    def is_finite(self, which: str = "candidate") -> bool:
        name = LIVE if which == "live" else TRAIN
        return all(bool(torch.isfinite(t).all()) for t in adapters.adapter_tensors(self.model, name).values())

    def write(self, tensors: dict[str, torch.Tensor], path: Path) -> str:
        return adapters.write_adapter(tensors, self.model.peft_config[LIVE], path, self.base_model_path)

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        return adapters.read_adapter(self.model, LIVE, path)

    def zero(self) -> dict[str, torch.Tensor]:
        """The adapter of version 0: no change to the base (lora_B is zero)."""
        out = self.clone("live")
        for k, t in out.items():
            if "lora_B" in k:
                t.zero_()
        return out

    def close(self) -> None:
        pass


def hf_name(peft_name: str) -> str:
    """'base_model.model.model.layers.0.mlp.up_proj.base_layer.weight' -> 'model.layers.0.mlp.up_proj.weight'."""
    name = peft_name[len("base_model.model."):] if peft_name.startswith("base_model.model.") else peft_name
    return name.replace(".base_layer.", ".")


class FullWeights:
    """All base weights train; a second copy holds the weights in training (2× the model's
    memory, plus AdamW's two moments for the candidate). The live weights keep the storage the base
    weights had, and the weights in training get the new copy: what reads the base tensors by
    address (the GPU decoder's CUDA graphs) serves the live weights across the switch into full
    fine-tuning and back without being rebuilt.

    Where the weights are bfloat16 or float16 (on a GPU), the optimizer updates float32 master
    copies of the weights in training, which are rounded into them after each step: in bf16 an
    update below half the weight's spacing is lost, and at full fine-tuning's learning rate
    (1e-4 by default) that was every update of the norms' weights (spacing 0.0078 at 1.0) and
    about half of the matrices' at each step (weights of std 0.02, bf16 AdamW on a CPU). The
    master copies cost 12 more bytes a weight (the copy, its gradient, and float32 moments
    instead of bf16 ones)."""

    kind = "full"

    def __init__(self, model, base_model_path: str | None = None, *, live: dict[str, torch.Tensor] | None = None):
        """``live``: where the live weights already are (a trainer process: the serving
        process's, by name; the parameters are then bound to its weights in training,
        :meth:`trainer_tensors`); else the parameters keep the live weights' storage and the
        weights in training are a new copy."""
        self.model = model
        self.base_model_path = base_model_path
        # named_parameters() lists a tied weight (embeddings = output layer) once
        self.params = {hf_name(n): p for n, p in model.named_parameters() if "lora_" not in n}
        for layer in adapters._lora_layers(model):
            layer._disable_adapters = True  # adapters are zero after the merge; skip their compute
        for p in adapters.adapter_tensors(model, TRAIN).values():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        self._names = {id(p): n for n, p in self.params.items()}
        self._other = {}  # the set the parameters do not show now: the live one
        if live is None:
            for n, p in self.params.items():
                self._other[n], p.data = p.data, p.data.clone()
        else:
            missing = set(self.params) - set(live)
            if missing:
                raise ValueError(f"live weights are missing {sorted(missing)[:3]}")
            self._other = {n: live[n] for n in self.params}
        self._current = "candidate"
        # float32 master copies of the weights in training, where those are bf16/fp16: made with
        # the optimizer (optimized()), so a process that serves and never steps them (the
        # serving process beside a trainer process) holds none
        self._master: dict[str, torch.Tensor] = {}
        # times the weights in training were written other than by a step (a discard, a load),
        # always under the model lock: a trainer process sharing them refreshes its master copies
        # when this moves (:meth:`share_writes`)
        self._writes = _Count()

    def use(self, which: str) -> None:
        if which != self._current:
            for n, p in self.params.items():
                p.data, self._other[n] = self._other[n], p.data
            self._current = which

    def _set(self, which: str) -> dict[str, torch.Tensor]:
        if which == self._current:
            return {n: p.data for n, p in self.params.items()}
        return self._other

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.params.values())

    def optimized(self) -> list[torch.Tensor]:
        """What the optimizer updates, in :meth:`trainable`'s order: the float32 master copy
        where the weight is lower precision (made at the first call), else the parameter."""
        if not self._master:
            cand = self._set("candidate")
            self._master = {n: cand[n].float() for n, p in self.params.items()
                            if p.dtype in (torch.bfloat16, torch.float16)}
        return [self._master.get(n, p) for n, p in self.params.items()]

    def trainer_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """What a trainer process binds (``adapters.bind_tensors``) and passes as ``live``: the
        model's tensors with the weights in training as its parameters, and the live weights."""
        out = adapters.shared_tensors(self.model)
        cand = self._set("candidate")
        for name, p in self.model.named_parameters(remove_duplicate=False):
            n = self._names.get(id(p))
            if n is not None:
                out[name] = cand[n]
        return out, dict(self._set("live"))

    def share_writes(self, counter) -> None:
        """Count writes in ``counter`` from now on (a ``multiprocessing`` value a trainer process
        reads each time it takes the model lock)."""
        counter.value = self._writes.value
        self._writes = counter

    def _written(self) -> None:
        """A write of the weights in training, other than a step (always under the model lock):
        counted. Where a trainer process shares them it catches up when it takes the lock next,
        and on a GPU the write has landed by then (``remote.ModelLock`` synchronises the current
        stream before the serving process lets go: that process's CUDA context does not wait for
        this one's streams)."""
        self._writes.value += 1

    def written_elsewhere(self) -> None:
        """The weights in training were written by another process: the master copies follow."""
        self._sync_master()

    @torch.no_grad()
    def before_step(self) -> None:
        """The parameters' gradients into their master copies' (after clipping)."""
        dst, src = [], []
        for n, m in self._master.items():
            g = self.params[n].grad
            if g is None:
                m.grad = None
            elif m.grad is None:
                m.grad = g.float()
            else:
                dst.append(m.grad)
                src.append(g)
        if dst:
            torch._foreach_copy_(dst, src)

    @torch.no_grad()
    def after_step(self) -> None:
        """The stepped master copies rounded into the weights in training."""
        if self._master:
            cand = self._set("candidate")
            torch._foreach_copy_([cand[n] for n in self._master], list(self._master.values()))

    def _sync_master(self) -> None:
        """The master copies from the weights in training (they were written another way)."""
        if self._master:
            cand = self._set("candidate")
            torch._foreach_copy_(list(self._master.values()), [cand[n] for n in self._master])

    @torch.no_grad()
    def load_candidate(self, tensors: dict[str, torch.Tensor]) -> None:
        """Into the weights in training only (``TrainingEngine.load_model``)."""
        cand = self._set("candidate")
        for n, t in cand.items():
            t.copy_(tensors[n])
        self._written()
        self._sync_master()

    def served(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor that holds ``param``'s live weights, whichever set the parameter shows
        now: the same storage for this weight set's life, written in place by ``publish`` and
        ``load`` (so a reader keeps it across publishes; the GPU decoder's graphs do)."""
        name = self._names.get(id(param))
        if name is None:
            raise KeyError("not a base weight of this model")
        return self._set("live")[name]

    @torch.no_grad()
    def publish(self) -> None:
        live, cand = self._set("live"), self._set("candidate")
        torch._foreach_copy_([live[n] for n in live], [cand[n] for n in live])  # few launches, not one a tensor

    @torch.no_grad()
    def discard(self) -> None:
        live, cand = self._set("live"), self._set("candidate")
        torch._foreach_copy_([cand[n] for n in live], [live[n] for n in live])
        self._written()
        self._sync_master()

    def clone(self, which: str = "live") -> dict[str, torch.Tensor]:
        """A copy on the host: every caller writes it to disk, and on a GPU a model-sized copy
        would stay in this process's memory cache, out of a trainer process's reach."""
        return {n: t.detach().to("cpu", copy=True) for n, t in self._set(which).items()}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(self.params) - set(tensors)
        if missing:
            raise ValueError(f"full weights are missing {sorted(missing)[:3]}")
        for which in ("live", "candidate"):
            dst = self._set(which)
            for n, t in dst.items():
                if not torch.isfinite(tensors[n]).all():
                    raise ValueError(f"weight {n} has non-finite values")
                t.copy_(tensors[n])
        self._written()
        self._sync_master()

    def is_finite(self, which: str = "candidate") -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self._set(which).values())

    def write(self, tensors: dict[str, torch.Tensor], path: Path) -> str:
        """A Hugging Face model folder: model.safetensors + config (+ tokenizer) from the base."""
        path.mkdir(parents=True, exist_ok=True)
        adapters.write_safetensors({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()},
                                   path / "model.safetensors")
        if self.base_model_path:
            for f in Path(self.base_model_path).iterdir():
                if f.is_file() and (f.suffix in (".json", ".jinja", ".txt", ".model")) and "index" not in f.name:
                    shutil.copy2(f, path / f.name)
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        return read_base_weights(path, self.params)

    def close(self) -> None:
        """Back to a frozen base (leaving full mode): keep the live weights in the parameters."""
        self.use("live")
        self._other, self._master = {}, {}
        for p in self.params.values():
            p.requires_grad_(False)
            p.grad = None
        for layer in adapters._lora_layers(self.model):
            layer._disable_adapters = False


class _Count:
    value = 0


def read_base_weights(path: Path, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base weights from a HF folder (model.safetensors, or sharded), keyed like ``params``."""
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no model.safetensors")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    out = {}
    for n in params:
        if n in sd:
            out[n] = sd[n]
        elif n == "lm_head.weight" and "model.embed_tokens.weight" in sd:
            out[n] = sd["model.embed_tokens.weight"]  # tied embeddings are stored once
        else:
            raise ValueError(f"{path}: weight {n} is missing")
    return out


@torch.no_grad()
def merge_live_adapter(model) -> None:
    """Fold the live adapter into the base weights (W += scale·B·A) and zero both adapters:
    the model computes the same function, with the adapters' change now in the base."""
    for layer in adapters._lora_layers(model):
        if LIVE in layer.lora_A:
            base = layer.get_base_layer()
            base.weight.data += layer.get_delta_weight(LIVE).to(base.weight.dtype)
    for name in (LIVE, TRAIN):
        for k, t in adapters.adapter_tensors(model, name).items():
            if "lora_B" in k:
                t.zero_()
