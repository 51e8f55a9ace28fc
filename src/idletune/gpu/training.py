"""Training-side GPU options: compiling the decoder layers.

``torch.compile`` fuses each layer's element-wise work (norms, rotary, SiLU·up, dropout, the
LoRA additions) into a few kernels. Only the layers' ``forward`` is compiled, so the
preemption hooks around each layer stay in eager Python and can still stop a step.
Opt-in (``IDLETUNE_COMPILE=1``): the first step of each new shape compiles for tens of seconds.
"""
from __future__ import annotations

import torch


def compile_layers(model, **kwargs) -> int:
    """Compile every decoder layer's forward in place. Returns how many layers."""
    from ..training.adapters import decoder_layers

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    layers = decoder_layers(model)
    for layer in layers:
        if not hasattr(layer.forward, "_torchdynamo_orig_callable"):
            layer.forward = torch.compile(layer.forward, **kwargs)
    return len(layers)
