"""lightkv.calibrate: the chosen schedule keeps min_loyalty when re-run, its spec reads back into the same method,
budget mode stays within the budget, bad arguments are one-line errors, and `lightkv calibrate` writes its files."""

from __future__ import annotations

import json

import pytest
import torch

import lightkv
from lightkv.calibration import spec_text
from lightkv.cli import main
from lightkv.engine import apply
from lightkv.methods import LightKV, build_method
from lightkv.testing import batch_prompts, llava_prompt, tiny_llava


@pytest.fixture(scope="module")
def setup():
    model = tiny_llava(num_layers=4, grid=16)
    prompts = [llava_prompt(model, [1, 3 + i % 7], [10 + i, 20 + (3 * i) % 11, 30], seed=i) for i in range(12)]
    batches = [batch_prompts(prompts[i:i + 4]) for i in range(0, 12, 4)]
    return model, batches


@pytest.fixture(scope="module")
def calibrated(setup):
    model, batches = setup
    return lightkv.calibrate(model, None, batches, min_loyalty=0.75, max_trials=25, progress=False)


@torch.no_grad()
def _rerun(model, batches, method):
    """Loyalty, mean KL and measured vision KV of ``method`` against the plain model, from scratch."""
    agree = total = 0
    kl = 0.0
    kv = kv_full = 0
    for batch in batches:
        ref = model(**batch, use_cache=True).logits[:, -1].float().log_softmax(-1)
        handle = apply(model, method)
        try:
            logp = model(**batch, use_cache=True).logits[:, -1].float().log_softmax(-1)
            kv += sum(handle.stats.vision_kv_bytes)
            kv_full += sum(handle.stats.uncompressed_vision_kv_bytes)
        finally:
            handle.remove()
        agree += int((logp.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ref)
        kl += float((ref.exp() * (ref - logp)).sum())
    return agree / total, kl / total, kv / kv_full


def test_min_loyalty_schedule_keeps_it_when_rerun(setup, calibrated):
    model, batches = setup
    result = calibrated
    assert isinstance(result.method, LightKV) and result.samples == 12
    loyalty, kl, measured_kv = _rerun(model, batches, result.method)
    assert loyalty >= 0.75
    assert loyalty == pytest.approx(result.loyalty, abs=1e-12)
    assert kl == pytest.approx(result.kl, rel=1e-4, abs=1e-7)
    assert measured_kv == pytest.approx(result.vision_kv, abs=1e-12)  # the prediction is what the cache holds
    assert result.vision_kv < 1.0
    # no complete trial that kept min_loyalty has a smaller vision KV than the choice
    assert 0 < len(result.trials) <= 25
    for trial in result.trials:
        if trial.complete and trial.loyalty >= 0.75:
            assert trial.vision_kv >= result.vision_kv - 1e-12
    assert result.frontier and all(t.complete for t in result.frontier)
    kvs = [t.vision_kv for t in result.frontier]
    assert kvs == sorted(kvs)


def test_spec_reads_back_into_the_same_method(calibrated):
    result = calibrated
    assert build_method(result.spec) == result.method
    assert result.spec.startswith("lightkv:layers=[")
    other = LightKV(layers=[1, 3], windows=[4, 2], ratios=[0.375, 0.125], guidance="text_to_vision",
                    positions="compact", min_tokens_per_window=4)
    text = spec_text(other)
    assert build_method(text) == other
    assert "positions=compact" in text and "window_layout" not in text  # defaults are left out


def test_budget_mode_stays_within_the_budget(setup):
    model, batches = setup
    result = lightkv.calibrate(model, None, batches, budget=0.5, max_trials=20, progress=False)
    assert result.vision_kv <= 0.5 and result.budget == 0.5 and result.min_loyalty is None
    loyalty, _, measured_kv = _rerun(model, batches, result.method)
    assert measured_kv <= 0.5
    assert loyalty == pytest.approx(result.loyalty, abs=1e-12)
    for trial in result.trials:
        assert trial.vision_kv <= 0.5 + 1e-12
        if trial.complete:
            assert trial.loyalty <= result.loyalty + 1e-12


def test_budget_below_the_paper_shape_floor():
    # on 8 layers the paper's 3-stage shape bottoms out at 0.297 (16x16 grid, match_budget as of this test); the
    # search steps down from it (a 4th stage) without running anything until within the budget
    model = tiny_llava(num_layers=8, grid=16)
    batches = [batch_prompts([llava_prompt(model, [1, 4], [10 + i, 30], seed=i) for i in range(4)])]
    result = lightkv.calibrate(model, None, batches, budget=0.28, max_trials=3, progress=False)
    assert result.vision_kv <= 0.28
    assert _rerun(model, batches, result.method)[2] == pytest.approx(result.vision_kv, abs=1e-12)


def test_unreachable_budget_names_the_lowest(setup):
    model, batches = setup
    with pytest.raises(ValueError, match=r"vision KV <= 0.01 .* lowest reached is 0\.\d+"):
        lightkv.calibrate(model, None, batches, budget=0.01, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=1.5), "budget must be"),
    (dict(min_loyalty=0.0), "min_loyalty must be"),
    (dict(budget=0.3, min_loyalty=0.9), "not both"),
    (dict(guidance=["attention"]), "guidance must be"),
    (dict(ratios=[0.0]), "ratios must be"),
    (dict(windows=[0]), "windows must be"),
    (dict(max_trials=0), "max_trials must be"),
    (dict(layers=[9]), "layers must be"),
])
def test_bad_arguments_are_one_line_errors(setup, kwargs, message):
    model, batches = setup
    with pytest.raises(ValueError, match=message) as err:
        lightkv.calibrate(model, None, batches, progress=False, **kwargs)
    assert "\n" not in str(err.value)


