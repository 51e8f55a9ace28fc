"""WeightUpdater: the live weights, the quality gate, snapshots, publish and rollback.

Version 0 is the base model. Each accepted update becomes version N+1: the trained adapter is
copied into the live one in place (between requests, under the model lock) and written to
``snapshots/vNNNNNN/`` in PEFT's format with a ``meta.json`` (version, metrics, gate decision,
sha256 of the weights). Writes are atomic: a temporary folder, fsync, rename; the pointer
``snapshots/LIVE`` names the version being served and is replaced atomically too. A folder
that is half-written, or whose checksum does not match, is never loaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..config import GateConfig
from ..durable import fsync, write_atomic
from . import adapters
from . import probes as probes_mod
from .adapters import LIVE, TRAIN
from .weightsets import FullWeights, LoraWeights, hf_name, merge_live_adapter, read_base_weights

log = logging.getLogger("idletune.training")


@dataclass
class GateDecision:
    accepted: bool
    reason: str
    retention_loss_base: float | None = None
    retention_loss_live: float | None = None
    retention_loss_candidate: float | None = None
    heldout_loss_live: float | None = None
    heldout_loss_candidate: float | None = None
    time: float = field(default_factory=time.time)


class WeightUpdater:
    """Owns the served weights and their history.

    Args:
        model: the PeftModel with ``live`` and ``candidate`` adapters.
        data_dir: where ``snapshots/`` lives.
        lock: the model lock (shared with inference and training).
        gate: tolerances of the quality gate.
        keep_in_memory: accepted LoRA versions kept in RAM for instant rollback.
        keep_on_disk: accepted versions kept on disk (``clear_old_snapshots`` prunes beyond).
        mode: "lora" or "full" weights to start with ("hybrid" starts in LoRA).
    """

    def __init__(self, model, data_dir: str | Path, *, lock: threading.Lock, gate: GateConfig | None = None,
                 keep_in_memory: int = 5, keep_on_disk: int = 20, base_model_path: str | None = None,
                 mode: str = "lora"):
        self.model = model
        self.dir = Path(data_dir) / "snapshots"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = lock
        self.gate = gate or GateConfig()
        self.keep_on_disk = keep_on_disk
        self.base_model_path = base_model_path
        self.version = 0
        self.ws = LoraWeights(model, base_model_path)
        self._zero = self.ws.zero()  # version 0: the base model
        self._ring: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=max(1, keep_in_memory))
        self._ring.append((0, self._zero))
        self.base_id = "original"  # which base weights LoRA adapters sit on
        self.configured_mode = mode
        self.mode_reason = "configured" if mode != "hybrid" else "hybrid: LoRA until the loss plateaus"
        self.on_mode_change: list = []
        self.on_restore: list = []  # called after a rollback (or a restore) rewrote both weight sets
        self.restores = 0  # rollbacks and restores so far: what a round trained from (``publish``)
        self.rejections = 0
        self.rollbacks = 0
        self.last_decision: GateDecision | None = None
        self.last_rollback: dict | None = None
        self.problems: list[str] = []
        self._baselines: dict[tuple[str, int], float] = {}
        self._ceiling: float | None = None  # see _base_retention
        self._history = threading.RLock()  # one publish, rollback or mode switch at a time
        # Entered, under the model lock, around every change of the live weights or of the weight
        # set; the GPU path sets it (gpu/serving.py: requests wait, the serving copies are
        # re-merged before they resume), elsewhere the model lock alone suffices.
        self.live_change = nullcontext
        if mode == "full":
            self._set_ws(FullWeights(model, base_model_path), "configured: full fine-tuning")

    @property
    def mode(self) -> str:
        return self.ws.kind

    def _set_ws(self, ws, reason: str) -> None:
        self.ws = ws
        self.mode_reason = reason
        for callback in self.on_mode_change:
            callback(ws)

    # ---- serving ------------------------------------------------------------------------------
    @contextmanager
    def serving(self) -> Iterator[int]:
        """Select the live weights for a request (the caller holds the model lock)."""
        self.ws.use("live")
        self.model.eval()
        yield self.version

    # ---- the gate -----------------------------------------------------------------------------
    def evaluate(self, engine, probes: list, heldout: list) -> GateDecision:
        """Compare the trained weights with the live ones on retention probes and held-out data."""
        g = self.gate
        cand_ret = engine.evaluate(probes, TRAIN) if probes else None
        base_ret = self._base_retention(engine, probes) if probes else None
        live_ret = self._baseline("retention", self.version, lambda: engine.evaluate(probes, LIVE)) if probes else None
        live_ho = self._baseline("heldout", self.version, lambda: engine.evaluate(heldout, LIVE)) if heldout else None
        cand_ho = engine.evaluate(heldout, TRAIN) if heldout else None
        d = GateDecision(True, "ok", base_ret, live_ret, cand_ret, live_ho, cand_ho)
        with self.lock:
            finite = self.ws.is_finite("candidate")
        # past the base model's limit: refused, unless within the ceiling the live weights had
        # when the probes were measured anew (_base_retention)
        limit = base_ret * (1 + g.max_retention_loss_increase) if base_ret else None
        over_base = cand_ret is not None and limit is not None and cand_ret > limit
        if not finite or (cand_ret is not None and not math.isfinite(cand_ret)) or (cand_ho is not None and not math.isfinite(cand_ho)):
            d.accepted, d.reason = False, "non-finite weights or loss"
        elif over_base and cand_ret > (self._ceiling or 0.0):
            d.accepted = False
            d.reason = (f"retention loss rose {100 * (cand_ret / base_ret - 1):.0f} % above the base model's "
                        f"(limit {100 * g.max_retention_loss_increase:.0f} %"
                        + (f"; {100 * (self._ceiling / base_ret - 1):.0f} % allowed, the live weights' when the "
                           "probes were measured anew" if self._ceiling else "") + ")")
        elif cand_ho is not None and live_ho and cand_ho > live_ho * (1 + g.max_heldout_loss_increase):
            d.accepted = False
            d.reason = (f"held-out loss rose {100 * (cand_ho / live_ho - 1):.0f} % "
                        f"(limit {100 * g.max_heldout_loss_increase:.0f} %)")
        if d.accepted and over_base:
            d.reason = (f"retention loss {100 * (cand_ret / base_ret - 1):.0f} % above the base model's, within the "
                        f"{100 * (self._ceiling / base_ret - 1):.0f} % the live weights had when the probes were "
                        "measured anew; held-out loss within limits")
        elif d.accepted:
            d.reason = "retention and held-out loss within limits"
        self.last_decision = d
        return d

    def should_rollback(self, loss: float | None = None, accuracy: float | None = None, *,
                        baseline_loss: float | None = None, baseline_accuracy: float | None = None,
                        max_accuracy_drop: float = 0.05) -> bool:
        """The gate's rule on measured figures: True if ``loss`` is non-finite or rose past the
        retention tolerance over ``baseline_loss``, or ``accuracy`` fell by more than
        ``max_accuracy_drop``. Baselines default to those of the live version."""
        if loss is not None:
            if not math.isfinite(loss):
                return True
            base = baseline_loss if baseline_loss is not None else self._baselines.get(("retention", self.version))
            if base and loss > base * (1 + self.gate.max_retention_loss_increase):
                return True
        if accuracy is not None:
            if not math.isfinite(accuracy):
                return True
            if baseline_accuracy is not None and accuracy < baseline_accuracy - max_accuracy_drop:
                return True
        return False

    def reference_loss(self, engine, probes: list) -> float:
        """The live weights' loss on natural text (retention probes), cached per version."""
        return self._baseline("retention", self.version, lambda: engine.evaluate(probes, LIVE))

    def _baseline(self, kind: str, version: int, compute) -> float:
        key = (kind, version)
        if key not in self._baselines:
            self._baselines[key] = compute()
        return self._baselines[key]

    def _base_retention(self, engine, probes) -> float:
        """The base model's retention loss: measured once (LoRA on the original base), kept on disk
        with the probes it was measured on (re-recorded probes are measured again). Live weights
        trained before the probes were measured anew may be past the limit on them already (an
        upgrade that corrected the probes): the loss they had then is kept as a ceiling
        (``_ceiling``) that updates may reach but not pass, so the model can go on learning."""
        key = ("retention-base", 0)
        if key in self._baselines:
            return self._baselines[key]
        f = self.dir / "BASELINE.json"
        made_on = probes_mod.fingerprint(probes)
        try:
            kept = json.loads(f.read_text())
            value = kept["retention_loss"] if kept.get("probes") == made_on else None
            self._ceiling = kept.get("ceiling") if value is not None else None
        except (OSError, ValueError, KeyError, AttributeError):
            value = None
        if value is None and self.mode == "lora" and self.base_id == "original":
            # measured in the candidate's slot (kept aside meanwhile): the live weights, which
            # requests read, never change outside publish, rollback and mode switches
            with self.lock:
                candidate = self.ws.clone("candidate")
                adapters.load_adapter_tensors(self.model, TRAIN, self._zero)
            try:
                value = engine.evaluate(probes, TRAIN)
            finally:
                with self.lock:
                    adapters.load_adapter_tensors(self.model, TRAIN, candidate)
            kept = {"retention_loss": value, "probes": made_on}
            if self.version > 0:
                live = engine.evaluate(probes, LIVE)
                if live > value * (1 + self.gate.max_retention_loss_increase):
                    kept["ceiling"] = self._ceiling = live
                    log.warning("the live weights (v%d) are %.0f %% above the base model's loss on the retention "
                                "probes just measured (limit %.0f %%): updates may reach that, not pass it",
                                self.version, 100 * (live / value - 1), 100 * self.gate.max_retention_loss_increase)
            write_atomic(f, json.dumps(kept))
        if value is None:  # nothing recorded before the base changed: measure against live
            value = engine.evaluate(probes, LIVE)
            write_atomic(f, json.dumps({"retention_loss": value, "probes": made_on, "measured_on": f"v{self.version}"}))
        self._baselines[key] = value
        return value

    # ---- publish / discard / rollback ---------------------------------------------------------
    def publish(self, metrics: dict | None = None, *, trained_since: int | None = None) -> int | None:
        """Make the trained weights live as a new version. The snapshot and the LIVE pointer
        reach the disk first, then the weights are swapped in: whatever a client was served is
        what a restart serves. ``trained_since``: the :attr:`restores` count when training
        started; if a rollback came since, it replaced the trained weights, and nothing is
        published (None)."""
        with self._history:
            if trained_since is not None and trained_since != self.restores:
                return None
            with self.lock:
                tensors = self.ws.clone("candidate")
            version = self._next_version()
            meta = {"version": version, "parent": self.version,  # what it was trained from: an undo goes back there
                    "created_at": time.time(), "metrics": metrics or {}, "kind": self.mode,
                    "base": self.base_id if self.mode == "lora" else f"v{version:06d}",
                    "gate": asdict(self.last_decision) if self.last_decision else None}
            self._write_snapshot(f"v{version:06d}", tensors, meta, self.ws)
            self._write_pointer(version)
            with self.lock, self.live_change():
                self.ws.publish()
                self.version = version
                if self.mode == "full":  # the published weights are the base a rollback to LoRA compares
                    self.base_id = meta["base"]
            if self.mode == "lora":
                self._ring.append((version, tensors))
            self.clear_old_snapshots()
        return version

    def discard_candidate(self, rejected: bool = True) -> None:
        """Throw the trained weights away: training restarts from the live weights.
        ``rejected``: counted as the gate's rejection (``rejections``)."""
        with self.lock:
            self.ws.discard()
        self.rejections += int(rejected)

    # ---- mode switches (hybrid) ---------------------------------------------------------------
    def switch_to_full(self, reason: str) -> None:
        """Merge the live adapter into the base weights and train all weights from there.
        The merged weights are kept on disk as the base that later LoRA weights sit on."""
        with self._history:
            with self.lock, self.live_change():  # the served function is the same before and after
                self.ws.discard()
                merge_live_adapter(self.model)
                base_name = f"base-v{self.version:06d}"
                full = FullWeights(self.model, self.base_model_path)
                merged = full.clone("live")
                self._set_ws(full, reason)
                self.base_id = base_name  # written next: a rollback to it before then finds no folder, and says so
            log.info("training mode switched from lora to full at version %d: %s", self.version, reason)
            self._write_snapshot(base_name, merged, {"version": self.version, "kind": "full", "base": base_name,
                                                     "created_at": time.time(), "merged_lora": True}, full)
            self._ring.clear()

    def switch_to_lora(self, reason: str) -> None:
        """Leave full fine-tuning: the live weights become the frozen base for LoRA."""
        with self._history, self.lock, self.live_change():  # one publish, rollback or switch at a time
            live = f"v{self.version:06d}"
            self.ws.discard()
            self.ws.close()
            lora = LoraWeights(self.model, self.base_model_path)
            lora.load(self._zero)
            if self.version and (self.dir / live).exists() and self._meta(live).get("kind") == "full":
                self.base_id = live  # full fine-tuning was published: its weights are the new base
            self._set_ws(lora, reason)
            log.info("training mode switched from full to lora at version %d: %s", self.version, reason)
            self._ring.clear()

    def rollback(self, version: int | None = None, reason: str = "requested") -> int:
        """Restore an accepted version exactly. Default: the version the live one was trained from
        (an undo of the last update: after a rollback from v5 to v2 and a v6 trained on v2, v2,
        not v5), or for a snapshot that does not say, the highest version before the live one."""
        snaps = self.list_snapshots()
        versions = sorted({s["version"] for s in snaps} | {0})
        if version is None:
            parent = next((s["parent"] for s in snaps if s["version"] == self.version), None)
            older = [v for v in versions if v < self.version]
            if not older:
                raise ValueError("there is no earlier version to roll back to")
            version = parent if parent in versions and parent != self.version else older[-1]
        if version not in versions:
            raise ValueError(f"no snapshot v{version:06d}; known versions: {', '.join(map(str, versions))}")
        with self._history:
            previous, previous_mode = self.version, self.mode
            self._restore(version)
            switched = f"; training mode switched from {previous_mode} to {self.mode}" if self.mode != previous_mode else ""
        self.rollbacks += 1
        self.last_rollback = {"from": previous, "to": version, "reason": reason, "time": time.time()}
        if version == previous:
            log.info("restored version %d as it was saved (%s)%s", version, reason, switched)
        else:
            log.info("rolled back from version %d to version %d (%s)%s", previous, version, reason, switched)
        return version

    def _meta(self, name: str) -> dict:
        return json.loads((self.dir / name / "meta.json").read_text(encoding="utf-8"))

    def _verified(self, name: str) -> Path:
        path = self.dir / name
        meta = self._meta(name)
        f = path / ("adapter_model.safetensors" if meta.get("kind", "lora") == "lora" else "model.safetensors")
        if hashlib.sha256(f.read_bytes()).hexdigest() != meta.get("sha256"):
            raise ValueError(f"snapshot {name} is corrupt (checksum mismatch)")
        return path

    def _restore(self, version: int) -> None:
        """Serve ``version``: its base (original, merged or full) and its adapter, in both sets."""
        if version == 0:  # the original weights: as full weights where full fine-tuning is configured
            full = self.configured_mode == "full" and self.base_model_path is not None
            kind, base, name = ("full" if full else "lora"), "original", None
        else:
            name = f"v{version:06d}"
            meta = self._meta(name)
            kind, base = meta.get("kind", "lora"), meta.get("base", "original")
        # Weights are read from disk first: requests on the GPU path wait while the live ones change.
        if kind == "full":
            tensors = self._read_base(name or "original")
            with self.lock, self.live_change():
                ws = self.ws if self.ws.kind == "full" else None
                if ws is None:
                    self.ws.close()
                    for n in ("live", "candidate"):
                        for k, t in adapters.adapter_tensors(self.model, LIVE if n == "live" else TRAIN).items():
                            if "lora_B" in k:
                                t.data.zero_()
                    ws = FullWeights(self.model, self.base_model_path)
                ws.load(tensors)
                self.version = version
                self.base_id = name or "original"
                if ws is not self.ws:
                    self._set_ws(ws, f"restored full weights {name or 'v000000 (the original weights)'}")
            self._ring.clear()
        else:
            tensors = next((t for v, t in self._ring if v == version and base == self.base_id), None)
            if tensors is None:
                tensors = self._zero if version == 0 else LoraWeights(self.model).read(self._verified(name))
            base_weights = self._read_base(base) if base != self.base_id else None
            with self.lock, self.live_change():
                if self.ws.kind != "lora":
                    self.ws.close()
                    self._set_ws(LoraWeights(self.model, self.base_model_path), f"restored LoRA weights v{version:06d}")
                if base_weights is not None:
                    self._put_base(base, base_weights)
                self.ws.load(tensors)
                self.version = version
            if version and not any(v == version for v, _ in self._ring):
                self._ring.append((version, tensors))
        self._write_pointer(version)
        self.restores += 1
        for callback in self.on_restore:
            callback()

    def _base_params(self) -> dict[str, torch.nn.Parameter]:
        return {hf_name(n): p for n, p in self.model.named_parameters() if "lora_" not in n}

    def _read_base(self, base: str) -> dict[str, torch.Tensor]:
        """Base weights (the original model's, or a merged/full snapshot's), read from disk and
        checked — shapes, finite values — before any weight is overwritten: a failure halfway
        through a copy would leave a model that is neither version."""
        path = Path(self.base_model_path) if base == "original" else self._verified(base)
        params = self._base_params()
        weights = read_base_weights(path, params)
        for n, p in params.items():
            t = weights[n]
            if t.shape != p.shape:
                raise ValueError(f"snapshot {base}: weight {n} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"snapshot {base}: weight {n} has non-finite values")
        return weights

    def _put_base(self, base: str, weights: dict[str, torch.Tensor]) -> None:
        """Put base weights under the adapters (the caller holds the model lock)."""
        with torch.no_grad():
            for n, p in self._base_params().items():
                p.data.copy_(weights[n])
        self.base_id = base
        self._ring.clear()
        self._baselines.clear()

    # ---- disk ---------------------------------------------------------------------------------
    def _next_version(self) -> int:
        on_disk = [s["version"] for s in self.list_snapshots()]
        return max([self.version, *on_disk, *(v for v, _ in self._ring)]) + 1

    def _write_snapshot(self, name: str, tensors: dict, meta: dict, ws) -> Path:
        final = self.dir / name
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        meta["sha256"] = ws.write(tensors, tmp)
        pause = os.environ.get("IDLETUNE_FAULT_SNAPSHOT_PAUSE_S")  # fault injection: the crash test kills here
        if pause:
            time.sleep(float(pause))
        write_atomic(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync(self.dir)
        return final

    def _write_pointer(self, version: int) -> None:
        write_atomic(self.dir / "LIVE", f"{version}\n")

    def list_snapshots(self) -> list[dict]:
        """Accepted versions on disk, oldest first (only complete folders with a meta.json)."""
        out = []
        for p in sorted(self.dir.glob("v[0-9]*")):
            try:
                meta = json.loads((p / "meta.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            out.append({"version": meta["version"], "id": p.name, "parent": meta.get("parent"),
                        "created_at": meta.get("created_at"),
                        "kind": meta.get("kind", "lora"), "metrics": meta.get("metrics", {}),
                        "gate": meta.get("gate"), "live": meta["version"] == self.version})
        return out

    def clear_old_snapshots(self, keep: int | None = None) -> int:
        """Delete on-disk snapshots beyond the newest ``keep`` (never the live one, nor a base
        that a kept snapshot sits on). Returns how many were removed."""
        keep = self.keep_on_disk if keep is None else keep
        snaps = self.list_snapshots()
        kept = snaps[max(0, len(snaps) - keep):]
        needed = {self.base_id} | {self._meta(s["id"]).get("base") for s in kept}
        removed = 0
        for s in snaps[: max(0, len(snaps) - keep)]:
            if s["version"] != self.version and s["id"] not in needed:
                shutil.rmtree(self.dir / s["id"], ignore_errors=True)
                removed += 1
        for p in self.dir.glob("base-v*"):
            if p.name not in needed:
                shutil.rmtree(p, ignore_errors=True)
        for stray in self.dir.glob(".tmp-*"):
            shutil.rmtree(stray, ignore_errors=True)
        return removed

    def restore_at_start(self) -> int:
        """Serve the version named by ``snapshots/LIVE``; fall back to the newest good one."""
        for stray in self.dir.glob(".tmp-*"):
            shutil.rmtree(stray, ignore_errors=True)  # a write cut short by a crash
        pointer = self.dir / "LIVE"
        wanted = None
        if pointer.exists():
            try:
                wanted = int(pointer.read_text().strip())
            except ValueError:
                self.problems.append("snapshots/LIVE is unreadable; using the newest good snapshot")
        candidates = sorted((s["version"] for s in self.list_snapshots()), reverse=True)
        if wanted is not None:
            candidates = [wanted] + [v for v in candidates if v < wanted]
        for v in candidates:
            if v == 0:
                break
            try:
                self._restore(v)
                return v
            except Exception as e:  # a damaged snapshot: report it and try the one before
                self.problems.append(f"snapshot v{v:06d} could not be loaded ({e}); falling back")
        if wanted:
            self._restore(0)
        return self.version

    def get_stats(self) -> dict:
        return {"version": self.version, "mode": self.mode, "mode_reason": self.mode_reason, "base": self.base_id,
                "rejections": self.rejections, "rollbacks": self.rollbacks,
                "last_gate_decision": asdict(self.last_decision) if self.last_decision else None,
                "last_rollback": self.last_rollback, "problems": self.problems,
                "snapshots_on_disk": len(self.list_snapshots())}
