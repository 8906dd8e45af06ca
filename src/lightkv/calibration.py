"""Calibrated LightKV schedules: search stage layers, windows, ratios and guidance on a few prompts.

    result = lightkv.calibrate(model, processor, samples)               # smallest vision KV at loyalty >= 0.99
    result = lightkv.calibrate(model, processor, samples, budget=0.35)  # most loyal at vision KV <= 0.35
    handle = lightkv.apply(model, result.method)                        # or build_method(result.spec)

A candidate is scored against the uncompressed model on the calibration samples (run once, reused): its
loyalty is the share of prompts whose first answer token (the greedy next token after the prompt) is the
uncompressed model's, and its KL the mean KL divergence of that next-token distribution from the uncompressed one.
Its vision KV (the mean over decoder layers of cached / prompt vision tokens, as ``lightkv.retained_fraction``) is
predicted from the samples' image grids before it runs, so candidates are ordered and pruned without running them.

The search (``calibrate``):
1. coarse: for each guidance mode, the paper's shape (``match_budget("lightkv", target)``) on a ladder of targets;
   without a budget, a bisection over the ladder for the smallest vision KV that keeps ``min_loyalty``; with one,
   the rung closest below the budget (below the ladder's floor: the gentlest single moves down from its lowest
   rung, predicted only, until within the budget);
2. fine: from the best so far, single moves under its guidance mode (a stage one layer earlier or later, a ratio
   one step up or down, a window changed, a stage added or removed); without a budget, the moves that
   lower the vision KV are run in ascending vision-KV order and the first that keeps ``min_loyalty`` becomes the
   new best, until none does; with a budget, every move within it runs and the most loyal (then the lowest KL)
   becomes the new best, until none improves.
A candidate stops as soon as it cannot pass (more mismatches than ``min_loyalty`` allows, or than the best has
with a budget), the batches where earlier candidates disagreed most running first; a candidate that merges at
least as early and as much as one that failed (same windows and guidance) is assumed to fail and is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .guidance import GUIDANCE_MODES
from .methods import LightKV

__all__ = ["calibrate", "Calibration", "Trial", "spec_text", "shapes_samples"]

DEFAULT_MIN_LOYALTY = 0.99
DEFAULT_RATIOS = (0.125, 0.25, 0.375, 0.5)
DEFAULT_WINDOWS = (1, 2, 4, 8)
_LADDER = tuple(round(0.95 - 0.05 * i, 2) for i in range(18))  # coarse targets 0.95 .. 0.10


@dataclass(frozen=True)
class Trial:
    """One candidate that ran. ``loyalty`` and ``kl`` are over the ``evaluated`` samples that ran; a candidate
    stopped early (``complete=False``) ran the batches where earlier candidates disagreed most first, so its
    numbers are no estimate of the whole set, only proof that it could not pass."""

    spec: str
    vision_kv: float
    loyalty: float
    kl: float
    evaluated: int
    complete: bool
    phase: str  # "coarse" or "fine"

    def row(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Calibration:
    """What ``calibrate`` chose: ``method`` and its ``spec`` text (``build_method(spec) == method``), its
    loyalty, KL and predicted vision KV on the calibration samples, and every trial (``frontier``: the complete
    trials no other complete trial beats on both vision KV and loyalty)."""

    method: LightKV
    spec: str
    loyalty: float
    kl: float
    vision_kv: float
    samples: int
    min_loyalty: float | None
    budget: float | None
    trials: list[Trial] = field(default_factory=list)

    @property
    def frontier(self) -> list[Trial]:
        done = [t for t in self.trials if t.complete]
        return sorted((t for t in done if not any(o.vision_kv <= t.vision_kv and o.loyalty >= t.loyalty
                                                  and (o.vision_kv, o.loyalty) != (t.vision_kv, t.loyalty)
                                                  for o in done)), key=lambda t: t.vision_kv)

    def to_json(self) -> dict:
        return {"spec": self.spec, "loyalty": self.loyalty, "kl": self.kl, "vision_kv": self.vision_kv,
                "samples": self.samples, "min_loyalty": self.min_loyalty, "budget": self.budget,
                "frontier": [t.row() for t in self.frontier], "trials": [t.row() for t in self.trials]}

    def plot(self, path: str | Path, title: str = "calibration") -> None:
        """Vision KV vs loyalty of every trial: complete ones, the frontier, the choice; stopped ones hollow."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        stopped = [t for t in self.trials if not t.complete]
        done = [t for t in self.trials if t.complete]
        if stopped:
            ax.scatter([t.vision_kv for t in stopped], [100 * t.loyalty for t in stopped], s=14,
                       facecolors="none", edgecolors="gray", label="stopped early (on the samples run)")
        ax.scatter([t.vision_kv for t in done], [100 * t.loyalty for t in done], s=16, color="tab:blue",
                   label="complete")
        front = self.frontier
        ax.plot([t.vision_kv for t in front], [100 * t.loyalty for t in front], color="tab:blue", lw=1)
        ax.scatter([self.vision_kv], [100 * self.loyalty], s=60, marker="*", color="tab:red", zorder=3,
                   label="chosen")
        if self.min_loyalty is not None:
            ax.axhline(100 * self.min_loyalty, color="tab:red", ls="--", lw=1, label="min loyalty")
        if self.budget is not None:
            ax.axvline(self.budget, color="tab:red", ls="--", lw=1, label="budget")
        ax.set_xlabel("vision KV (mean retained vision fraction over layers)")
        ax.set_ylabel(f"loyalty on {self.samples} calibration samples (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def spec_text(method: LightKV) -> str:
    """The spec string of a LightKV method: layers, windows, ratios and guidance always, other fields when they
    differ from their defaults; ``build_method(spec_text(m)) == m``."""
    from .methods.spec import MethodSpec

    always = ("layers", "windows", "ratios", "guidance")
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        default = f.default
        if f.name == "rounds" and isinstance(value, tuple):  # stored per stage; one round each is the default
            default = (default,) * len(value)
        if f.init and (f.name in always or value != default):
            fields[f.name] = list(value) if isinstance(value, tuple) else value
    return str(MethodSpec("lightkv", None, fields))


def shapes_samples(processor: Any, num: int, split: str = "val", batch_size: int = 10) -> list[dict]:
    """``num`` questions of the bundled shapes set (``split``: "val" for calibration) as processor batches
    of ``batch_size``, families in turn."""
    from .evaluation.harness import prompt_for, question_set
    from .evaluation.shapes import FAMILIES, SPLIT_SEEDS

    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"the number of samples must be an integer >= 1, got {num!r}")
    items = question_set(math.ceil(num / len(FAMILIES)), split)[:num]
    prompt = prompt_for(processor)
    return [dict(processor(images=[s.image for s, _ in items[i:i + batch_size]],
                           text=[prompt(q.question) for _, q in items[i:i + batch_size]],
                           return_tensors="pt", padding=True))
            for i in range(0, len(items), batch_size)]


