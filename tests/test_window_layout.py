"""LightKV / ToMe ``window_layout``: "original" windows on original grid coordinates, "regrid" (the authors'
release) re-lays the current tokens of each image by rank on a pseudo-square grid at every stage. Checked
against plain Python loops of METHOD.md's rule, through whole two-stage runs."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import lightkv
from lightkv.adapters import get_adapter
from lightkv.methods._layout import regrid_coordinates, regrid_kept_counts, square_side, vision_runs
from lightkv.testing import batch_prompts, llava_next_prompt, llava_prompt, tiny_llava, tiny_llava_next

from reference import bands, reference_stage

RECORD = {"record": True} if "record" in inspect.signature(lightkv.apply).parameters else {}


def loop_side(n):
    r = math.isqrt(n)
    return r if r * r == n else r + 1


def loop_regrid(units):
    """METHOD.md's rule with loops: per unit, tokens in sequence order, rank k -> (k // side, k % side)."""
    rows, cols, sides = {}, {}, {}
    for unit in sorted({u for row in units for u in row if u >= 0}):
        members = [(b, m) for b, row in enumerate(units) for m, u in enumerate(row) if u == unit]
        side = loop_side(len(members))
        sides[unit] = side
        for k, (b, m) in enumerate(members):
            rows[b, m], cols[b, m] = k // side, k % side
    return rows, cols, sides


def test_square_side_is_the_reference_side():
    n = torch.arange(0, 5000)
    assert square_side(n).tolist() == [loop_side(v) for v in range(5000)]
    assert loop_side(288) == 17 and loop_side(576) == 24  # METHOD.md's examples


def test_regrid_coordinates_equal_the_loop():
    gen = torch.Generator().manual_seed(0)
    units = torch.randint(-1, 4, (2, 40), generator=gen)
    units[1][units[1] >= 0] += 4  # a unit lives in one batch row
    rows, cols, unit_hw, counts = regrid_coordinates(units, 8)
    ref_rows, ref_cols, sides = loop_regrid(units.tolist())
    for (b, m), r in ref_rows.items():
        assert (int(rows[b, m]), int(cols[b, m])) == (r, ref_cols[b, m])
    assert unit_hw[:, 0].tolist() == [sides.get(u, 1) for u in range(8)]
    assert counts.tolist() == [int((units == u).sum()) for u in range(8)]


def test_vision_runs():
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 1]], dtype=torch.bool)
    assert vision_runs(mask).tolist() == [[-1, 0, 0, -1, 1], [2, 2, -1, -1, 3]]


def _context(hidden, image_of, grids):
    """StageContext of one row (no attention needed: uniform guidance)."""
    M = hidden.shape[1]
    image_index = torch.tensor([image_of])
    return lightkv.StageContext(
        layer_index=0, hidden=hidden, token_valid=torch.ones(1, M, dtype=torch.bool), vision_mask=image_index >= 0,
        image_index=image_index, grid_rows=torch.zeros(1, M, dtype=torch.long),
        grid_cols=torch.zeros(1, M, dtype=torch.long), grid_hw=torch.tensor(grids),
        input_positions=torch.arange(M)[None], token_state={}, method_state={},
        attention_fn=lambda: pytest.fail("uniform guidance reads no attention"))


