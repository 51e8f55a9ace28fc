"""idletune: a local chat model that keeps learning from the people who use it.

The components, by the names of the original specification::

    DataCollector ─► TrainingQueue ─► TrainingScheduler ─► BatchManager ─► TrainingEngine ─► WeightUpdater

Heavy dependencies (torch, transformers) load when a component that needs them is imported.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "config", "TrainingConfig": "config", "LoraConfig": "config", "SchedulerConfig": "config",
    "GateConfig": "config", "ServerConfig": "config", "ConfigError": "config",
    "TrainingExample": "examples", "Priority": "examples", "Source": "examples", "Status": "examples",
    "TrainingQueue": "queue", "QueueFullError": "queue",
    "DataCollector": "collect", "ChatLog": "collect",
    "ActivityTracker": "activity",
    "InferenceEngine": "inference", "GenerationParams": "inference",
    "TrainingEngine": "training.engine", "BatchManager": "training.batching",
    "WeightUpdater": "training.weights", "TrainingScheduler": "scheduler",
    "build_service": "service", "Service": "service",
    "WebsiteImporter": "importers", "ImageImporter": "importers", "TextImporter": "importers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'idletune' has no attribute {name!r}")


def __dir__():
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs
    from .collect import DataCollector  # noqa: F401
    from .queue import TrainingQueue  # noqa: F401
    from .scheduler import TrainingScheduler  # noqa: F401
    from .training.batching import BatchManager  # noqa: F401
    from .training.engine import TrainingEngine  # noqa: F401
    from .training.weights import WeightUpdater  # noqa: F401
