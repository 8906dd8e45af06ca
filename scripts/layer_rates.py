"""Per-decoder-layer prefill time against per-layer FLOPs, uncompressed vs LightKV, on one model spec.

Answers "where does the gap between the prefill time ratio and the FLOPs ratio come from?": each decoder
layer's wall time (from its first forward pre-hook to its last forward hook, so a LightKV stage, a hook on its
layer, counts in that layer) and its tokens, with the analytic FLOPs of that layer
(``perf.flops.decoder_layer_flops``) and the rate in GFLOP/s. A second table times the layer's matmuls alone (the
seven projections with random weights of the layer's shapes, and causal sdpa) at each token count the run saw,
and the decoder ratio those times predict, so a lower rate of the shortened layers can be told apart from work
that is not in the FLOPs count.

    python scripts/layer_rates.py --model llava-1.5-7b --layers 8 --dtype float32 --threads 1 --repeats 3
    python scripts/layer_rates.py --model llava-1.5-7b --dtype bfloat16 --projections-only 636,348,204,132

Prints markdown; ``--json`` writes every number. Random weights; one prompt of 1 image (as ``lightkv bench``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lightkv.adapters import get_adapter
from lightkv.engine import apply
from lightkv.perf.analytic import Workload
from lightkv.perf.bench import _dtype
from lightkv.perf.flops import decoder_layer_flops
from lightkv.perf.methods import make_method
from lightkv.perf.runs import make_inputs, median
from lightkv.perf.specs import get_spec


def layer_times(model, inputs) -> tuple[list[float], list[int]]:
    """Wall seconds and token count of every decoder layer in one prefill."""
    layers = get_adapter(model).decoder_layers
    starts: dict[int, float] = {}
    seconds = [0.0] * len(layers)
    tokens = [0] * len(layers)
    hooks = []
    for i, layer in enumerate(layers):
        def begin(module, args, kwargs, i=i):
            starts[i] = time.perf_counter()

        def count(module, args, kwargs, i=i):  # after lightkv's own pre-hooks: the tokens the layer runs
            hidden = args[0] if args else kwargs["hidden_states"]
            tokens[i] = hidden.shape[1]

        def end(module, args, kwargs, output, i=i):
            seconds[i] = time.perf_counter() - starts[i]

        hooks.append(layer.register_forward_pre_hook(begin, prepend=True, with_kwargs=True))
        hooks.append(layer.register_forward_pre_hook(count, with_kwargs=True))
        hooks.append(layer.register_forward_hook(end, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return seconds, tokens


def _median_seconds(fn, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return median(times[1:])


def linear_rates(t, counts: list[int], dtype: torch.dtype, repeats: int) -> dict[int, dict]:
    """Seconds of one decoder layer's seven projections (q, k, v, o, gate, up, down; random weights of the
    text dims ``t``) on ``n`` random rows, and of its causal sdpa attention over ``n`` tokens, per n: the layer's
    matmuls without element-wise work. Attention FLOPs are counted as ``perf.flops`` counts them (every
    query against every key, ``4 * heads * n * n * head_dim``)."""
    d, f = t.hidden, t.intermediate
    shapes = [(t.heads * t.head_dim, d), (t.kv_heads * t.head_dim, d), (t.kv_heads * t.head_dim, d),
              (d, t.heads * t.head_dim), (f, d), (f, d), (d, f)]
    weights = [torch.randn(shape, dtype=dtype) for shape in shapes]
    out = {}
    for n in counts:
        inputs = [torch.randn(1, n, w.shape[1], dtype=dtype) for w in weights]
        flops = sum(2 * n * w.shape[0] * w.shape[1] for w in weights)
        s = _median_seconds(lambda: [torch.nn.functional.linear(x, w) for x, w in zip(inputs, weights)], repeats)
        q = torch.randn(1, t.heads, n, t.head_dim, dtype=dtype)
        k, v = (torch.randn(1, t.kv_heads, n, t.head_dim, dtype=dtype) for _ in range(2))
        attention_s = _median_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=t.kv_heads != t.heads), repeats)
        attention_flops = 4 * t.heads * n * n * t.head_dim
        out[n] = {"seconds": s, "flops": flops, "gflops_per_s": flops / s / 1e9, "attention_seconds": attention_s,
                  "attention_flops": attention_flops, "attention_gflops_per_s": attention_flops / attention_s / 1e9}
    return out


def rates_markdown(rates: dict[int, dict]) -> list[str]:
    counts = sorted(rates, reverse=True)
    top = rates[counts[0]]["gflops_per_s"]
    lines = ["| rows | projections ms | GFLOP/s | rate vs the longest | attention ms | attention GFLOP/s (as counted) |",
             "|---|---|---|---|---|---|"]
    for n in counts:
        r = rates[n]
        lines.append(f"| {n} | {r['seconds'] * 1000:.0f} | {r['gflops_per_s']:.1f} | {r['gflops_per_s'] / top:.3f} "
                     f"| {r['attention_seconds'] * 1000:.1f} | {r['attention_gflops_per_s']:.1f} |")
    return lines


def write_json(args: argparse.Namespace, rates: dict[int, dict], **measured) -> None:
    """``--json``: the arguments, the per-layer measurements (if any) and the projections' rates."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **measured, "linear": {str(k): v for k, v in rates.items()},
                       "torch": torch.__version__}, f, indent=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-1.5-7b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="lightkv")
    parser.add_argument("--json", default=None)
    parser.add_argument("--projections-only", metavar="ROWS", default=None,
                        help="only time the projections at these comma-separated row counts (no model is built)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = get_spec(args.model)
    dtype = _dtype(args.dtype, spec)
    t = spec.dims(None if args.projections_only else args.layers)[0]
    if args.projections_only:
        rates = linear_rates(t, [int(n) for n in args.projections_only.split(",")], dtype, args.repeats)
        print("\n".join(rates_markdown(rates)))
        write_json(args, rates)
        return 0
    model = spec.build(num_layers=args.layers, dtype=dtype, device="cpu")
    inputs = make_inputs(model, Workload(images=1, text_before=40, text_after=20), torch.device("cpu"), dtype)
    _, method = make_method(args.method, spec, args.layers)
    runs: dict[str, list[list[float]]] = {"none": [], args.method: []}
    tokens: dict[str, list[int]] = {}
    for rep in range(args.repeats + 1):  # the first is a warm-up
        for label in runs:
            handle = apply(model, method) if label != "none" else None
            try:
                seconds, counts = layer_times(model, inputs)
            finally:
                if handle is not None:
                    handle.remove()
            tokens[label] = counts
            if rep:
                runs[label].append(seconds)
            print(f"repetition {rep}{' (warm-up)' if not rep else ''} {label}: "
                  f"decoder {sum(seconds) * 1000:.0f} ms", flush=True)
    medians = {label: [median([r[i] for r in reps]) for i in range(args.layers)] for label, reps in runs.items()}
    layer_flops = {label: [sum(v for _, v in decoder_layer_flops(t, n).values()) for n in tokens[label]]
                   for label in runs}
    lines = ["| layer | tokens none | tokens lightkv | ms none | ms lightkv | time ratio | FLOPs ratio "
             "| GFLOP/s none | GFLOP/s lightkv |", "|---|---|---|---|---|---|---|---|---|"]
    label = args.method
    for i in range(args.layers):
        a, b = medians["none"][i], medians[label][i]
        fa, fb = layer_flops["none"][i], layer_flops[label][i]
        lines.append(f"| {i} | {tokens['none'][i]} | {tokens[label][i]} | {a * 1000:.0f} | {b * 1000:.0f} "
                     f"| {b / a:.3f} | {fb / fa:.3f} | {fa / a / 1e9:.1f} | {fb / b / 1e9:.1f} |")
    total_a, total_b = sum(medians["none"]), sum(medians[label])
    flops_a, flops_b = sum(layer_flops["none"]), sum(layer_flops[label])
    lines.append(f"| all | | | {total_a * 1000:.0f} | {total_b * 1000:.0f} | **{total_b / total_a:.3f}** "
                 f"| **{flops_b / flops_a:.3f}** | {flops_a / total_a / 1e9:.1f} | {flops_b / total_b / 1e9:.1f} |")
    counts = sorted(set(tokens["none"]) | set(tokens[label]), reverse=True)
    rates = linear_rates(t, counts, dtype, args.repeats)
    lines += ["", *rates_markdown(rates)]
    expected = {lb: sum(rates[n]["seconds"] + rates[n]["attention_seconds"] for n in tokens[lb]) for lb in runs}
    lines += ["", f"Decoder time ratio expected from the projections' and attention's own times at each layer's "
                  f"tokens: {expected[label] / expected['none']:.3f} (measured {total_b / total_a:.3f}, FLOPs "
                  f"{flops_b / flops_a:.3f})"]
    print("\n".join(lines))
    write_json(args, rates, tokens=tokens, seconds=runs, median=medians, layer_flops=layer_flops)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
