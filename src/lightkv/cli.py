"""lightkv command line: demo, compare, bench, eval, calibrate and methods.

Parsing and checking the arguments imports only the standard library, so ``--help`` and usage errors are
instant; torch, transformers and the method registry are imported once the arguments are known to be good
(method names are checked right after parsing, before any model is loaded). Every bad argument ends the command
with one line ``lightkv CMD: error: ...`` on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

__all__ = ["main", "build_parser"]

METHODS_HELP = ("comma-separated method specs: none, NAME, NAME@BUDGET, NAME:FIELD=VALUE[,FIELD=VALUE...] "
                "(lists as [1,2] or 1;2); NAME is any registered method, `lightkv methods` lists them and their "
                "fields")
EVAL_INSTALL = "pip install 'lightkv[eval]' (in a checkout: make eval-venv)"


class _Parser(argparse.ArgumentParser):
    """argparse with every option's default in its help and one-line errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already says what the default is; flags need none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.required or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


# -- argument types: each rejects a bad value while parsing ---------------------------------------------------------


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_count = _int_at_least(0, "an integer >= 0")


def _list_of(kind: Callable[[str], Any], what: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        try:
            return [kind(item) for item in items]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}") from None
    return parse


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(text) from None
    if not 0.0 < value <= 1.0:
        raise ValueError(text)
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


# -- the parser -------------------------------------------------------------------------------------------------


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--out", default=None,
                      help="folder for results.json, results.md, meta.json and the pictures; created if missing, "
                           "files in it are replaced (default: out/demo, or out/demo-random with --random)")
    demo.add_argument("--model", default=None,
                      help="llava or qwen (a bundled model), or a model folder saved with save_pretrained "
                           "(default: llava)")
    demo.add_argument("--per-family", type=_positive_int, default=60, help="test questions per question family")
    demo.add_argument("--random", action="store_true",
                      help="instead: cache shapes and timing on a random-weight model (no trained model needed)")
    demo.add_argument("--repeats", type=_positive_int, default=5, help="timing repetitions (with --random)")


def _compare_arguments(compare: argparse.ArgumentParser) -> None:
    compare.add_argument("--methods", default="lightkv,tome,random,fastv,pdrop,sparsevlm,visionzip,dart",
                         help=METHODS_HELP + "; a method without a budget runs at every --budgets value (its fields "
                                             "fixed), NAME@BUDGET only at that budget")
    compare.add_argument("--budgets", type=_list_of(_budget, "retained fractions in (0, 1]"),
                         default="0.55,0.35,0.20",
                         help="comma-separated average retained vision fractions in (0, 1]")
    compare.add_argument("--out", default="out/compare",
                         help="folder for results.json, results.md and meta.json; created if missing, files in it "
                              "are replaced")
    compare.add_argument("--model", default=None, help="llava or qwen (a bundled model), or a model folder "
                                                       "(default: llava)")
    compare.add_argument("--per-family", type=_positive_int, default=100, help="test questions per question family")


def _calibrate_arguments(calibrate: argparse.ArgumentParser) -> None:
    calibrate.add_argument("--model", default=None,
                           help="llava or qwen (a bundled model), or a model folder the shapes harness runs "
                                "(default: llava)")
    calibrate.add_argument("--samples", type=_positive_int, default=200,
                           help="calibration questions from the shapes val split")
    calibrate.add_argument("--out", default="out/calibrate",
                           help="folder for method.txt (the chosen spec), frontier.json and frontier.png; created "
                                "if missing, files in it are replaced")
    calibrate.add_argument("--budget", type=_fraction, default=None,
                           help="instead of --min-loyalty: the most loyal schedule whose vision KV is at most this "
                                "(default: none)")
    calibrate.add_argument("--min-loyalty", type=_fraction, default=None,
                           help="the smallest vision KV whose loyalty on the samples is at least this (default: "
                                "0.99 without --budget)")
    calibrate.add_argument("--max-trials", type=_positive_int, default=150, help="candidate runs at most")
    calibrate.add_argument("--quiet", action="store_true", help="no progress bar")