def test_bad_samples(setup):
    model, batches = setup
    with pytest.raises(ValueError, match="non-empty list"):
        lightkv.calibrate(model, None, [], progress=False)
    with pytest.raises(ValueError, match="need the processor"):
        lightkv.calibrate(model, None, [("image", "prompt")], progress=False)
    with pytest.raises(ValueError, match="must all be model-input dicts"):
        lightkv.calibrate(model, None, [batches[0], ("image", "prompt")], progress=False)


def test_cli_writes_method_and_frontier(tmp_path, capsys):
    out = tmp_path / "cal"
    code = main(["calibrate", "--samples", "10", "--out", str(out), "--min-loyalty", "0.8", "--max-trials", "4",
                 "--quiet"])
    assert code == 0
    spec = (out / "method.txt").read_text().strip()
    frontier = json.loads((out / "frontier.json").read_text())
    assert frontier["spec"] == spec and frontier["samples"] == 10 and frontier["min_loyalty"] == 0.8
    assert 1 <= len(frontier["trials"]) <= 4 and frontier["loyalty"] >= 0.8
    assert isinstance(build_method(spec), LightKV)
    assert (out / "frontier.png").stat().st_size > 0
    assert spec in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0.3", "--min-loyalty", "0.9"], "not both"),
    (["--samples", "0"], "expected a positive integer"),
    (["--budget", "1.2"], "expected a fraction in (0, 1]"),
    (["--min-loyalty", "x"], "expected a fraction in (0, 1]"),
    (["--model", "/nonexistent"], "not a model folder"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--out", str(tmp_path / "x"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_moves_keep_each_stage_rounds():
    from lightkv.calibration import _key, _moves

    method = lightkv.LightKV(layers=[1, 3], windows=[2, 1], ratios=[0.5, 0.5], rounds=[2, 1])
    moves = list(_moves(method, range(6), (1, 2), (0.25, 0.5), 3))
    assert moves and all(len(m["rounds"]) == len(m["layers"]) for m in moves)
    assert {tuple(m["rounds"]) for m in moves} == {(2, 1), (2,), (1,), (1, 2, 1), (2, 1, 1)}
    assert _key(method) != _key(lightkv.LightKV(layers=[1, 3], windows=[2, 1], ratios=[0.5, 0.5]))