@pytest.mark.parametrize("windows", [(2, 2), (4, 2, 1), (3, 2)])
def test_two_and_three_stage_regrid_runs_equal_a_plain_loop_reference(windows):
    """Whole runs of the regrid layout: at every stage the loop re-lays the survivors of each image by rank and
    merges with the plain reference stage (METHOD.md steps 1-6); the method must keep the same tokens with the
    same hidden states. Two images, one not square, with text between them."""
    torch.manual_seed(1)
    image_of = [-1] * 3 + [0] * 96 + [-1] * 2 + [1] * 130 + [-1]  # a 12x8 and a 10x13 image
    grids = [[12, 8], [10, 13]]
    hidden = torch.randn(1, len(image_of), 16)
    method = lightkv.LightKV(layers=list(range(len(windows))), windows=list(windows), ratios=[0.5] * len(windows),
                             guidance="uniform", window_layout="regrid", min_tokens_per_window=4)
    ref_hidden, ref_image_of = hidden[0].clone(), list(image_of)
    for stage, w in enumerate(windows):
        result = method.reduce(_context(hidden, image_of, grids), stage)
        rows, cols, sides = loop_regrid([ref_image_of])
        keep, ref_new = reference_stage(ref_hidden, ref_image_of, [rows.get((0, m), 0) for m in range(len(ref_image_of))],
                                        [cols.get((0, m), 0) for m in range(len(ref_image_of))],
                                        {u: (s, s) for u, s in sides.items()}, None, w, 0.5, min_per_window=4)
        assert result.keep[0].tolist() == keep, stage
        torch.testing.assert_close(result.hidden[0][result.keep[0]], ref_new[torch.tensor(keep)])
        hidden = result.hidden[:, result.keep[0]]
        image_of = [u for u, k in zip(image_of, keep) if k]
        ref_hidden, ref_image_of = ref_new[torch.tensor(keep)], list(image_of)
    # the prediction is exact under regrid
    predicted = method.kept_per_layer(len(windows) + 1, [(12, 8), (10, 13)])[-1]
    assert predicted == sum(1 for u in image_of if u >= 0)
    assert regrid_kept_counts(96, windows, [0.5] * len(windows), 4)[-1] == sum(1 for u in image_of if u == 0)


def test_regrid_equals_original_at_stage_one_on_a_square_grid_and_differs_later():
    model = tiny_llava(num_layers=4, grid=8)
    inputs = batch_prompts([llava_prompt(model, [1, 10, 11], [20, 21], seed=1),
                            llava_prompt(model, [1, 13], [25, 26], num_images=2, seed=2)])
    schedule = dict(layers=[1, 2], windows=[2, 2], ratios=[0.5, 0.5], guidance="uniform")
    maps, counts = {}, {}
    for layout in ("original", "regrid"):
        method = lightkv.LightKV(**schedule, window_layout=layout)
        with lightkv.apply(model, method, **RECORD) as handle, torch.no_grad():
            model(**inputs)
        maps[layout] = handle.stats.merge_maps
        counts[layout] = handle.stats.vision_tokens
        assert counts[layout] == [method.kept_per_layer(4, [(8, 8)]), method.kept_per_layer(4, [(8, 8)] * 2)]
    assert torch.equal(maps["original"][0], maps["regrid"][0])  # 64 = 8 x 8: the same grid at stage 1
    assert not torch.equal(maps["original"][1], maps["regrid"][1])  # 32 survivors: a 6 x 6 grid, other windows
    assert counts["original"] != counts["regrid"]  # 16 vs 17 left per image (windows of 9,9,9,5 survivors)


def test_tome_takes_the_window_layout_too():
    tome = lightkv.ToMe(layers=[1, 2], windows=[2, 2], ratios=[0.5, 0.5], window_layout="regrid")
    assert tome.kept_per_layer(4, [(8, 8)]) == lightkv.LightKV(
        layers=[1, 2], windows=[2, 2], ratios=[0.5, 0.5], window_layout="regrid").kept_per_layer(4, [(8, 8)])
    with pytest.raises(ValueError, match="window_layout"):
        lightkv.ToMe(window_layout="square")