def _bench_arguments(bench: argparse.ArgumentParser) -> None:
    # the defaults are BenchConfig's (lightkv.perf.bench), repeated here so that parsing needs no torch;
    # tests/test_cli.py checks that the two agree
    bench.add_argument("--model", default="llava-1.5-7b",
                       help="a real-size spec of lightkv.perf.specs.SPECS (llava-1.5-7b, llava-1.5-13b, qwen2.5-vl-7b, "
                            "internvl3-8b, glm-4.1v-9b, mistral-small-3.1-24b, smolvlm2-2.2b; random weights), "
                            "tiny, or trained[:PATH]; an unknown name lists them")
    bench.add_argument("--methods", default="none,lightkv",
                       help=METHODS_HELP + "; plain lightkv is the model's reference schedule scaled to --layers, "
                                           "another method without a budget is matched to that schedule's budget")
    bench.add_argument("--out", default="out/bench",
                       help="folder for bench.json, bench.md and plots; created if missing, files in it are replaced")
    bench.add_argument("--layers", type=_positive_int, default=None,
                       help="build only this many decoder layers (real widths); schedules are scaled to it "
                            "(default: all layers of --model)")
    bench.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "bf16", "float32", "fp32", "float16",
                                                           "fp16"),
                       help="weights and activations; auto: bfloat16 (float32 for the tiny spec)")
    bench.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    bench.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation")
    bench.add_argument("--repeats", type=_positive_int, default=3, help="measured repetitions (median reported)")
    bench.add_argument("--warmup", type=_count, default=1, help="unmeasured repetitions first")
    bench.add_argument("--images", type=_positive_int, default=1, help="images per prompt (576 tokens each)")
    bench.add_argument("--text-before", type=_positive_int, default=40, help="text tokens before the images")
    bench.add_argument("--text-after", type=_count, default=20, help="text tokens after the images")
    bench.add_argument("--batch", type=_positive_int, default=1, help="prompts per prefill (identical samples)")
    bench.add_argument("--decode-tokens", type=_count, default=16, help="greedy decode steps timed after the prefill")
    bench.add_argument("--scaling", action="store_true",
                       help="also sweep images per prompt and decode batch size, and compute batch-per-budget")
    bench.add_argument("--scaling-images", type=_list_of(_positive_int, "positive integers"), default="1,2,3,4,5",
                       help="--scaling: images per prompt to sweep")
    bench.add_argument("--batch-sizes", type=_list_of(_positive_int, "positive integers"), default="1,2,4,8,16,32",
                       help="--scaling: decode batch sizes to sweep")
    bench.add_argument("--scaling-repeats", type=_positive_int, default=1, help="--scaling: repetitions per point")
    bench.add_argument("--scaling-decode-tokens", type=_positive_int, default=8,
                       help="--scaling: decode steps per batch size")
    bench.add_argument("--tile-decode", default="auto", choices=("auto", "yes", "no"),
                       help="batch sweep: tile a batch-1 prefill's cache (auto: on CPU) instead of prefilling "
                            "the whole batch")
    bench.add_argument("--budgets-gb", type=_list_of(_positive_float, "positive numbers"), default="24,80,141",
                       help="--scaling: memory budgets (GiB) for the largest batch that fits")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt")
    bench.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id or folder of a supported model (e.g. "
                        "llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct, a bundled model's folder)")
    parser.add_argument("--methods", default="none,lightkv@0.55", help=METHODS_HELP)
    parser.add_argument("--tasks", required=True, help="lmms-eval tasks, comma-separated (lightkv_shapes: the "
                        "offline shapes test split, written to OUT/tasks)")
    parser.add_argument("--out", default="out/eval", help="folder for every run and results.json/results.md; created "
                                                          "if missing, files in it are replaced")
    parser.add_argument("--batch-size", type=_positive_int, default=1, help="prompts per generate call")
    parser.add_argument("--num-processes", type=_positive_int, default=1,
                        help="data parallel over this many GPUs (runs lmms-eval under accelerate launch)")
    parser.add_argument("--device-map", default=None,
                        help="e.g. auto: one model spread over all visible GPUs (default: one device per process)")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: auto, the checkpoint's)")
    parser.add_argument("--grid", default=None,
                        help="image token grid RxC for budgets on dynamic-resolution models such as Qwen2.5-VL "
                             "(default: from the model config)")
    parser.add_argument("--model-args", default="",
                        help="more model_args of the lightkv lmms-eval model, k=v,k=v (lists as 1;2;3): method "
                             "fields (guidance=uniform), max_pixels=..., attn_implementation=eager, ... "
                             "(default: none)")
    parser.add_argument("--include-path", action="append", default=[],
                        help="extra lmms-eval task folder; repeat for several (default: none)")
    parser.add_argument("--limit", type=_positive_int, default=None,
                        help="documents per task, for a quick check (default: all)")
    parser.add_argument("--shapes-per-family", type=_positive_int, default=20,
                        help="questions per family in lightkv_shapes")
    parser.add_argument("--offline", action="store_true", help="set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE")
    parser.add_argument("--quiet", action="store_true", help="do not echo lmms-eval's output (it is logged)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the lmms-eval commands only (needs no lmms-eval, writes nothing)")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``lightkv`` parser and its subcommand parsers by name (standard library only)."""
    parser = _Parser(prog="lightkv", description=__doc__.split("\n\n")[0],
                     epilog="`lightkv COMMAND --help` describes each command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {
        "demo": sub.add_parser("demo", help="the bundled model, uncompressed and with LightKV at ~55%% and ~30%%",
                               description="The bundled model on its shapes test split, uncompressed and with "
                                           "LightKV at about 55% and 30% of the vision tokens."),
        "compare": sub.add_parser("compare", help="methods at matched KV budgets on the bundled model",
                                  description="Every method at matched KV budgets on the bundled model's shapes "
                                              "test split, against the uncompressed model."),
        "bench": sub.add_parser("bench", help="KV bytes, FLOPs, prefill time, decode throughput, peak memory and "
                                              "overhead against the uncompressed model (random weights)",
                                description="Measure what methods save on a real-size architecture with random "
                                            "weights (lightkv.perf.bench); ratios are to the uncompressed model "
                                            "measured in the same run."),
        "eval": sub.add_parser("eval", help="lmms-eval benchmarks (MME, POPE, GQA, ...) for a model and methods; "
                                            "needs the eval extra",
                               description="Run lmms-eval once per method and collect one results table. Needs "
                                           f"the eval extra: {EVAL_INSTALL}. Arguments after -- go to lmms-eval."),
        "calibrate": sub.add_parser("calibrate", help="search a LightKV schedule that keeps the model's answers "
                                                      "with the smallest KV, on shapes val questions",
                                    description="Calibrate a LightKV schedule (layers, windows, ratios, guidance) "
                                                "on the shapes val split against the uncompressed model "
                                                "(lightkv.calibrate); writes the chosen spec, loadable with "
                                                "lightkv.build_method, and the explored frontier."),
        "methods": sub.add_parser("methods", help="list the registered methods and their fields",
                                  description="The registered methods: their fields and whether a budget "
                                              "(NAME@BUDGET) can configure them."),
    }
    _demo_arguments(commands["demo"])
    _compare_arguments(commands["compare"])
    _bench_arguments(commands["bench"])
    _eval_arguments(commands["eval"])
    _calibrate_arguments(commands["calibrate"])
    return parser, commands


def _version() -> str:
    # importlib.metadata, not lightkv.__version__: the package's __init__ imports torch
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightkv")
    except PackageNotFoundError:
        return "unknown (not installed)"


# -- checks after parsing, before any work ------------------------------------------------------------------------


def _check_out(parser: argparse.ArgumentParser, out: str) -> None:
    """``out`` must be a folder that exists or can be created; nothing is created here."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        parser.error(f"--out {out}: is a file, not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        parser.error(f"--out {out}: {parent} is a file, so the folder cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        parser.error(f"--out {out}: {parent} is not writable")


def _method_specs(parser: argparse.ArgumentParser, text: str) -> list[tuple[str, Any]]:
    """The ``--methods`` list as (text, MethodSpec) pairs; an unknown name, a bad budget or field is a usage
    error."""
    from .methods.spec import parse_method_spec, split_method_list

    try:
        specs = [(item, parse_method_spec(item)) for item in split_method_list(text)]
    except (TypeError, ValueError) as err:
        parser.error(f"--methods: {err}")
    if not specs:
        parser.error(f"--methods: no method in {text!r}")
    return specs


def _bundled(parser: argparse.ArgumentParser, value: str | None) -> str | Path:
    """--model of demo and compare: a folder, or the name of a bundled model (llava, the default, or qwen)."""
    names = ("llava", "qwen", "qwen2.5-vl")
    if value is None or value in names:
        from .bundled import BUNDLED_MODEL, BUNDLED_QWEN_MODEL

        return BUNDLED_MODEL if value in (None, "llava") else BUNDLED_QWEN_MODEL
    if not (Path(value) / "config.json").is_file():
        parser.error(f"--model {value}: not a model folder (no config.json); give a folder saved with "
                     f"save_pretrained or a bundled model name ({', '.join(names)})")
    return value


def _check_matchers(parser: argparse.ArgumentParser, specs: list[tuple[str, Any]], every: bool = False) -> None:
    """A method with a budget (every method with ``every``: compare) needs a registered budget matcher."""
    from .methods.registry import get_method

    for text, spec in specs:
        if spec.name != "none" and (every or spec.budget is not None) and get_method(spec.name).matcher is None:
            parser.error(f"--methods: {text}: {spec.name} has no budget matcher, so no budget can configure it"
                         + ("; compare runs every method at a budget" if every else "; give its fields instead"))


# -- commands -----------------------------------------------------------------------------------------------------


def _demo_random(args: argparse.Namespace) -> int:
    """LightKV on a random LLaVA-architecture model: cache shapes, bytes and prefill time, no weights needed."""
    import torch

    from .engine import apply
    from .methods import LightKV
    from .testing import llava_prompt, tiny_llava

    torch.manual_seed(0)
    model = tiny_llava(num_layers=8, grid=24, hidden_size=256, attn_implementation="sdpa")
    method = LightKV(layers=[2, 4, 5], windows=[4, 2, 1], ratios=[0.5, 0.5, 0.5])
    inputs = llava_prompt(model, [1] + list(range(10, 40)), list(range(40, 60)))
    rows = []
    with torch.no_grad():
        for name, m in (("none", None), ("lightkv", method)):
            handle = apply(model, m) if m is not None else None
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out / 'results.json'}")
    return 0


