"""GPU checks of the lmms-eval plugin on the bundled model (run by scripts/gpu_eval_check.sh).

1. the real lmms-eval command line on the local shapes task, on the GPU, none and LightKV@0.55, against the
   harness run on the same GPU: per-question answers, accuracy, retained fraction, prefill time;
2. device_map: the model split between the GPU and the CPU (vision tower and the first half of the decoder on
   cuda:0, the rest on the CPU) with LightKV applied: do the layer wrappers follow each layer's device, and are
   the answers those of the single-device run?
3. dtype=bfloat16 through the plugin.
Writes OUT/gpu_eval_check.json and prints one line per check; a failing check is reported, not fatal.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

import lightkv
from lightkv.bundled import BUNDLED_MODEL
from lightkv.evaluation.harness import evaluate, load_model, question_set, vision_grid
from lightkv.evaluation.lmms_run import run_eval

PER_FAMILY = 20
DEVICE = os.environ.get("LIGHTKV_CHECK_DEVICE", "cuda")  # "cpu": a smoke test of this script without a GPU


def _schedule(model):
    return lightkv.match_budget("lightkv", 0.55, model.config.text_config.num_hidden_layers, vision_grid(model)).method


def _samples(folder: Path) -> list[str]:
    (path,) = list(folder.rglob("*_samples_*.jsonl"))
    rows = {r["doc_id"]: r["filtered_resps"] for r in map(json.loads, path.read_text().splitlines())}
    return [rows[i] for i in range(len(rows))]


def _plugin_answers(items, **kwargs):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_lmms_eval import GREEDY, _plugin, _requests

    plugin = _plugin(**kwargs)
    start = time.perf_counter()
    answers = [r.text for r in plugin.generate_until(_requests(plugin, items, GREEDY))]
    return answers, time.perf_counter() - start, plugin


def main(out: str) -> int:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    items = question_set(PER_FAMILY)
    model, processor = load_model(BUNDLED_MODEL)
    model.to(DEVICE)
    method = _schedule(model)

    # the harness moves nothing to the model's device: feed it through a processor whose outputs live on cuda
    class CudaProcessor:
        def __init__(self, inner):
            self.inner, self.tokenizer = inner, inner.tokenizer

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs).to(DEVICE)

    harness = {}
    for label, m in (("none", None), ("lightkv@0.55", method)):
        harness[label] = evaluate(model, CudaProcessor(processor), m, items, name=label, batch_size=25, progress=False)

    try:
        rows = run_eval(str(BUNDLED_MODEL), ["none", "lightkv@0.55"], ["lightkv_shapes"], out_dir / "lmms",
                        batch_size=25, shapes_per_family=PER_FAMILY, offline=True, echo=False)
        for row in rows:
            ours = harness[row["method"]]
            answers = _samples(out_dir / "lmms" / row["method"].replace("@", "_"))
            same = sum(a == b for a, b in zip(answers, ours.answers))
            line = (f"lmms-eval on GPU, {row['method']}: exact_match {row['scores']['exact_match']:.3f}, harness on GPU "
                    f"{ours.accuracy:.3f}, same answers {same}/{len(items)}, retained "
                    f"{row['efficiency']['retained_fraction']:.3f} (harness {ours.retained_fraction:.3f}), "
                    f"prefill {row['efficiency']['prefill_ms_per_sequence']:.2f} ms/seq")
            print(line, flush=True)
            report[f"cli_{row['method']}"] = {"line": line, "same": same, "scores": row["scores"],
                                              "efficiency": row["efficiency"]}
    except Exception:
        report["cli_error"] = traceback.format_exc()
        print("lmms-eval CLI on GPU FAILED\n" + report["cli_error"], flush=True)

    single, t_single, _ = _plugin_answers(items, method="lightkv", budget=0.55, batch_size=25, device=DEVICE)
    report["single_device_answers_equal_harness"] = single == harness["lightkv@0.55"].answers
    num_layers = model.config.text_config.num_hidden_layers
    first = 0 if DEVICE == "cuda" else "cpu"
    device_map = {"model.vision_tower": first, "model.multi_modal_projector": first,
                  "model.language_model.embed_tokens": first, "model.language_model.rotary_emb": first,
                  "model.language_model.norm": "cpu", "lm_head": "cpu"}
    for i in range(num_layers):
        device_map[f"model.language_model.layers.{i}"] = first if i < num_layers // 2 else "cpu"
    for label, kwargs in (("device_map cuda:0+cpu, lightkv@0.55", {"method": "lightkv", "budget": 0.55,
                                                                    "device_map": device_map}),
                          ("device_map auto, lightkv@0.55", {"method": "lightkv", "budget": 0.55, "device_map": "auto"}),
                          ("bfloat16, lightkv@0.55", {"method": "lightkv", "budget": 0.55, "dtype": "bfloat16",
                                                      "device": DEVICE})):
        try:
            answers, seconds, plugin = _plugin_answers(items, batch_size=25, **kwargs)
            same = sum(a == b for a, b in zip(answers, single))
            eff = plugin.efficiency()["shapes"]
            line = (f"{label}: same answers as one GPU {same}/{len(items)}, retained {eff['retained_fraction']:.3f}, "
                    f"{seconds:.1f} s")
            report[label] = {"line": line, "same": same, "efficiency": eff}
        except Exception:
            line = f"{label}: FAILED\n{traceback.format_exc()}"
            report[label] = {"error": traceback.format_exc()}
        print(line, flush=True)
    (out_dir / "gpu_eval_check.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "out/gpu-eval-check"))