def test_llava_next_regrid_flattens_the_whole_image_span():
    """Under regrid the base grid, the high-res grid and the newlines of one LLaVA-NeXT image are one square:
    every merge stays in one image span and in the window the loop gives its rank among the span's current
    tokens; newlines are never merged."""
    model = tiny_llava_next(num_layers=4)
    prompts = [llava_next_prompt(model, [1, 10], [20, 21], image_sizes=[(20, 30)], seed=1),
               llava_next_prompt(model, [1, 13], [25], image_sizes=[(30, 14), (24, 24)], seed=2)]
    inputs = batch_prompts(prompts)
    layout = get_adapter(model).vision_layout(inputs["input_ids"], None, inputs)
    windows = [2, 2]
    method = lightkv.LightKV(layers=[1, 2], windows=windows, ratios=[0.5, 0.5], guidance="uniform",
                             window_layout="regrid")
    with lightkv.apply(model, method, **RECORD) as handle, torch.no_grad():
        model(**inputs)
    stats = handle.stats
    B, N = inputs["input_ids"].shape
    spans = vision_runs(layout.vision_mask)
    alive = inputs["attention_mask"].bool()
    crossed_grids = False
    for stage, merge_map in enumerate(stats.merge_maps):
        for b in range(B):
            current = [m for m in range(N) if alive[b, m]]
            window_of = {}
            for span in {int(spans[b, m]) for m in current if spans[b, m] >= 0}:
                members = [m for m in current if spans[b, m] == span]
                side = loop_side(len(members))
                band = bands(side, windows[stage])
                for k, m in enumerate(members):
                    window_of[m] = (span, band[k // side] * windows[stage] + band[k % side])
            for m in current:
                dest = int(merge_map[b, m])
                if dest != m:
                    assert layout.image_index[b, m] >= 0 and window_of[m] == window_of[dest]
                    crossed_grids |= bool(layout.image_index[b, m] != layout.image_index[b, dest])
                elif layout.vision_mask[b, m] and layout.image_index[b, m] < 0:
                    assert dest == m  # a newline stays
        alive = alive & (merge_map == torch.arange(N)[None])
    assert crossed_grids  # a window of the flattened square holds base and high-res tokens
    newlines = (layout.vision_mask & (layout.image_index < 0)).sum(1)
    assert bool(((alive & layout.vision_mask & (layout.image_index < 0)).sum(1) == newlines).all())


# -- LightKV.reference -------------------------------------------------------------------------------------------


def test_reference_preset_is_the_papers_schedule_scaled_by_depth():
    from transformers import InternVLConfig, LlavaConfig, LlavaNextConfig, Qwen2_5_VLConfig

    llava = lightkv.LightKV.reference(LlavaConfig())  # Vicuna-7B depth: 32 layers
    assert (llava.layers, llava.windows, llava.ratios) == ((12, 18, 24), (4, 2, 1), (0.5, 0.5, 0.5))
    assert (llava.positions, llava.window_layout, llava.guidance) == ("original", "original", "faithful")
    assert lightkv.LightKV.reference(LlavaNextConfig()).layers == (12, 18, 24)
    qwen = lightkv.LightKV.reference(Qwen2_5_VLConfig(text_config=dict(num_hidden_layers=28)), exact=True)
    assert (qwen.layers, qwen.windows) == ((12, 17, 22), (6, 4, 2))
    assert (qwen.positions, qwen.window_layout) == ("compact", "regrid")  # the authors' release
    # other depths: the benchmark specs' scaling (a stage on the last layer is dropped, with its windows)
    assert lightkv.LightKV.reference(Qwen2_5_VLConfig(text_config=dict(num_hidden_layers=36))).layers == (16, 22, 29)
    assert lightkv.LightKV.reference(LlavaConfig(text_config=dict(num_hidden_layers=40))).layers == (15, 23, 30)
    small = lightkv.LightKV.reference(tiny_llava(num_layers=4, grid=8))
    assert (small.layers, small.windows, small.ratios) == ((1, 2), (4, 2), (0.5, 0.5))
    with pytest.raises(ValueError, match="too shallow"):
        lightkv.LightKV.reference(tiny_llava(num_layers=1, grid=8))
    with pytest.raises(ValueError, match="internvl"):
        lightkv.LightKV.reference(InternVLConfig())
    with pytest.raises(TypeError, match="exact"):
        lightkv.LightKV.reference(LlavaConfig(), exact="yes")


def test_exact_reference_runs_and_keeps_the_predicted_counts():
    model = tiny_llava(num_layers=8, grid=12)
    method = lightkv.LightKV.reference(model, exact=True)  # layers 2, 4, 5; windows 4, 2, 1
    assert method.layers == (2, 4, 5)
    inputs = llava_prompt(model, [1, 10], [20, 21], seed=1)
    with lightkv.apply(model, method) as handle, torch.no_grad():
        model(**inputs)
    assert handle.stats.vision_tokens == [method.kept_per_layer(8, [(12, 12)])]
    assert handle.stats.vision_tokens[0][-1] < 144
