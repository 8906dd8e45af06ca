import math

import pytest
import torch

from lightkv.core import (band_index, bipartite_merge, compact_indices, group_order, merge_count, merged_per_row,
                          read_ints, window_groups, window_index)
from lightkv.guidance import faithful_guidance, text_to_vision_guidance

from reference import bands, reference_faithful, reference_stage, reference_text_to_vision


@pytest.mark.parametrize("size,windows", [(24, 4), (16, 2), (7, 3), (20, 6), (5, 5), (13, 1), (27, 4)])
def test_bands_match_reference_and_closed_form(size, windows):
    expected = bands(size, windows)
    assert band_index(size, windows).tolist() == expected
    coords = torch.arange(size)
    got = window_index(coords, torch.zeros_like(coords), torch.tensor(size), torch.tensor(1), windows) // windows
    assert got.tolist() == expected


def test_merge_count_caps_at_half_window():
    n = torch.tensor([64, 63, 7, 1, 0, 10])
    assert merge_count(0.5, n).tolist() == [32, 31, 3, 0, 0, 5]
    assert merge_count(0.9, n).tolist() == [32, 31, 3, 0, 0, 5]
    assert merge_count(0.25, n).tolist() == [16, 15, 1, 0, 0, 2]
    assert merge_count(0.0, n).tolist() == [0] * 6


def _layout(grids, text_before=3, text_between=2, text_after=4):
    """One row: text, then each image's patches in raster order, separated by text."""
    image_of, rows, cols = [-1] * text_before, [0] * text_before, [0] * text_before
    for image, (H, W) in enumerate(grids):
        for r in range(H):
            for c in range(W):
                image_of.append(image)
                rows.append(r)
                cols.append(c)
        image_of += [-1] * (text_between if image < len(grids) - 1 else text_after)
        rows += [0] * (text_between if image < len(grids) - 1 else text_after)
        cols += [0] * (text_between if image < len(grids) - 1 else text_after)
    return image_of, rows, cols


def _run_both(grids, windows, ratio, guidance_kind, seed=0, D=16):
    torch.manual_seed(seed)
    image_of, rows, cols = _layout(grids)
    N = len(image_of)
    hidden = torch.randn(1, N, D)
    if guidance_kind == "none":
        guidance = None
    elif guidance_kind == "zeros":
        guidance = torch.zeros(1, N)
    else:
        guidance = torch.rand(1, N)
        guidance[0, ::7] = 0.0  # some zero weights inside groups
    image_index = torch.tensor([image_of])
    grid_hw = torch.tensor(grids)
    counts = torch.bincount(image_index[image_index >= 0], minlength=len(grids))
    active = counts >= 8 * windows * windows
    groups = window_groups(image_index, torch.tensor([rows]), torch.tensor([cols]), grid_hw, windows, active)
    result = bipartite_merge(hidden, groups, guidance, ratio)
    ref_keep, ref_hidden = reference_stage(hidden[0], image_of, rows, cols, dict(enumerate(grids)),
                                           None if guidance is None else guidance[0].tolist(), windows, ratio)
    return result, ref_keep, ref_hidden, hidden


@pytest.mark.parametrize("grids,windows,ratio", [
    ([(16, 16)], 2, 0.5),
    ([(16, 16)], 4, 0.5),
    ([(24, 24)], 4, 0.5),
    ([(12, 20)], 3, 0.5),    # non-square, uneven bands
    ([(9, 14)], 2, 0.3),     # odd sizes, ratio below one half
    ([(16, 16), (10, 6)], 2, 0.75),  # two images of different grids; the small one is skipped at W=2
    ([(8, 8), (16, 12)], 1, 1.0),
])
@pytest.mark.parametrize("guidance_kind", ["none", "random", "zeros"])
def test_bipartite_merge_matches_reference(grids, windows, ratio, guidance_kind):
    result, ref_keep, ref_hidden, hidden = _run_both(grids, windows, ratio, guidance_kind)
    assert result.keep[0].tolist() == ref_keep
    torch.testing.assert_close(result.hidden[0], ref_hidden, rtol=1e-5, atol=1e-6)
    # tokens that merged point at a kept token of the same image
    merged = ~result.keep[0]
    assert result.keep[0][result.destination[0][merged]].all()
    # every untouched token is bit-identical
    touched = merged.clone()
    touched[result.destination[0][merged]] = True
    assert torch.equal(result.hidden[0][~touched], hidden[0][~touched])


