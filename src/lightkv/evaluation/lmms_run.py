"""``lightkv eval``: build and run the lmms-eval command for a model, methods and tasks; one results table.

For every method spec (``none``, ``lightkv@0.55``, ``fastv:layer=3,ratio=0.75``, ...: ``lightkv.methods.spec``)
it runs

    [accelerate launch --num_processes N] python -m lmms_eval --model lightkv \\
        --model_args pretrained=<model>,method=<name>,budget=<b>,<field>=<v>,...,stats_path=<run>/lightkv_stats.json \\
        --tasks <tasks> --batch_size <B> --output_path <out>/<label>/lmms --log_samples

then reads lmms-eval's scores (``*_results.json``) and the plugin's efficiency statistics (retained vision
fraction, KV bytes, prefill time; one file per process under data parallel) into <out>/results.json and
<out>/results.md. The task ``lightkv_shapes`` (the offline shapes test split) is written to <out>/tasks first.
lmms-eval itself is needed only to run, not to build the commands (``--dry-run``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .local_task import TASK_NAME, write_shapes_task
from .method_spec import parse_method_spec, spec_to_model_args

__all__ = ["EvalRun", "build_command", "read_scores", "read_efficiency", "run_eval", "markdown_table"]

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class EvalRun:
    """One lmms-eval invocation: a method spec (``label``) on a model and a task list."""

    model: str
    label: str
    tasks: list[str]
    out: Path
    batch_size: int = 1
    num_processes: int = 1
    model_args: dict[str, Any] = field(default_factory=dict)  # extra plugin arguments (dtype, grid, fields, ...)
    include_paths: list[str] = field(default_factory=list)
    limit: int | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        """<out>/<label> with every character outside letters, digits, '.' and '-' as '_' (lightkv@0.55 ->
        lightkv_0.55)."""
        return self.out / (re.sub(r"[^A-Za-z0-9.\-]+", "_", self.label.strip()).strip("_") or "none")

    @property
    def stats_path(self) -> Path:
        return self.folder / "lightkv_stats.json"


def _arg_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)  # the plugin reads 1;2;3 as a list
    text = str(value)
    if "," in text or "=" in text:
        raise ValueError(f"model argument value {text!r} may not contain ',' or '='")
    return text


def build_command(run: EvalRun, python: str = sys.executable) -> list[str]:
    """The lmms-eval command line (a list for subprocess) of ``run``."""
    model_args: dict[str, Any] = {"pretrained": run.model, **spec_to_model_args(run.label)}
    model_args.update(run.model_args)
    model_args["stats_path"] = str(run.stats_path)
    args_text = ",".join(f"{key}={_arg_value(value)}" for key, value in model_args.items() if value is not None)
    if run.num_processes > 1:
        # --multi_gpu: one process per GPU (on a machine without GPUs, the same processes run on the CPU)
        launcher = [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(run.num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        launcher = [python]
    command = launcher + ["-m", "lmms_eval", "--model", "lightkv", "--model_args", args_text,
                          "--tasks", ",".join(run.tasks), "--batch_size", str(run.batch_size),
                          "--output_path", str(run.folder / "lmms"), "--log_samples"]
    if run.include_paths:
        command += ["--include_path", ",".join(run.include_paths)] if len(run.include_paths) > 1 else \
            ["--include_path", run.include_paths[0]]
    if run.limit is not None:
        command += ["--limit", str(run.limit)]
    return command + list(run.extra_args)


def read_scores(folder: Path) -> tuple[dict[str, dict[str, float]], Path | None]:
    """{task: {metric: value}} from the newest lmms-eval ``*_results.json`` under ``folder`` (stderr left out)."""
    files = sorted(Path(folder).rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}, None
    results = json.loads(files[-1].read_text()).get("results", {})
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if key == "alias" or "stderr" in metric or not isinstance(value, (int, float)):
                continue
            scores.setdefault(task, {})[metric if filter_name in ("none", "") else key] = float(value)
    return scores, files[-1]


def read_efficiency(stats_path: Path) -> dict[str, dict[str, Any]]:
    """Per task efficiency from the plugin's statistics file(s), summed over data-parallel processes."""
    from .lmms_stats import summarize

    paths = [stats_path] if stats_path.exists() else sorted(stats_path.parent.glob(f"{stats_path.stem}.rank*.json"))
    raw: dict[str, dict[str, float]] = {}
    for path in paths:
        for task, counters in json.loads(path.read_text()).get("raw", {}).items():
            total = raw.setdefault(task, {})
            for key, value in counters.items():
                total[key] = total.get(key, 0) + value
    return {task: summarize(counters) for task, counters in raw.items()}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """One line per (method, task): scores, then retained vision fraction, KV per sequence and prefill time."""
    lines = ["| method | task | scores | retained | KV MiB / seq | KV ratio | prefill ms / seq |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        scores = ", ".join(f"{k} {_fmt(v)}" for k, v in row["scores"].items()) or "-"
        eff = row.get("efficiency") or {}
        kv = eff.get("kv_bytes_per_sequence")
        lines.append(f"| {row['method']} | {row['task']} | {scores} | {_fmt(eff.get('retained_fraction'))} | "
                     f"{_fmt(None if kv is None else kv / 2 ** 20, 2)} | {_fmt(eff.get('kv_ratio'))} | "
                     f"{_fmt(eff.get('prefill_ms_per_sequence'), 1)} |")
    return "\n".join(lines)


def _run(command: list[str], log: Path, env: dict[str, str], echo: bool) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                    env=env, text=True, bufsize=1) as process:
        tail: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            handle.write(line)
            tail = (tail + [line])[-40:]
            if echo:
                sys.stdout.write(line)
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"lmms-eval failed (exit {code}); log: {log}\n" + "".join(tail))


def run_eval(model: str, methods: list[str], tasks: list[str], out: str | Path, *, batch_size: int = 1,
             num_processes: int = 1, model_args: dict[str, Any] | None = None, include_paths: list[str] | None = None,
             limit: int | None = None, shapes_per_family: int = 20, offline: bool = False,
             extra_args: list[str] | None = None, dry_run: bool = False, echo: bool = True) -> list[dict]:
    """Run lmms-eval once per method spec and collect one table; returns its rows (also in out/results.json)."""
    out = Path(out).resolve()
    for label in methods:
        parse_method_spec(label)  # fail before any run
    include = list(include_paths or [])
    if TASK_NAME in tasks:
        task_folder = out / "tasks"
        if not dry_run:
            write_shapes_task(task_folder, per_family=shapes_per_family)
        include.append(str(task_folder))
    env = dict(os.environ)
    if offline:
        env.update(OFFLINE_ENV)
    rows: list[dict] = []
    for label in methods:
        run = EvalRun(model=model, label=label, tasks=tasks, out=out, batch_size=batch_size,
                      num_processes=num_processes, model_args=dict(model_args or {}), include_paths=include,
                      limit=limit, extra_args=list(extra_args or []))
        command = build_command(run)
        print("$ " + shlex.join(command), flush=True)
        if dry_run:
            continue
        _run(command, run.folder / "lmms_eval.log", env, echo)
        scores, results_file = read_scores(run.folder / "lmms")
        efficiency = read_efficiency(run.stats_path)
        for task in sorted(set(scores) | set(efficiency)):
            rows.append({"method": label, "task": task, "scores": scores.get(task, {}),
                         "efficiency": efficiency.get(task), "command": shlex.join(command),
                         "results_file": None if results_file is None else str(results_file)})
    if dry_run:
        return rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    table = markdown_table(rows)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return rows
