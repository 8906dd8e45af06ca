"""Store a model folder's safetensors weights in bfloat16 (half the bytes), keeping config.json's float32 dtype.

    python scripts/store_bf16.py src/lightkv/models/tiny-qwen2.5-vl-shapes

``from_pretrained`` then loads the weights as float32 (the config's dtype), so the model computes as it was
trained, on weights rounded to bfloat16; every accuracy reported for a model stored this way is measured on the
stored weights. Used for the second bundled model to keep the repository lean.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    path = args.folder / "model.safetensors"
    config = json.loads((args.folder / "config.json").read_text())
    if config.get("dtype", "float32") != "float32":
        raise SystemExit(f"{args.folder}: config dtype {config.get('dtype')!r}; expected a float32 model")
    weights = load_file(path)
    before = path.stat().st_size
    save_file({k: v.to(torch.bfloat16).contiguous() if v.is_floating_point() else v for k, v in weights.items()},
              path, metadata={"format": "pt"})
    print(f"{path}: {before / 1e6:.1f} MB -> {path.stat().st_size / 1e6:.1f} MB (bfloat16; loads as float32)")


if __name__ == "__main__":
    main()