# -- scoring ----------------------------------------------------------------------------------------------------


class _Scorer:
    """The uncompressed run (once), each batch's image grids, and candidate runs against them."""

    def __init__(self, model: Any, batches: list[dict]) -> None:
        from .adapters import get_adapter

        self.model = model
        self.batches = batches
        adapter = get_adapter(model)
        self.num_layers = len(adapter.decoder_layers)
        self.grids: dict[tuple[tuple[int, int], ...], int] = {}  # the image grids of a sample -> samples
        self.ref_tokens: list[torch.Tensor] = []
        self.ref_logp: list[torch.Tensor] = []
        self.trouble = [0] * len(batches)  # mismatches of earlier candidates, per batch
        with torch.no_grad():
            for batch in batches:
                layout = adapter.vision_layout(batch.get("input_ids"), batch.get("inputs_embeds"), batch)
                if layout is not None:
                    hw = layout.grid_hw.tolist()
                    for row in layout.image_index:
                        images = sorted(set(row[row >= 0].tolist()))
                        if images:
                            key = tuple((int(hw[i][0]), int(hw[i][1])) for i in images)
                            self.grids[key] = self.grids.get(key, 0) + 1
                logp = self._next_token_logp(batch)
                self.ref_logp.append(logp)
                self.ref_tokens.append(logp.argmax(-1))
        self.size = sum(len(t) for t in self.ref_tokens)
        if not self.grids:
            raise ValueError("calibrate: no calibration sample holds an image the model's adapter can locate")
        self.common_grids = max(self.grids, key=self.grids.get)

    def _next_token_logp(self, batch: Mapping[str, Any]) -> torch.Tensor:
        out = self.model(**batch, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float().log_softmax(-1)

    def vision_kv(self, method: LightKV) -> float:
        """Predicted mean retained vision fraction over layers and samples (vision KV bytes / uncompressed)."""
        kept = full = 0
        for grids, count in self.grids.items():
            kept += count * sum(method.kept_per_layer(self.num_layers, grids))
            full += count * self.num_layers * sum(h * w for h, w in grids)
        return kept / full

    def merges_every_stage(self, method: LightKV) -> bool:
        for grids in self.grids:
            counts = [sum(h * w for h, w in grids), *method.kept_after_each_stage(grids)]
            if any(b >= a for a, b in zip(counts, counts[1:])):
                return False
        return True

    @torch.no_grad()
    def run(self, method: LightKV, max_mismatches: int) -> tuple[int, int, float, bool]:
        """(mismatches, samples run, summed KL, complete): stops once mismatches exceed ``max_mismatches``."""
        from .engine import apply

        order = sorted(range(len(self.batches)), key=lambda b: -self.trouble[b])
        mismatches = evaluated = 0
        kl = 0.0
        handle = apply(self.model, method)
        try:
            for b in order:
                logp = self._next_token_logp(self.batches[b])
                ref = self.ref_logp[b]
                wrong = int((logp.argmax(-1) != self.ref_tokens[b]).sum())
                self.trouble[b] += wrong
                mismatches += wrong
                evaluated += len(logp)
                kl += float((ref.exp() * (ref - logp)).sum())
                if mismatches > max_mismatches:
                    return mismatches, evaluated, kl, evaluated == self.size
        finally:
            handle.remove()
        return mismatches, evaluated, kl, True


# -- candidates ---------------------------------------------------------------------------------------------------


def _key(method: LightKV) -> tuple:
    return (tuple(method.layers), tuple(method.windows), tuple(method.ratios), tuple(method.rounds), method.guidance)


def _dominates(failed: LightKV, other: LightKV) -> bool:
    """``other`` merges at least as early and as much as ``failed`` with the same windows, rounds and guidance."""
    return (failed.guidance == other.guidance and tuple(failed.windows) == tuple(other.windows)
            and tuple(failed.rounds) == tuple(other.rounds)
            and len(failed.layers) == len(other.layers)
            and all(b <= a for a, b in zip(failed.layers, other.layers))
            and all(b >= a for a, b in zip(failed.ratios, other.ratios)))


def _moves(method: LightKV, layers: Sequence[int], windows: Sequence[int], ratios: Sequence[float],
           max_stages: int) -> Iterable[dict]:
    """Schedules one step from ``method``, under its guidance mode (a stage keeps its rounds; a new one has 1)."""
    L, W, R, K = list(method.layers), list(method.windows), list(method.ratios), list(method.rounds)
    structures = []
    for i in range(len(L)):
        for step in (-1, 1):
            structures.append((L[:i] + [L[i] + step] + L[i + 1:], W, R, K))
        up = [r for r in ratios if r > R[i]]
        down = [r for r in ratios if r < R[i]]
        if up:
            structures.append((L, W, R[:i] + [min(up)] + R[i + 1:], K))
        if down:
            structures.append((L, W, R[:i] + [max(down)] + R[i + 1:], K))
        for w in windows:
            if w != W[i]:
                structures.append((L, W[:i] + [w] + W[i + 1:], R, K))
        if len(L) > 1:
            structures.append((L[:i] + L[i + 1:], W[:i] + W[i + 1:], R[:i] + R[i + 1:], K[:i] + K[i + 1:]))
    if len(L) < max_stages:
        for layer in layers:
            if layer in L:
                continue
            i = sum(1 for x in L if x < layer)
            for w in windows:
                structures.append((L[:i] + [layer] + L[i:], W[:i] + [w] + W[i:], R[:i] + [min(ratios)] + R[i:],
                                   K[:i] + [1] + K[i:]))
    allowed = set(layers)
    for new_layers, new_windows, new_ratios, new_rounds in structures:
        if all(x in allowed for x in new_layers) and sorted(set(new_layers)) == list(new_layers):
            yield dict(layers=new_layers, windows=new_windows, ratios=new_ratios, rounds=new_rounds,
                       guidance=method.guidance)


def _check_arguments(samples: Any, budget: Any, min_loyalty: Any, guidance: Any, ratios: Any, windows: Any,
                     max_stages: Any, max_trials: Any) -> float | None:
    def number(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)

    if not isinstance(samples, (list, tuple)) or not samples:
        raise ValueError("calibrate: samples must be a non-empty list of model-input dicts or (image, prompt) pairs")
    if budget is not None and (not number(budget) or not 0.0 < budget <= 1.0):
        raise ValueError(f"calibrate: budget must be a vision KV fraction in (0, 1], got {budget!r}")
    if budget is not None and min_loyalty is not None:
        raise ValueError("calibrate: give budget= (the most loyal schedule within it) or min_loyalty= (the "
                         "smallest vision KV that keeps it), not both")
    if min_loyalty is not None and (not number(min_loyalty) or not 0.0 < min_loyalty <= 1.0):
        raise ValueError(f"calibrate: min_loyalty must be a fraction in (0, 1], got {min_loyalty!r}")
    if not guidance or any(g not in GUIDANCE_MODES for g in guidance):
        raise ValueError(f"calibrate: guidance must be a non-empty list of {GUIDANCE_MODES}, got {guidance!r}")
    if not ratios or any(not number(r) or not 0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"calibrate: ratios must be a non-empty list of numbers in (0, 1], got {ratios!r}")
    if not windows or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in windows):
        raise ValueError(f"calibrate: windows must be a non-empty list of integers >= 1, got {windows!r}")
    for name, value in (("max_stages", max_stages), ("max_trials", max_trials)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"calibrate: {name} must be an integer >= 1, got {value!r}")
    return None if budget is not None else (DEFAULT_MIN_LOYALTY if min_loyalty is None else float(min_loyalty))


