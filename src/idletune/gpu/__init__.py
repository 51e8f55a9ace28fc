"""The GPU path: fast decoding from merged weights, CUDA graphs, stream priorities.

Nothing here is imported on a CPU-only run unless asked for; :func:`install` decides at run time.
"""
from .decoder import FastDecoder, unsupported_reason
from .serving import GpuServing, install

__all__ = ["FastDecoder", "GpuServing", "install", "unsupported_reason"]
