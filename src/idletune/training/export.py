"""Export the live weights as a plain Hugging Face model folder (any adapter merged in)."""
from __future__ import annotations

from pathlib import Path

import torch

from . import adapters
from .adapters import LIVE
from .weightsets import FullWeights, hf_name


@torch.no_grad()
def merged_state_dict(svc) -> dict[str, torch.Tensor]:
    """The served function as base weights: live base tensors plus the live adapter's delta."""
    model = svc.model
    with svc.engine.lock:
        svc.weights.ws.use("live")
        sd = {hf_name(n): p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if "lora_" not in n}
        for name, layer in model.named_modules():
            if isinstance(layer, tuple(adapters._lora_layer_types())) and not layer.disable_adapters and LIVE in layer.lora_A:
                key = hf_name(f"{name}.base_layer.weight")
                sd[key] += layer.get_delta_weight(LIVE).to("cpu", sd[key].dtype)
    return sd


def export_merged(svc, out: str | Path) -> Path:
    out = Path(out)
    FullWeights.write(svc.weights.ws if svc.weights.ws.kind == "full" else _Writer(svc), merged_state_dict(svc), out)
    return out


class _Writer:
    """FullWeights.write needs only base_model_path."""

    def __init__(self, svc):
        self.base_model_path = str(svc.model_dir)