def _as_batches(samples: Sequence[Any], processor: Any, batch_size: int) -> list[dict]:
    if all(isinstance(s, Mapping) for s in samples):
        return [dict(s) for s in samples]
    if not all(isinstance(s, tuple) and len(s) == 2 for s in samples):
        raise ValueError("calibrate: samples must all be model-input dicts (processor outputs) or all "
                         "(image, prompt) pairs")
    if processor is None:
        raise ValueError("calibrate: (image, prompt) samples need the processor")
    return [dict(processor(images=[im for im, _ in samples[i:i + batch_size]],
                           text=[p for _, p in samples[i:i + batch_size]], return_tensors="pt", padding=True))
            for i in range(0, len(samples), batch_size)]


def calibrate(model: Any, processor: Any, samples: Sequence[Any], budget: float | None = None,
              min_loyalty: float | None = None, *, guidance: Sequence[str] = GUIDANCE_MODES,
              layers: Sequence[int] | None = None, windows: Sequence[int] = DEFAULT_WINDOWS,
              ratios: Sequence[float] = DEFAULT_RATIOS, max_stages: int = 4, max_trials: int = 150,
              batch_size: int = 20, progress: bool = True) -> Calibration:
    """A LightKV schedule for ``model`` calibrated on ``samples`` (see the module docstring for the search).

    samples: model inputs, either a list of dicts (processor outputs, one batch each, rows padded on the
        left: the answer is the next token after each row's last position) or a list of (image, prompt text)
        pairs that ``processor`` turns into batches of ``batch_size``. ``shapes_samples(processor, n)`` gives
        the bundled models' validation questions.
    min_loyalty: without ``budget``, return the schedule with the smallest predicted vision KV whose loyalty on
        the samples is at least this (default 0.99).
    budget: instead, the most loyal schedule (ties: the lowest KL) whose vision KV is at most this.
    guidance, layers (default every decoder layer), windows (per side; those too large for the samples' images
        are left out), ratios: the values the search may use; max_stages: stages per schedule; max_trials:
        candidate runs at most (the best so far is returned when they are spent).
    Raises ValueError with one line for bad arguments, and when no schedule tried keeps ``min_loyalty`` or fits
    within ``budget``.
    """
    from tqdm.auto import tqdm

    from .budget import match_budget

    guidance, ratios, windows = (list(v) if _iterable(v) else [] for v in (guidance, ratios, windows))
    target_loyalty = _check_arguments(samples, budget, min_loyalty, guidance, ratios, windows, max_stages,
                                      max_trials)
    ratios, windows = sorted(set(float(r) for r in ratios)), sorted(set(windows))
    scorer = _Scorer(model, _as_batches(samples, processor, batch_size))
    depth = scorer.num_layers
    layer_choices = sorted(set(range(depth) if layers is None else layers))
    if not layer_choices or any(isinstance(x, bool) or not isinstance(x, int) or not -1 <= x < depth
                                for x in layer_choices):
        raise ValueError(f"calibrate: layers must be decoder layers in -1..{depth - 1}, got {layers!r}")
    smallest = min(h * w for grids in scorer.grids for h, w in grids)
    windows = [w for w in windows if LightKV.min_tokens_per_window * w * w <= smallest] or [1]
    allowed = math.floor((1 - target_loyalty) * scorer.size + 1e-9) if target_loyalty is not None else None

    trials: list[Trial] = []
    seen: dict[tuple, tuple[LightKV, float, int, float, bool] | None] = {}  # key -> (method, kv, wrong, kl, done)
    failed: list[LightKV] = []
    bar = tqdm(desc="calibrate", unit="trial", total=max_trials, disable=not progress, leave=False)

    def run(method: LightKV, limit: int, phase: str) -> tuple[int, float, bool] | None:
        """Run ``method`` unless seen, pruned or out of trials; (mismatches, KL, complete) or None."""
        key = _key(method)
        if key in seen:
            found = seen[key]
            return None if found is None else found[2:]
        if len(trials) >= max_trials or (target_loyalty is not None and any(_dominates(f, method) for f in failed)):
            return None
        kv = scorer.vision_kv(method)
        wrong, evaluated, kl, done = scorer.run(method, limit)
        trials.append(Trial(spec_text(method), kv, 1 - wrong / evaluated, kl / evaluated, evaluated, done, phase))
        seen[key] = (method, kv, wrong, kl, done)
        if target_loyalty is not None and wrong > allowed:
            failed.append(method)
        bar.update(1)
        bar.set_postfix_str(f"vision KV {kv:.3f} loyalty {1 - wrong / evaluated:.3f}")
        return wrong, kl, done

    def build(**fields: Any) -> LightKV | None:
        try:
            method = LightKV(**fields)
        except (TypeError, ValueError):
            return None
        return method if scorer.merges_every_stage(method) else None

    lowest = [1.0]  # the lowest vision KV seen in the search space

    def descend(method: LightKV) -> tuple[float, LightKV]:
        """Without running anything: the gentlest single moves down from ``method`` until within the budget."""
        kv = scorer.vision_kv(method)
        while kv > budget + 1e-12:
            lower = [(scorer.vision_kv(m), m) for fields in _moves(method, layer_choices, windows, ratios, max_stages)
                     for m in [build(**fields)] if m is not None]
            lower = [option for option in lower if option[0] < kv - 1e-12]
            if not lower:
                break
            kv, method = max(lower, key=lambda option: option[0])
        lowest[0] = min(lowest[0], kv)
        return kv, method

    # coarse: the paper's shape on a ladder of targets, per guidance mode
    ladders = {}
    for mode in guidance:
        rungs: dict[tuple, tuple[float, LightKV]] = {}
        for target in _LADDER:
            try:
                method = match_budget("lightkv", target, depth, grids=scorer.common_grids, guidance=mode).method
            except ValueError:
                continue
            if scorer.merges_every_stage(method) and all(x in layer_choices for x in method.layers):
                rungs.setdefault(_key(method), (scorer.vision_kv(method), method))
        ladders[mode] = sorted(rungs.values(), key=lambda r: r[0])
    best: tuple[LightKV, float, int, float] | None = None  # method, kv, mismatches, kl

    def better(kv: float, wrong: int, kl: float) -> bool:
        if best is None:
            return True
        if target_loyalty is not None:
            return (kv, wrong, kl) < (best[1], best[2], best[3])
        return (wrong, kl, kv) < (best[2], best[3], best[1])

    try:
        for mode, ladder in ladders.items():
            if target_loyalty is not None:
                lo, hi = 0, len(ladder) - 1  # bisect for the lowest feasible rung, feasibility assumed monotone
                found = None
                while lo <= hi:
                    mid = (lo + hi) // 2
                    outcome = run(ladder[mid][1], allowed, "coarse")
                    if outcome is not None and outcome[0] <= allowed:
                        found, hi = mid, mid - 1
                    else:
                        lo = mid + 1
                if found is not None:
                    kv, method = ladder[found]
                    wrong, kl, _ = seen[_key(method)][2:]
                    if better(kv, wrong, kl):
                        best = (method, kv, wrong, kl)
            else:
                within = [r for r in ladder if r[0] <= budget + 1e-12]
                if not within and ladder:  # below the paper shape's floor: step down from its lowest rung
                    within = [descend(ladder[0][1])]
                if within and within[-1][0] <= budget + 1e-12:
                    kv, method = within[-1]
                    outcome = run(method, scorer.size if best is None else best[2], "coarse")
                    if outcome is not None and outcome[2] and better(kv, outcome[0], outcome[1]):
                        best = (method, kv, outcome[0], outcome[1])

        # fine: single moves from the best
        while best is not None and len(trials) < max_trials:
            neighbours = []
            for fields in _moves(best[0], layer_choices, windows, ratios, max_stages):
                method = build(**fields)
                if method is None or _key(method) in seen:
                    continue
                kv = scorer.vision_kv(method)
                if (kv < best[1] - 1e-12) if target_loyalty is not None else (kv <= budget + 1e-12):
                    neighbours.append((kv, len(neighbours), method))
            neighbours.sort(key=lambda n: n[:2])
            moved = False
            for kv, _, method in neighbours:
                outcome = run(method, allowed if target_loyalty is not None else best[2], "fine")
                if outcome is None or not outcome[2]:
                    continue
                wrong, kl, _ = outcome
                if target_loyalty is not None:
                    if wrong <= allowed:
                        best, moved = (method, kv, wrong, kl), True
                        break
                elif better(kv, wrong, kl):
                    best, moved = (method, kv, wrong, kl), True
            if not moved:
                break
    finally:
        bar.close()

    if best is None:
        if target_loyalty is not None:
            raise ValueError(f"calibrate: no LightKV schedule tried keeps loyalty >= {target_loyalty:g} on these "
                             f"{scorer.size} samples; lower min_loyalty or give more samples")
        lowest = min([lowest[0]] + [rung[0] for ladder in ladders.values() for rung in ladder])
        raise ValueError(f"calibrate: no LightKV schedule tried fits vision KV <= {budget:g} on this model; the "
                         f"lowest reached is {lowest:.3f}")
    method, kv, wrong, kl = best
    return Calibration(method=method, spec=spec_text(method), loyalty=1 - wrong / scorer.size,
                       kl=kl / scorer.size, vision_kv=kv, samples=scorer.size, min_loyalty=target_loyalty,
                       budget=budget, trials=trials)


def _iterable(value: Any) -> bool:
    return isinstance(value, (list, tuple, range))


def write_calibration(result: Calibration, out: str | Path, title: str = "calibration") -> None:
    """out/method.txt (the spec), out/frontier.json and out/frontier.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "method.txt").write_text(result.spec + "\n")
    (out / "frontier.json").write_text(json.dumps(result.to_json(), indent=1))
    result.plot(out / "frontier.png", title)
