"""Plot the bundled model's training curve from its training_log.json.

    python scripts/plot_training.py src/lightkv/models/tiny-llava-shapes/training_log.json docs/results/training.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(log_path: str, out: str) -> None:
    log = json.load(open(log_path))
    steps = [s["step"] for s in log["steps"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, [s["loss"] for s in log["steps"]], marker="o")
    a.set_xlabel("step")
    a.set_ylabel("training loss (answer tokens, smoothed)")
    a.grid(alpha=0.3)
    for key in ["overall", "attribute", "existence", "counting", "spatial", "location"]:
        b.plot(steps, [100 * s["val"][key] for s in log["steps"]], marker="o" if key == "overall" else None,
               lw=2.5 if key == "overall" else 1, label=key)
    b.set_xlabel("step")
    b.set_ylabel("val accuracy (%)")
    b.grid(alpha=0.3)
    b.legend(fontsize=7)
    warmup = log.get("vision_warmup", [])
    minutes = (log["steps"][-1]["seconds"] + (warmup[-1]["seconds"] if warmup else 0)) / 60
    arch = {"llava": "tiny LLaVA", "qwen2.5-vl": "tiny Qwen2.5-VL"}.get(log["args"].get("arch", "llava"), "model")
    extra = f", {warmup[-1]['step']} vision warm-up steps first" if warmup else ""
    fig.suptitle(f"bundled {arch}, trained from scratch on the shapes set ({minutes:.0f} min on 2 CPU cores{extra})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
