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
    demo = sub.add_parser("demo", help="the bundled model, uncompressed and with LightKV at ~55%% and ~30%%")
    demo.add_argument("--out", default=None, help="folder for results.json, results.md and the pictures")
    demo.add_argument("--model", default=None, help="a model folder saved with save_pretrained (default: bundled)")
    demo.add_argument("--per-family", type=int, default=60, help="test questions per question family")
    demo.add_argument("--random", action="store_true",
                      help="instead: cache shapes and timing on a random-weight model (no trained model needed)")
    demo.add_argument("--repeats", type=int, default=5, help="timing repetitions (with --random)")
    compare = sub.add_parser("compare", help="all methods at matched KV budgets on the bundled model")
    compare.add_argument("--methods", default="lightkv,tome,random,fastv,pdrop,sparsevlm,visionzip,dart")
    compare.add_argument("--budgets", default="0.55,0.35,0.20")
    compare.add_argument("--out", default="out/compare")
    compare.add_argument("--model", default=None)
    compare.add_argument("--per-family", type=int, default=100)
    bench = sub.add_parser("bench", help="measure KV bytes, FLOPs, prefill time, decode throughput, peak memory "
                                         "and overhead against the uncompressed model (lightkv.perf)")
    from lightkv.perf.bench import add_arguments as _bench_arguments

    _bench_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.random:
            return _demo_random(args)
        from lightkv.evaluation.demo import run_demo
        from lightkv.evaluation.tiny_model import BUNDLED_MODEL

        return run_demo(args.out, args.model or BUNDLED_MODEL, per_family=args.per_family)
    if args.command == "compare":
        from lightkv.evaluation.compare import run_compare
        from lightkv.evaluation.tiny_model import BUNDLED_MODEL

        run_compare([m.strip() for m in args.methods.split(",") if m.strip()],
                    [float(b) for b in args.budgets.split(",")], args.out, args.model or BUNDLED_MODEL,
                    per_family=args.per_family)
        return 0
    if args.command == "bench":
        from lightkv.perf.bench import main as bench_main

        return bench_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
