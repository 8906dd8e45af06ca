"""The method-author API: frozen methods, numbers in schedules, one prediction protocol (checked against runs of
a sample with two images of different grids), the skipped-stage warning and the README's "Adding a method"."""

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import lightkv
from lightkv.methods.registry import unregister_method
from lightkv.testing import qwen_prompt, tiny_qwen2_5_vl

N_LAYERS = 4
GRIDS = [(24, 24), (12, 18)]  # 576 + 216 = 792 vision tokens in one sample

# name -> (method, vision tokens per layer of one sample with images of GRIDS), counted by hand:
#  windowed merges act per image window: 576 -> 288 -> 144 and 216 -> 108 -> 54 (W=2 then W=1, ratio 0.5);
#  pruning acts per sample over all 792 patches; SparseVLM per image (keep + recycled clusters):
#  576 -> 100 + 15, 216 -> 100 + 4; then 115 -> 50 + 3, 104 -> 50 + 2; then 53 -> 20 + 2, 52 -> 20 + 2
TWO_GRID_CASES = {
    "lightkv": (lambda: lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5]), [792, 792, 396, 198]),
    "tome": (lambda: lightkv.ToMe(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5]), [792, 792, 396, 198]),
    "tome_sized": (lambda: lightkv.ToMe(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5], size_weighted=True),
                   [792, 792, 396, 198]),
    "random": (lambda: lightkv.Random(layer=1, ratio=0.5), [792, 792, 396, 396]),
    "fastv": (lambda: lightkv.FastV(layer=1, ratio=0.75), [792, 792, 198, 198]),
    "dart": (lambda: lightkv.DART(layer=0, ratio=0.5), [792, 396, 396, 396]),
    "pdrop": (lambda: lightkv.PDrop(layers=[0, 1, 2], ratio=0.5), [792, 396, 198, 99]),
    "sparsevlm": (lambda: lightkv.SparseVLM(layers=[0, 1, 2], keep_tokens=[100, 50, 20]), [792, 219, 105, 44]),
}


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl(num_layers=N_LAYERS, attn_implementation="eager")


def two_grid_prompt(model, grids=GRIDS):
    return qwen_prompt(model, [1, 10, 11, 12], [20, 21, 22, 23], images=grids)


def prefill_stats(model, method, inputs):
    with torch.no_grad(), lightkv.apply(model, method) as handle:
        model(**inputs)
    return handle.stats


@pytest.mark.parametrize("name", list(TWO_GRID_CASES))
def test_kept_per_layer_of_a_two_grid_sample(qwen, name):
    method, expected = TWO_GRID_CASES[name][0](), TWO_GRID_CASES[name][1]
    assert method.kept_per_layer(N_LAYERS, GRIDS) == expected
    assert lightkv.retained_fraction(method, N_LAYERS, GRIDS) == pytest.approx(sum(expected) / (N_LAYERS * 792))
    stats = prefill_stats(qwen, method, two_grid_prompt(qwen))
    assert stats.vision_tokens == [expected]


def test_visionzip_kept_per_layer_per_image():
    # 64 of each image at every layer (it acts before the decoder); an image of at most `dominant` stays whole
    assert lightkv.VisionZip(dominant=54, contextual=10).kept_per_layer(3, GRIDS) == [128] * 3
    assert lightkv.VisionZip(dominant=54, contextual=10).kept_per_layer(2, [(24, 24), (6, 8)]) == [112] * 2
    assert lightkv.VisionZip(dominant=40, contextual=10).kept_per_layer(2, [(6, 8)]) == [48] * 2


def test_kept_per_layer_rejects_a_bare_grid():
    with pytest.raises(ValueError, match=r"for one image write \[\(24, 24\)\]"):
        lightkv.FastV().kept_per_layer(32, (24, 24))
    with pytest.raises(ValueError, match="non-empty"):
        lightkv.FastV().kept_per_layer(32, [])
    with pytest.raises(ValueError, match="stage layer 2 does not exist"):
        lightkv.FastV(layer=2).kept_per_layer(2, [(4, 4)])


def test_deprecated_prediction_wrappers_agree():
    method = lightkv.LightKV(layers=[12, 18, 24], windows=[4, 2, 1], ratios=[0.5] * 3)
    with pytest.warns(DeprecationWarning):
        old = lightkv.predict_retained_fraction(method, 32, 576, num_images=2)
    assert old["kept_per_layer"] == method.kept_per_layer(32, [(24, 24)] * 2)
    assert old["retained_fraction"] == lightkv.retained_fraction(method, 32, [(24, 24)])
    with pytest.warns(DeprecationWarning):
        assert lightkv.predict_kept_per_layer(lightkv.PDrop(), 32, (24, 24)) == \
            lightkv.PDrop().kept_per_layer(32, [(24, 24)])


# -- frozen methods --------------------------------------------------------------------------------------------

ALL_METHODS = [lightkv.LightKV(), lightkv.ToMe(), lightkv.Random(), lightkv.FastV(), lightkv.PDrop(),
               lightkv.SparseVLM(), lightkv.VisionZip(), lightkv.DART()]


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: type(m).__name__)
def test_methods_are_frozen(method):
    name = next(f.name for f in dataclasses.fields(method) if f.name != "positions")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(method, name, getattr(method, name))
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.positions = "compact"
    assert dataclasses.replace(method, positions="compact").positions == "compact"


