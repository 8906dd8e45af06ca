"""Measuring what a method saves: KV bytes, analytic FLOPs, prefill time, decode throughput, peak memory.

``lightkv bench`` (``lightkv.perf.bench``) runs the measurements; the pieces are usable on their own:
``specs`` (real-size architectures from configs), ``flops`` / ``analytic`` (pure arithmetic from a config),
``memory`` (KV bytes, weights, peak memory, batch that fits a budget), ``timer`` (lightkv's own share of the
prefill time).
"""

from .analytic import Profile, Workload, kv_bytes_per_token, predict_profile, profile_from_stats
from .flops import FlopsReport, prefill_flops
from .specs import SPECS, ModelSpec, TextDims, VisionDims, get_spec, scale_layers, scaled_schedule

__all__ = ["SPECS", "ModelSpec", "TextDims", "VisionDims", "get_spec", "scale_layers", "scaled_schedule",
           "FlopsReport", "prefill_flops", "Workload", "Profile", "kv_bytes_per_token", "predict_profile",
           "profile_from_stats"]
