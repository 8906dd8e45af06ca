"""Memory: parameter bytes from a config, peak memory of a run, the batch that fits a memory budget."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .specs import TextDims, VisionDims

__all__ = ["parameter_count", "PeakMemory", "max_batch", "rss_bytes"]


def parameter_count(t: TextDims, v: VisionDims | None = None) -> int:
    """Parameters of a LLaVA-style model from its dims (Llama decoder without biases, CLIP-style tower with
    biases, 2-layer projector with biases, untied LM head). Exact for LLaVA; approximate for other towers."""
    d, H, Hkv, dh, f = t.hidden, t.heads, t.kv_heads, t.head_dim, t.intermediate
    layer = d * (H + 2 * Hkv) * dh + H * dh * d + 3 * d * f + 2 * d
    text = 2 * t.vocab * d + t.layers * layer + d
    if v is None:
        return text
    dv, fv = v.hidden, v.intermediate
    if v.gated_mlp:
        vlayer = 4 * (dv * dv + dv) + 3 * dv * fv + 2 * fv + dv + 2 * dv
        embed = v.channels * v.patch * v.patch * v.patch_depth * dv
    else:
        vlayer = 4 * (dv * dv + dv) + 2 * dv * fv + fv + dv + 4 * dv
        embed = v.channels * v.patch * v.patch * dv + dv + v.tokens * dv + 4 * dv  # conv, CLS, positions, 2 LNs
    projector = sum(i * o + o for i, o in v.projector)
    return text + v.layers * vlayer + embed + projector


def rss_bytes(field: str = "VmRSS") -> int | None:
    """A memory field of this process from /proc/self/status (VmRSS now, VmHWM peak), in bytes."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


class PeakMemory:
    """Peak memory between ``reset()`` and ``read()``.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). CPU: the process's resident-set high-water mark
    (VmHWM), reset by writing 5 to /proc/self/clear_refs (Linux >= 4.0); where that is refused, the RSS at
    ``read()`` time is reported and ``exact`` is False. CPU numbers include the weights and whatever the
    allocator keeps cached, so compare the ``extra`` part (peak minus memory in use at ``reset()``).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.baseline = 0
        self.exact = True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.exact = False
        self.baseline = rss_bytes("VmRSS") or 0

    def read(self) -> dict:
        """{"peak": bytes, "extra": peak - baseline, "exact": bool}."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = rss_bytes("VmHWM" if self.exact else "VmRSS") or 0
        return {"peak": peak, "extra": max(0, peak - self.baseline), "exact": self.exact}


def max_batch(budget_bytes: float, weights_bytes: float, kv_bytes_per_sample: float,
              activation_bytes_per_sample: float = 0.0) -> int:
    """Largest batch whose weights + batch x (KV cache + activations per sample) fit ``budget_bytes``."""
    per_sample = kv_bytes_per_sample + activation_bytes_per_sample
    if per_sample <= 0:
        raise ValueError("kv_bytes_per_sample + activation_bytes_per_sample must be > 0")
    return max(0, math.floor((budget_bytes - weights_bytes) / per_sample))
