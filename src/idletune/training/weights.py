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
import math
import os
import shutil
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..config import GateConfig
from . import adapters
from .adapters import LIVE, TRAIN


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


@dataclass
class Snapshot:
    version: int
    created_at: float
    metrics: dict
    path: Path | None = None
    sha256: str | None = None

    def info(self) -> dict:
        return {"version": self.version, "id": f"v{self.version:06d}", "created_at": self.created_at,
                "metrics": self.metrics, "on_disk": self.path is not None}


class WeightUpdater:
    """Owns the served weights and their history.

    Args:
        model: the PeftModel with ``live`` and ``candidate`` adapters.
        data_dir: where ``snapshots/`` lives.
        lock: the model lock (shared with inference and training).
        gate: tolerances of the quality gate.
        keep_in_memory: accepted versions kept in RAM for instant rollback.
        keep_on_disk: accepted versions kept on disk (``clear_old_snapshots`` prunes beyond).
    """

    def __init__(self, model, data_dir: str | Path, *, lock: threading.Lock, gate: GateConfig | None = None,
                 keep_in_memory: int = 5, keep_on_disk: int = 20, base_model_path: str | None = None):
        self.model = model
        self.dir = Path(data_dir) / "snapshots"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = lock
        self.gate = gate or GateConfig()
        self.keep_on_disk = keep_on_disk
        self.base_model_path = base_model_path
        self.version = 0
        self._ring: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=max(1, keep_in_memory))
        self._ring.append((0, adapters.clone_adapter(model, LIVE)))  # version 0: the base model
        self._base_tensors = self._ring[0][1]
        self.rejections = 0
        self.rollbacks = 0
        self.last_decision: GateDecision | None = None
        self.last_rollback: dict | None = None
        self.problems: list[str] = []
        self._baselines: dict[tuple[str, int], float] = {}

    # ---- serving ------------------------------------------------------------------------------
    @contextmanager
    def serving(self) -> Iterator[int]:
        """Select the live weights for a request (the caller holds the model lock)."""
        adapters.activate(self.model, LIVE)
        self.model.eval()
        yield self.version

    # ---- the gate -----------------------------------------------------------------------------
    def evaluate(self, engine, probes: list, heldout: list) -> GateDecision:
        """Compare the trained weights with the live ones on retention probes and held-out data."""
        g = self.gate
        cand_ret = engine.evaluate(probes, TRAIN) if probes else None
        base_ret = self._baseline("retention-base", 0, lambda: self._eval_base(engine, probes)) if probes else None
        live_ret = self._baseline("retention", self.version, lambda: engine.evaluate(probes, LIVE)) if probes else None
        live_ho = self._baseline("heldout", self.version, lambda: engine.evaluate(heldout, LIVE)) if heldout else None
        cand_ho = engine.evaluate(heldout, TRAIN) if heldout else None
        d = GateDecision(True, "ok", base_ret, live_ret, cand_ret, live_ho, cand_ho)
        finite = all(math.isfinite(t.float().sum().item()) for t in adapters.adapter_tensors(self.model, TRAIN).values())
        if not finite or (cand_ret is not None and not math.isfinite(cand_ret)) or (cand_ho is not None and not math.isfinite(cand_ho)):
            d.accepted, d.reason = False, "non-finite weights or loss"
        elif cand_ret is not None and base_ret and cand_ret > base_ret * (1 + g.max_retention_loss_increase):
            d.accepted = False
            d.reason = (f"retention loss rose {100 * (cand_ret / base_ret - 1):.0f} % above the base model's "
                        f"(limit {100 * g.max_retention_loss_increase:.0f} %)")
        elif cand_ho is not None and live_ho and cand_ho > live_ho * (1 + g.max_heldout_loss_increase):
            d.accepted = False
            d.reason = (f"held-out loss rose {100 * (cand_ho / live_ho - 1):.0f} % "
                        f"(limit {100 * g.max_heldout_loss_increase:.0f} %)")
        if d.accepted:
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

    def _baseline(self, kind: str, version: int, compute) -> float:
        key = (kind, version)
        if key not in self._baselines:
            self._baselines[key] = compute()
        return self._baselines[key]

    def _eval_base(self, engine, probes) -> float:
        with self.lock:
            saved = adapters.clone_adapter(self.model, LIVE)
            adapters.load_adapter_tensors(self.model, LIVE, self._base_tensors)
        try:
            return engine.evaluate(probes, LIVE)
        finally:
            with self.lock:
                adapters.load_adapter_tensors(self.model, LIVE, saved)

    # ---- publish / discard / rollback ---------------------------------------------------------
    def publish(self, metrics: dict | None = None) -> int:
        """Make the trained weights live as a new version; snapshot it in memory and on disk."""
        with self.lock:
            adapters.copy_adapter(self.model, TRAIN, LIVE)
            version = self._next_version()
            tensors = adapters.clone_adapter(self.model, LIVE)
            self.version = version
        self._ring.append((version, tensors))
        meta = {"version": version, "created_at": time.time(), "metrics": metrics or {},
                "gate": asdict(self.last_decision) if self.last_decision else None}
        self._write_snapshot(version, tensors, meta)
        self._write_pointer(version)
        self.clear_old_snapshots()
        return version

    def discard_candidate(self) -> None:
        """Throw the trained weights away: train restarts from the live weights."""
        with self.lock:
            adapters.copy_adapter(self.model, LIVE, TRAIN)
        self.rejections += 1

    def rollback(self, version: int | None = None, reason: str = "requested") -> int:
        """Restore an earlier accepted version exactly (default: the one before the live one)."""
        known = self.list_snapshots()
        versions = sorted({s["version"] for s in known} | {0})
        if version is None:
            older = [v for v in versions if v < self.version]
            if not older:
                raise ValueError("there is no earlier version to roll back to")
            version = older[-1]
        if version not in versions:
            raise ValueError(f"no snapshot v{version:06d}; known versions: {', '.join(map(str, versions))}")
        tensors = self._load_version(version)
        with self.lock:
            adapters.load_adapter_tensors(self.model, LIVE, tensors)
            adapters.copy_adapter(self.model, LIVE, TRAIN)
            previous, self.version = self.version, version
        self._write_pointer(version)
        self.rollbacks += 1
        self.last_rollback = {"from": previous, "to": version, "reason": reason, "time": time.time()}
        return version

    def _load_version(self, version: int) -> dict[str, torch.Tensor]:
        for v, t in self._ring:
            if v == version:
                return t
        if version == 0:
            return self._base_tensors
        path = self.dir / f"v{version:06d}"
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        digest = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
        if digest != meta.get("sha256"):
            raise ValueError(f"snapshot {path.name} is corrupt (checksum mismatch)")
        return adapters.read_adapter(self.model, LIVE, path)

    # ---- disk ---------------------------------------------------------------------------------
    def _next_version(self) -> int:
        on_disk = [s["version"] for s in self.list_snapshots()]
        return max([self.version, *on_disk, *(v for v, _ in self._ring)]) + 1

    def _write_snapshot(self, version: int, tensors: dict, meta: dict) -> Path:
        final = self.dir / f"v{version:06d}"
        tmp = self.dir / f".tmp-v{version:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        meta["sha256"] = adapters.write_adapter(tensors, self.model.peft_config[LIVE], tmp, self.base_model_path)
        _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        return final

    def _write_pointer(self, version: int) -> None:
        _write_atomic(self.dir / "LIVE", f"{version}\n")

    def list_snapshots(self) -> list[dict]:
        """Accepted versions on disk, oldest first (only complete folders with a meta.json)."""
        out = []
        for p in sorted(self.dir.glob("v[0-9]*")):
            try:
                meta = json.loads((p / "meta.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            out.append({"version": meta["version"], "id": p.name, "created_at": meta.get("created_at"),
                        "metrics": meta.get("metrics", {}), "gate": meta.get("gate"),
                        "live": meta["version"] == self.version})
        return out

    def clear_old_snapshots(self, keep: int | None = None) -> int:
        """Delete on-disk snapshots beyond the newest ``keep`` (never the live one). Returns how many."""
        keep = self.keep_on_disk if keep is None else keep
        snaps = self.list_snapshots()
        removed = 0
        for s in snaps[: max(0, len(snaps) - keep)]:
            if s["version"] != self.version:
                shutil.rmtree(self.dir / s["id"], ignore_errors=True)
                removed += 1
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
                tensors = self._load_version(v)
                with self.lock:
                    adapters.load_adapter_tensors(self.model, LIVE, tensors)
                    adapters.copy_adapter(self.model, LIVE, TRAIN)
                self.version = v
                self._ring.append((v, tensors))
                if wanted is not None and v != wanted:
                    self._write_pointer(v)
                return v
            except Exception as e:  # a damaged snapshot: report it and try the one before
                self.problems.append(f"snapshot v{v:06d} could not be loaded ({e}); falling back")
        return self.version

    def get_stats(self) -> dict:
        return {"version": self.version, "rejections": self.rejections, "rollbacks": self.rollbacks,
                "last_gate_decision": asdict(self.last_decision) if self.last_decision else None,
                "last_rollback": self.last_rollback, "problems": self.problems,
                "snapshots_on_disk": len(self.list_snapshots())}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
