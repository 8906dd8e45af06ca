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


def _bundled(value: str | None) -> str | Path:
    """--model of demo and compare: a folder, or the name of a bundled model (llava, the default, or qwen)."""
    from lightkv.evaluation.tiny_model import BUNDLED_MODEL, BUNDLED_QWEN_MODEL

    names = {"llava": BUNDLED_MODEL, "qwen": BUNDLED_QWEN_MODEL, "qwen2.5-vl": BUNDLED_QWEN_MODEL}
    if value is None or value in names:
        return names[value or "llava"]
    if not Path(value).is_dir():
        raise SystemExit(f"--model {value!r}: not a folder; give a model folder or a bundled model name "
                         f"({', '.join(names)})")
    return value


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id or folder of a supported model (e.g. "
                        "llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct, models/tiny-llava-shapes)")
    parser.add_argument("--methods", default="none,lightkv@0.55",
                        help="comma-separated labels: none, or NAME[@BUDGET] with NAME in lightkv, tome, random, "
                             "fastv, pdrop, sparsevlm, visionzip, dart (default: %(default)s)")
    parser.add_argument("--tasks", required=True, help="lmms-eval tasks, comma-separated (lightkv_shapes: the "
                        "offline shapes test split, written to OUT/tasks)")
    parser.add_argument("--out", default="out/eval", help="folder for every run and results.json/results.md")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-processes", type=int, default=1,
                        help="data parallel over this many GPUs (runs lmms-eval under accelerate launch)")
    parser.add_argument("--device-map", default=None, help="e.g. auto: one model spread over all visible GPUs")
    parser.add_argument("--dtype", default=None, help="auto (default), bfloat16, float16 or float32")
    parser.add_argument("--grid", default=None,
                        help="image token grid RxC for budgets on dynamic-resolution models (Qwen2.5-VL)")
    parser.add_argument("--model-args", default="",
                        help="more model_args of the lightkv lmms-eval model, k=v,k=v (lists as 1;2;3): method "
                             "fields (guidance=uniform; layers=12;18;24,windows=4;2;1,ratios=0.5;0.5;0.5 instead of "
                             "a budget), max_pixels=..., attn_implementation=eager, ...")
    parser.add_argument("--include-path", action="append", default=[], help="extra lmms-eval task folder")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (a quick check)")
    parser.add_argument("--shapes-per-family", type=int, default=20, help="questions per family in lightkv_shapes")
    parser.add_argument("--offline", action="store_true", help="set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE")
    parser.add_argument("--quiet", action="store_true", help="do not echo lmms-eval's output (it is logged)")
    parser.add_argument("--dry-run", action="store_true", help="print the lmms-eval commands only")


def _eval(args: argparse.Namespace, passthrough: list[str]) -> int:
    from lightkv.evaluation.lmms_run import run_eval

    model_args: dict[str, object] = {"device_map": args.device_map, "dtype": args.dtype, "grid": args.grid}
    for item in filter(None, (part.strip() for part in args.model_args.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-args takes key=value items, got {item!r}")
        model_args[key.strip()] = value.strip()
    model_args = {k: v for k, v in model_args.items() if v is not None}
    model = args.model if not Path(args.model).exists() else str(Path(args.model).resolve())
    run_eval(model, [m.strip() for m in args.methods.split(",") if m.strip()],
             [t.strip() for t in args.tasks.split(",") if t.strip()], args.out, batch_size=args.batch_size,
             num_processes=args.num_processes, model_args=model_args, include_paths=args.include_path,
             limit=args.limit, shapes_per_family=args.shapes_per_family, offline=args.offline,
             extra_args=passthrough, dry_run=args.dry_run, echo=not args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the bundled model, uncompressed and with LightKV at ~55%% and ~30%%")
    demo.add_argument("--out", default=None, help="folder for results.json, results.md and the pictures")
    demo.add_argument("--model", default=None, help="llava (the default) or qwen: a bundled model; or a model folder "
                                                     "saved with save_pretrained")
    demo.add_argument("--per-family", type=int, default=60, help="test questions per question family")
    demo.add_argument("--random", action="store_true",
                      help="instead: cache shapes and timing on a random-weight model (no trained model needed)")
    demo.add_argument("--repeats", type=int, default=5, help="timing repetitions (with --random)")
    compare = sub.add_parser("compare", help="all methods at matched KV budgets on the bundled model")
    compare.add_argument("--methods", default="lightkv,tome,random,fastv,pdrop,sparsevlm,visionzip,dart")
    compare.add_argument("--budgets", default="0.55,0.35,0.20")
    compare.add_argument("--out", default="out/compare")
    compare.add_argument("--model", default=None, help="llava (the default), qwen or a model folder")
    compare.add_argument("--per-family", type=int, default=100)
    bench = sub.add_parser("bench", help="measure KV bytes, FLOPs, prefill time, decode throughput, peak memory "
                                         "and overhead against the uncompressed model (lightkv.perf)")
    from lightkv.perf.bench import add_arguments as _bench_arguments

    _bench_arguments(bench)
    _eval_arguments(sub.add_parser(
        "eval", help="lmms-eval benchmarks (MME, POPE, GQA, ...) for a model and methods, one results table; "
                     "needs the eval extra (pip install 'lightkv[eval]'); arguments after -- go to lmms-eval"))
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if argv and argv[0] == "eval" and "--" in argv:
        at = argv.index("--")
        argv, passthrough = argv[:at], argv[at + 1:]
    args = parser.parse_args(argv)
    if args.command == "eval":
        return _eval(args, passthrough)
    if args.command == "demo":
        if args.random:
            return _demo_random(args)
        from lightkv.evaluation.demo import run_demo

        return run_demo(args.out, _bundled(args.model), per_family=args.per_family)
    if args.command == "compare":
        from lightkv.evaluation.compare import run_compare

        run_compare([m.strip() for m in args.methods.split(",") if m.strip()],
                    [float(b) for b in args.budgets.split(",")], args.out, _bundled(args.model),
                    per_family=args.per_family)
        return 0
    if args.command == "bench":
        from lightkv.perf.bench import main as bench_main

        return bench_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
