"""How well a bundled model's image features tell shapes apart: linear probes on frozen vision features.

For each model, 640 freshly drawn scenes (seed 123: neither the val nor the test split) go through the vision
tower; two linear probes are fitted on 3/4 of them and scored on the rest:

- per token: the attribute of the object under each object token (what the training's auxiliary loss asks);
- per object: the shape from the mean of the object's tokens as the decoder reads them (the projector's /
  merger's output), the information an answer about the object can draw on.

    python scripts/probe_tower_shapes.py src/lightkv/models/tiny-llava-shapes src/lightkv/models/tiny-qwen2.5-vl-shapes

Used to find why the first Qwen2.5-VL-architecture model (2 px patches merged 2 x 2) named shapes worse than the
LLaVA model (docs/results/training-sweep/README.md).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny_llava as T  # noqa: E402

from lightkv.evaluation import harness  # noqa: E402

TARGETS = ("color", "shape", "size", "quadrant", "row", "column")


def fit_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 400) -> float:
    """Accuracy on the last quarter of a linear classifier trained on the first three quarters."""
    n = len(x) * 3 // 4
    x = (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-5)
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x[:n]), y[:n])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head(x[n:]).argmax(-1) == y[n:]).float().mean())


@torch.no_grad()
def features(path: str, batches: int, seed: int):
    model, processor = harness.load_model(path)
    config = model.config
    name = "llava" if config.model_type == "llava" else "qwen2.5-vl"
    arch = T.Arch.__new__(T.Arch)  # only what feature_hooks and image_batch read
    arch.name, arch.config, arch.processor = name, config, processor
    captured = {}
    arch.feature_hooks(model, captured)
    rng = np.random.default_rng(seed)
    tokens, projected, labels = [], [], []
    for _ in range(batches):
        inputs, lab = T.image_batch(arch, rng, 16)
        if name == "llava":
            model.model.get_image_features(pixel_values=inputs["pixel_values"])
        else:
            model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        tokens.append(captured["x"].float())
        projected.append(captured["projected"].float())
        labels.append(lab)
    return torch.cat(tokens), torch.cat(projected), torch.cat(labels)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batches", type=int, default=40, help="batches of 16 images")
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args()
    for path in args.models:
        tokens, projected, labels = features(path, args.batches, args.seed)
        flat, flat_labels = tokens.reshape(-1, tokens.shape[-1]), labels.reshape(-1, labels.shape[-1])
        on_object = flat_labels[:, 0] > 0
        per_token = {t: round(fit_probe(flat[on_object], flat_labels[on_object, k]), 3) for k, t in enumerate(TARGETS)}
        # objects: the tokens of one image with the same (color, shape, size) labels (two objects alike in all
        # three count as one, with the same shape label either way)
        means, shapes = [], []
        for img in range(len(labels)):
            key = labels[img, :, 0] * 100 + labels[img, :, 1] * 10 + labels[img, :, 2]
            for k in key.unique().tolist():
                if k:
                    means.append(projected[img][key == k].mean(0))
                    shapes.append(labels[img][key == k][0, 1])
        per_object = fit_probe(torch.stack(means), torch.stack(shapes))
        print(f"{path}\n  per object token: {per_token}\n  per object (mean of the decoder's input tokens), "
              f"shape: {per_object:.3f} ({len(means)} objects)", flush=True)


if __name__ == "__main__":
    main()