def _model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, object]:
    model_args: dict[str, object] = {"device_map": args.device_map, "dtype": args.dtype, "grid": args.grid}
    for item in filter(None, (part.strip() for part in args.model_args.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--model-args takes key=value items, got {item!r}")
        model_args[key.strip()] = value.strip()
    return {k: v for k, v in model_args.items() if v is not None}


def _eval(parser: argparse.ArgumentParser, args: argparse.Namespace, passthrough: list[str]) -> int:
    model_args = _model_args(parser, args)
    specs = _method_specs(parser, args.methods)
    _check_matchers(parser, specs)
    if not args.dry_run and importlib.util.find_spec("lmms_eval") is None:
        parser.error(f"lmms-eval is not installed; lightkv eval needs the eval extra: {EVAL_INSTALL}")
    from .evaluation.lmms_run import run_eval

    model = args.model if not Path(args.model).exists() else str(Path(args.model).resolve())
    run_eval(model, [text for text, _ in specs], [t.strip() for t in args.tasks.split(",") if t.strip()], args.out,
             batch_size=args.batch_size, num_processes=args.num_processes, model_args=model_args,
             include_paths=args.include_path, limit=args.limit, shapes_per_family=args.shapes_per_family,
             offline=args.offline, extra_args=passthrough, dry_run=args.dry_run, echo=not args.quiet)
    return 0


def _calibrate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.budget is not None and args.min_loyalty is not None:
        parser.error("give --budget or --min-loyalty, not both")
    if importlib.util.find_spec("matplotlib") is None:
        parser.error("the frontier plot needs matplotlib: pip install 'lightkv[bench]'")
    path = _bundled(parser, args.model)
    from .calibration import calibrate, shapes_samples, write_calibration
    from .evaluation.harness import load_model, model_label

    try:
        model, processor = load_model(path)
    except ValueError as err:
        parser.error(f"--model: {err}")
    samples = shapes_samples(processor, args.samples, "val")
    try:
        result = calibrate(model, processor, samples, budget=args.budget, min_loyalty=args.min_loyalty,
                           max_trials=args.max_trials, progress=not args.quiet)
    except ValueError as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1
    write_calibration(result, args.out, f"{model_label(model)}: calibration on {result.samples} val questions")
    print(f"{result.spec}\nvision KV {result.vision_kv:.3f}, loyalty {100 * result.loyalty:.1f}%, "
          f"KL {result.kl:.4f} on {result.samples} val questions ({len(result.trials)} trials)")
    print(f"wrote {Path(args.out) / 'method.txt'}, frontier.json, frontier.png")
    return 0


def _list_methods() -> int:
    from .methods.registry import get_method, method_names
    from .methods.spec import method_fields

    rows = [("none", "-", "no compression")]
    for name in method_names():
        entry = get_method(name)
        rows.append((name, "yes" if entry.matcher is not None else "no", ", ".join(method_fields(name)) or "-"))
    width = max(len(row[0]) for row in rows)
    print(f"{'method':{width}}  budget  fields")
    for name, budget, fields in rows:
        print(f"{name:{width}}  {budget:6}  {fields}")
    print("specs: NAME, NAME@BUDGET (budget: yes), NAME:FIELD=VALUE[,FIELD=VALUE...]")
    return 0


def _default_out(args: argparse.Namespace) -> str:
    """--out as given, else out/<command> (out/demo-random for ``demo --random``)."""
    if args.out is not None:
        return args.out
    return "out/demo-random" if args.command == "demo" and args.random else f"out/{args.command}"


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if argv and argv[0] == "eval" and "--" in argv:
        at = argv.index("--")
        argv, passthrough = argv[:at], argv[at + 1:]
    args = parser.parse_args(argv)
    command = commands[args.command]
    if args.command == "methods":
        return _list_methods()
    args.out = _default_out(args)
    _check_out(command, args.out)
    if args.command == "eval":
        return _eval(command, args, passthrough)
    if args.command == "calibrate":
        return _calibrate(command, args)
    if args.command == "demo":
        if args.random:
            return _demo_random(args)
        model = _bundled(command, args.model)
        from .evaluation.demo import run_demo

        return run_demo(args.out, model, per_family=args.per_family)
    if args.command == "compare":
        model = _bundled(command, args.model)
        specs = _method_specs(command, args.methods)
        _check_matchers(command, specs, every=True)
        from .evaluation.compare import run_compare

        run_compare([text for text, _ in specs], args.budgets, args.out, model, per_family=args.per_family)
        return 0
    if args.command == "bench":
        specs = _method_specs(command, args.methods)
        _check_matchers(command, specs)
        from .perf.specs import get_spec

        try:
            get_spec(args.model)
        except ValueError as err:
            command.error(f"--model: {err}")
        from .perf.bench import main as bench_main

        args.methods = [text for text, _ in specs]
        return bench_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
