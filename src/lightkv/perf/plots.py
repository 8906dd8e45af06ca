"""PNG plots of ``lightkv bench --scaling`` (needs matplotlib: ``pip install lightkv[bench]``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_scaling"]


def _by_method(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return out


def plot_scaling(result: dict, out: str | Path) -> list[Path]:
    """scaling_prefill.png, scaling_kv.png, scaling_decode.png and budget_batch.png in ``out``."""
    out = Path(out)
    scaling, meta = result["scaling"], result["meta"]
    title = f"{meta['spec']}, {meta['layers']}/{meta['full_layers']} layers, {meta['dtype']}, {meta['device']}"
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

    vision = _by_method(scaling["vision_tokens"])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, rows in vision.items():
        line, = ax.plot([r["vision_tokens"] for r in rows], [r["prefill_ms"] for r in rows], marker="o",
                        label=f"{method} wall")
        if meta["device"] == "cpu" and all(r.get("prefill_cpu_ms") for r in rows):
            ax.plot([r["vision_tokens"] for r in rows], [r["prefill_cpu_ms"] for r in rows], marker=".",
                    linestyle="--", color=line.get_color(), label=f"{method} CPU time")
    ax.set(xlabel="vision tokens per prompt (images x 576)", ylabel="prefill ms (median)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "scaling_prefill.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, rows in vision.items():
        ax.plot([r["vision_tokens"] for r in rows], [r["total_kv_bytes"] / 2**20 for r in rows], marker="o",
                label=f"{method} total")
        ax.plot([r["vision_tokens"] for r in rows], [r["vision_kv_bytes"] / 2**20 for r in rows], marker=".",
                linestyle="--", label=f"{method} vision")
    ax.set(xlabel="vision tokens per prompt", ylabel="KV cache MB (real cache)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "scaling_kv.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, rows in _by_method(scaling["batch"]).items():
        ax.plot([r["batch"] for r in rows], [r["decode_tokens_per_s"] for r in rows], marker="o", label=method)
    ax.set(xlabel="batch size", ylabel="decode tokens / s", title=title, xscale="log")
    ax.set_xticks([r["batch"] for r in scaling["batch"]], [str(r["batch"]) for r in scaling["batch"]])
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "scaling_decode.png")

    if scaling.get("budget"):
        budget = _by_method(scaling["budget"])
        budgets = sorted({r["budget_gb"] for r in scaling["budget"]})
        width = 0.8 / max(1, len(budget))
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for i, (method, rows) in enumerate(budget.items()):
            values = {r["budget_gb"]: r["max_batch"] for r in rows}
            ax.bar([j + i * width for j in range(len(budgets))], [values.get(b, 0) for b in budgets], width,
                   label=method)
        ax.set_xticks([j + width * (len(budget) - 1) / 2 for j in range(len(budgets))],
                      [f"{b:g} GB" for b in budgets])
        ax.set(ylabel="largest batch (weights + KV)", title=f"{meta['spec']} full size, analytic")
        ax.legend()
        save(fig, "budget_batch.png")
    return written
