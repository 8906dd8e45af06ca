"""Efficiency counters of the lmms-eval plugin, per task: summed per process, summarised after merging."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["TaskStats", "summarize"]


@dataclass
class TaskStats:
    """Sums over the prefills of one task. A sequence is one prompt; under beam search its KV bytes count
    every beam (the cache holds num_beams copies), its retained fraction is the mean over them.

    retained_sum / retained_count: retained vision fraction (mean over layers) of the sequences with images.
    kv_bytes / uncompressed_kv_bytes: cache bytes right after prefill, padding excluded, and what the
        uncompressed model would cache for the same sequences.
    prefill_s: time of the prefill forward passes; generate_s: of the whole generate / forward calls.
    """

    sequences: int = 0
    batches: int = 0
    retained_sum: float = 0.0
    retained_count: int = 0
    kv_bytes: int = 0
    uncompressed_kv_bytes: int = 0
    prefill_s: float = 0.0
    generate_s: float = 0.0
    output_tokens: int = 0

    def add(self, **counts: float) -> None:
        for key, value in counts.items():
            setattr(self, key, getattr(self, key) + value)

    def raw(self) -> dict:
        return asdict(self)


def summarize(raw: dict) -> dict:
    """Means per sequence from summed counters (``TaskStats.raw()``, possibly added over processes)."""
    n = max(1, raw["sequences"])
    return {
        "sequences": raw["sequences"],
        "retained_fraction": raw["retained_sum"] / raw["retained_count"] if raw["retained_count"] else None,
        "kv_bytes_per_sequence": raw["kv_bytes"] / n,
        "kv_ratio": raw["kv_bytes"] / raw["uncompressed_kv_bytes"] if raw["uncompressed_kv_bytes"] else None,
        "prefill_ms_per_sequence": 1000 * raw["prefill_s"] / n,
        "prefill_s": raw["prefill_s"],
        "generate_s": raw["generate_s"],
        "output_tokens_per_sequence": raw["output_tokens"] / n,
    }