def test_replace_revalidates_and_normalises():
    method = lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5])
    changed = dataclasses.replace(method, ratios=[0.25, 0.5])
    assert changed.ratios == (0.25, 0.5) and method.ratios == (0.5, 0.5)
    with pytest.raises(ValueError, match="ratios must lie in"):
        dataclasses.replace(method, ratios=[2.0, 0.5])
    assert dataclasses.replace(lightkv.FastV(), ratio=1).ratio == 1.0


# -- numbers of any kind (defect 9) ----------------------------------------------------------------------------


def test_numpy_numbers_in_schedules():
    """These raised TypeError before: only built-in int/float passed the checks."""
    method = lightkv.LightKV(layers=np.array([1, 2]), windows=[np.int64(2), np.int32(1)],
                             ratios=np.array([0.5, 0.25], dtype=np.float32))
    assert method.layers == (1, 2) and method.windows == (2, 1) and method.ratios == (0.5, 0.25)
    assert all(type(v) is int for v in method.layers + method.windows)
    assert all(type(v) is float for v in method.ratios)
    fastv = lightkv.FastV(layer=np.int64(2), ratio=np.float32(0.5))
    assert (fastv.layer, fastv.ratio) == (2, 0.5) and type(fastv.layer) is int and type(fastv.ratio) is float
    assert lightkv.PDrop(layers=np.arange(1, 4)).layers == (1, 2, 3)
    assert lightkv.DART(num_pivots=np.int16(4)).num_pivots == 4
    assert lightkv.SparseVLM(layers=np.array([1]), keep_tokens=np.array([10])).keep_tokens == (10,)
    assert lightkv.VisionZip(dominant=np.int64(5), contextual=np.int64(1)).dominant == 5
    assert lightkv.Random(seed=np.uint8(3)).seed == 3
    # booleans and non-numbers are still refused
    with pytest.raises(TypeError):
        lightkv.FastV(layer=True)
    with pytest.raises(TypeError):
        lightkv.FastV(ratio=np.bool_(True))
    with pytest.raises(TypeError):
        lightkv.LightKV(layers=[1.5], windows=[1], ratios=[0.5])
    with pytest.raises(TypeError):
        lightkv.LightKV(layers=[1], windows=[1], ratios=["0.5"])
    with pytest.raises(TypeError):
        lightkv.PDrop(layers=np.float64(3.0))


# -- skipped stages are said once (defect 8) --------------------------------------------------------------------


def test_skipped_stage_warns_once_per_grid(qwen, caplog):
    # stage 0 has 4 x 4 windows: an image needs 8 * 16 = 128 tokens, the 6 x 8 one has 48
    method = lightkv.LightKV(layers=[1], windows=[4], ratios=[0.5], guidance="uniform")
    inputs = two_grid_prompt(qwen, [(24, 24), (6, 8)])
    with caplog.at_level(logging.WARNING, logger="lightkv"):
        for _ in range(3):
            stats = prefill_stats(qwen, method, inputs)
    assert stats.vision_tokens == [[624, 624, 288 + 48, 288 + 48]]  # the small image is left whole
    warnings = [r for r in caplog.records if r.name == "lightkv" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "6 x 8 image grid" in message and "stage 0" in message and "layer 1" in message
    assert "8 x 4^2 = 128" in message and "48 vision tokens" in message
    # a new method instance (e.g. a changed copy) says it again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightkv"):
        prefill_stats(qwen, dataclasses.replace(method), inputs)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


# -- the author API in one place ----------------------------------------------------------------------------------


def test_author_api_is_exported_once():
    from lightkv import core, methods
    from lightkv.methods import base

    assert lightkv.StageContext is methods.StageContext is base.StageContext
    assert lightkv.StageResult is methods.StageResult is core.StageResult is core.MergeResult
    assert methods.MergeResult is core.StageResult
    for cls in (lightkv.FastV, lightkv.PDrop, lightkv.Random, lightkv.DART):
        assert issubclass(cls, lightkv.ScorePruneMethod)
    for cls in (lightkv.LightKV, lightkv.ToMe):
        assert issubclass(cls, lightkv.WindowMergeMethod)


def test_no_method_imports_another_methods_private_names():
    folder = Path(lightkv.methods.__file__).parent
    shared = {"_common", "base", "registry", "spec", "__init__", "pruning"}
    for path in folder.glob("*.py"):
        text = path.read_text()
        for module, names in re.findall(r"from \.(\w+) import \(?([^)\n]*)", text):
            if module in shared:
                continue
            assert not any(n.strip().startswith("_") for n in names.split(",")), (path.name, module, names)


def readme_example():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_adding_a_method_example_runs(qwen, capsys):
    namespace = {}
    try:
        exec(compile(readme_example(), "README.md", "exec"), namespace)
        printed = capsys.readouterr().out.splitlines()
        assert printed[0] == "[792, 792, 198, 198]"
        assert "NormPrune(" in printed[1]
        NormPrune = namespace["NormPrune"]
        assert lightkv.get_method("normprune").cls is NormPrune
        assert lightkv.build_method("normprune@0.5", num_layers=32, grids=[(24, 24)]) == \
            lightkv.match_budget("normprune", 0.5, 32, (24, 24)).method
        # on a model: the kept counts are the predicted ones
        method = namespace["method"]
        stats = prefill_stats(qwen, method, two_grid_prompt(qwen))
        assert stats.vision_tokens == [method.kept_per_layer(N_LAYERS, GRIDS)]
    finally:
        unregister_method("normprune")
