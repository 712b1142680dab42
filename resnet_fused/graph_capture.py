"""Whether a tensor's work is being captured into a CUDA graph right now.

A cache that keeps a device tensor made while its stream captures (the folded eval
weights of fold.py, the torch backend's bit weights) would keep memory of the graph's
private pool, filled only when the graph replays: eager calls after the capture would
read values that were never computed, or memory the pool has reused. Such caches ask
this first and keep nothing made during a capture (the graph recomputes it on every
replay, as it records every other kernel). Only CUDA tensors ask torch.cuda, so CPU
calls cost an attribute read and importing the package queries no CUDA.
"""
from __future__ import annotations

import torch


def capturing(t: torch.Tensor) -> bool:
    """True when t is a CUDA tensor and the current CUDA stream is capturing a graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


__all__ = ["capturing"]
