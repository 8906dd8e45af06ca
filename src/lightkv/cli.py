"""``lightkv`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _demo_random(args: argparse.Namespace) -> int:
    """LightKV on a random LLaVA-architecture model: cache shapes, bytes and prefill time, no weights needed."""
    import torch

    import lightkv
    from lightkv.testing import llava_prompt, tiny_llava

    torch.manual_seed(0)
    model = tiny_llava(num_layers=8, grid=24, hidden_size=256, attn_implementation="sdpa")
    method = lightkv.LightKV(layers=[2, 4, 5], windows=[4, 2, 1], ratios=[0.5, 0.5, 0.5])
    inputs = llava_prompt(model, [1] + list(range(10, 40)), list(range(40, 60)))
    rows = []
    with torch.no_grad():
        for name, m in (("none", None), ("lightkv", method)):
            handle = lightkv.apply(model, m) if m is not None else None
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = model(**inputs, use_cache=True)
                times.append(time.perf_counter() - start)
            tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, -8:].tolist()
            lengths = [layer.keys.shape[2] for layer in out.cache.layers]
            kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in out.cache.layers)
            rows.append({"method": name, "cache_lengths": lengths, "kv_bytes": kv,
                         "retained_fraction": handle.stats.mean_retained_fraction if handle else 1.0,
                         "prefill_ms": 1000 * sorted(times)[len(times) // 2], "tokens": tokens})
            if handle is not None:
                handle.remove()
    base = rows[0]
    print(f"random LLaVA-architecture model: {len(base['cache_lengths'])} layers, 576 vision tokens (24x24), "
          f"schedule {method.layers}/{method.windows}/{method.ratios}")
    print(f"{'method':8} {'retained':>8} {'KV ratio':>8} {'prefill ms':>10}  cache length per layer")
    for r in rows:
        print(f"{r['method']:8} {r['retained_fraction']:8.3f} {r['kv_bytes'] / base['kv_bytes']:8.3f} "
              f"{r['prefill_ms']:10.1f}  {r['cache_lengths']}")
    print("(random weights: generated tokens are not meaningful; accuracy needs the trained model)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        print(f"wrote {out / 'results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run LightKV on a model built locally and print what it saves")
    demo.add_argument("--out", default=None, help="folder for results.json")
    demo.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo_random(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