def _expected_kept(H, W, windows, ratio):
    total = 0
    for rb in range(windows):
        for cb in range(windows):
            n = bands(H, windows).count(rb) * bands(W, windows).count(cb)
            total += n - min(math.floor(ratio * n), n // 2)
    return total


@pytest.mark.parametrize("H,W,schedule", [
    (16, 16, [(2, 0.5), (1, 0.5)]),
    (24, 24, [(4, 0.5), (2, 0.5), (1, 0.5)]),
    (12, 20, [(2, 0.5), (1, 0.5)]),
    (10, 30, [(5, 0.5), (1, 0.25)]),
])
def test_exact_kept_counts_per_stage(H, W, schedule):
    """Kept counts depend only on window sizes when windows nest; check them stage by stage."""
    torch.manual_seed(1)
    image_of, rows, cols = _layout([(H, W)])
    N = len(image_of)
    hidden = torch.randn(1, N, 8)
    image_index, rows_t, cols_t = torch.tensor([image_of]), torch.tensor([rows]), torch.tensor([cols])
    grid_hw = torch.tensor([[H, W]])
    # window sizes at each stage, from the survivors' original coordinates
    for stage, (windows, ratio) in enumerate(schedule):
        groups = window_groups(image_index, rows_t, cols_t, grid_hw, windows)
        sizes = torch.bincount(groups[groups >= 0])
        result = bipartite_merge(hidden, groups, None, ratio)
        expected = int((sizes - merge_count(ratio, sizes)).sum())
        kept = int((result.keep & (image_index >= 0)).sum())
        assert kept == expected
        if stage == 0:
            assert kept == _expected_kept(H, W, windows, ratio)
        idx, valid, _ = compact_indices(result.keep)
        hidden = result.hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        image_index, rows_t, cols_t = image_index.gather(1, idx), rows_t.gather(1, idx), cols_t.gather(1, idx)
    if schedule[0][0] == 2 and H == W == 16:
        assert kept == 64
    if H == W == 24:
        assert kept == 72  # 576 -> 288 -> 144 -> 72


def test_window_groups_never_span_images_or_rows():
    image_index = torch.tensor([[0, 0, -1, 1, 1], [2, 2, 2, 2, -1]])
    rows = torch.zeros_like(image_index)
    cols = torch.tensor([[0, 1, 0, 0, 1], [0, 1, 2, 3, 0]])
    grid_hw = torch.tensor([[1, 2], [1, 2], [1, 4]])
    groups = window_groups(image_index, rows, cols, grid_hw, 1)
    assert groups.tolist() == [[0, 0, -1, 1, 1], [2, 2, 2, 2, -1]]
    groups = window_groups(image_index, rows, cols, grid_hw, 2, active_images=torch.tensor([True, False, True]))
    assert groups.tolist() == [[0, 1, -1, -1, -1], [8, 8, 9, 9, -1]]


def test_compact_indices_left_pads_and_follows_destinations():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    destination = torch.tensor([[0, 2, 2, 3], [1, 1, 1, 1]])
    source, valid, new_slot = compact_indices(keep, destination)
    assert source.tolist() == [[0, 2, 3], [1, 1, 1]]
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    assert new_slot.tolist() == [[0, 1, 1, 2], [2, 2, 2, 2]]


@pytest.mark.parametrize("gqa", [1, 2])
def test_guidance_matches_full_attention_reference(gqa):
    torch.manual_seed(0)
    B, H, N, Dh = 2, 4, 23, 8
    q = torch.randn(B, H, N, Dh)
    k = torch.randn(B, H // gqa, N, Dh)
    vision = torch.zeros(B, N, dtype=torch.bool)
    vision[:, 5:17] = True
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, :3] = False  # left padding on row 1
    prompt = valid & ~vision
    after = torch.arange(N)[None] > 5
    scaling = Dh ** -0.5
    got = faithful_guidance(q, k, prompt, valid, scaling, head_chunk=3)
    got_t2v = text_to_vision_guidance(q, k, prompt & after, valid, scaling, head_chunk=3)
    for b in range(B):
        kk = k[b].repeat_interleave(gqa, dim=0)
        want = reference_faithful(q[b], kk, prompt[b], valid[b], scaling)
        torch.testing.assert_close(got[b][valid[b]].double(), want[valid[b]], rtol=1e-5, atol=1e-5)
        want_t2v = reference_text_to_vision(q[b], kk, (prompt & after)[b], valid[b], scaling)
        torch.testing.assert_close(got_t2v[b][valid[b]].double(), want_t2v[valid[b]], rtol=1e-5, atol=1e-5)
    # each prompt key hands out one unit per head
    torch.testing.assert_close(got.sum(1), (prompt.sum(1) * H).float())


@pytest.mark.parametrize("ratio", [0.3, 0.5, 1.0])
def test_merged_per_row_predicts_the_merge_before_it_runs(ratio):
    """Groups of 1 to 9 tokens (odd, even, single), three rows, non-members between: the per-row count read
    with the table sizes equals what bipartite_merge removes."""
    torch.manual_seed(0)
    B, N = 3, 40
    groups = torch.full((B, N), -1)
    next_id = 0
    for b in range(B):
        slot = 1
        for size in torch.randint(1, 10, (4,)).tolist():
            groups[b, slot:slot + size] = next_id
            next_id, slot = next_id + 1, slot + size + 1
    groups = groups[:, torch.randperm(N)]  # members of a group need not be adjacent
    hidden = torch.randn(B, N, 8)
    order = group_order(groups)
    G, largest = read_ints(order.sizes)[0]
    result = bipartite_merge(hidden, groups, None, ratio, order=order, sizes=(G, largest))
    assert merged_per_row(order, ratio, B, N).tolist() == (~result.keep).sum(1).tolist()
    assert torch.equal(result.hidden, bipartite_merge(hidden, groups, None, ratio).hidden)
