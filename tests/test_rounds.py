"""Stages of several bipartite rounds (``rounds=k``): each round is the plain reference stage on what the round
before kept, in the same windows, with summed merge weights; kept counts equal the prediction; the run stays
batched = unbatched and ratio 0 = unpatched."""

import pytest
import torch

import lightkv
from lightkv import testing
from tests.helpers import check_batched_equals_unbatched, one_image, run
from tests.reference import reference_stage


def _context(hidden, image_of, rows, cols, grids, weights=None):
    M = hidden.shape[1]
    image_index = torch.tensor([image_of])
    return lightkv.StageContext(
        layer_index=0, hidden=hidden, token_valid=torch.ones(1, M, dtype=torch.bool), vision_mask=image_index >= 0,
        image_index=image_index, grid_rows=torch.tensor([rows]), grid_cols=torch.tensor([cols]),
        grid_hw=torch.tensor(grids), input_positions=torch.arange(M)[None], token_state={}, method_state={},
        attention_fn=lambda: pytest.fail("no attention is read"))


def _image(H, W, image):
    return [image] * (H * W), [r for r in range(H) for _ in range(W)], [c for _ in range(H) for c in range(W)]


@pytest.mark.parametrize("rounds,ratio,windows", [(2, 0.5, 2), (3, 0.5, 1), (2, 0.3, 2), (3, 0.4, 3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_rounds_equal_repeated_reference_stages_with_summed_weights(rounds, ratio, windows, weighted):
    torch.manual_seed(0)
    a, b = _image(12, 8, 0), _image(10, 13, 1)
    image_of = [-1] * 3 + a[0] + [-1] * 2 + b[0] + [-1]
    rows = [0] * 3 + a[1] + [0] * 2 + b[1] + [0]
    cols = [0] * 3 + a[2] + [0] * 2 + b[2] + [0]
    grids = [[12, 8], [10, 13]]
    N = len(image_of)
    hidden = torch.randn(1, N, 16, dtype=torch.float64)
    weights = torch.rand(N, dtype=torch.float64) if weighted else None

    class Weighted(lightkv.ToMe):
        def merge_weights(self, ctx, stage, groups):
            return None if weights is None else weights[None]

    method = Weighted(layers=[0], windows=[windows], ratios=[ratio], rounds=rounds, min_tokens_per_window=1)
    result = method.reduce(_context(hidden, image_of, rows, cols, grids), 0)

    # reference: the plain loop stage, `rounds` times, each on what the round before kept, the weights of the
    # tokens merged into a receiver added to its own
    ref_hidden, slots = hidden[0].clone(), list(range(N))
    g = [1.0] * N if weights is None else weights.tolist()
    for _ in range(rounds):
        keep, new, dest = reference_stage(ref_hidden[slots], [image_of[s] for s in slots], [rows[s] for s in slots],
                                          [cols[s] for s in slots], {0: (12, 8), 1: (10, 13)}, [g[s] for s in slots],
                                          windows, ratio, min_per_window=1, with_destination=True)
        ref_hidden[slots] = new
        for i, s in enumerate(slots):
            if not keep[i]:
                g[slots[dest[i]]] += g[s]
        slots = [s for s, k in zip(slots, keep) if k]
    assert result.keep[0].nonzero().flatten().tolist() == slots
    torch.testing.assert_close(result.hidden[0, slots], ref_hidden[slots], rtol=1e-5, atol=1e-5)  # fp32 merge
    # and every kept token is the weighted mean of all the original tokens that ended in it
    g = torch.ones(N, dtype=torch.float64) if weights is None else weights
    destination = result.destination[0]
    assert all(bool(result.keep[0, int(destination[t])]) for t in range(N))
    for k in slots:
        members = (destination == k).nonzero().flatten()
        expected = (g[members, None] * hidden[0, members]).sum(0) / g[members].sum()
        torch.testing.assert_close(result.hidden[0, k], expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    return testing.tiny_llava(num_layers=4, attn_implementation="eager")


@pytest.mark.parametrize("layout", ["original", "regrid"])
@pytest.mark.parametrize("guidance", ["faithful", "uniform"])
def test_rounds_kept_counts_are_the_prediction(model, layout, guidance):
    method = lightkv.LightKV(layers=[0, 2], windows=[2, 1], ratios=[0.5, 0.4], rounds=[2, 3], guidance=guidance,
                             window_layout=layout)
    for prompt, grids in ((one_image(model), [(16, 16)]),
                          (testing.llava_prompt(model, [1, 13], [25, 26], num_images=2, seed=2), [(16, 16)] * 2)):
        _, stats = run(model, method, prompt)
        assert stats.vision_tokens[0] == method.kept_per_layer(4, grids)
    # 256 tokens per image: a stage of 2 rounds at 0.5 keeps a quarter of each 2x2 window (64 tokens each), then 3
    # rounds at 0.4 of 64 tokens: 64 - 25 = 39, 39 - 15 = 24, 24 - 9 = 15
    assert method.kept_per_layer(4, [(16, 16)]) == [256, 64, 64, 15]


def test_rounds_batched_equals_unbatched(model):
    method = lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5], rounds=2)
    check_batched_equals_unbatched(model, method, 4)


def test_rounds_of_ratio_zero_and_one_round_change_nothing(model):
    prompt = one_image(model)
    with torch.no_grad():
        plain = model(**prompt).logits
        one = lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5])
        with lightkv.apply(model, one):
            default = model(**prompt).logits
        with lightkv.apply(model, lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5], rounds=[1, 1])):
            explicit = model(**prompt).logits
        with lightkv.apply(model, lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.0, 0.0], rounds=3)):
            zero = model(**prompt).logits
    assert torch.equal(default, explicit)
    torch.testing.assert_close(zero, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rounds,message", [(0, "rounds must contain integers >= 1"),
                                            ([1, 2], "rounds must be one integer or one per stage"),
                                            (1.5, "rounds must be a list of integers, got 1.5"),
                                            (True, "rounds must be a list of integers, got True")])
def test_rounds_validation(rounds, message):
    with pytest.raises((TypeError, ValueError), match=message):
        lightkv.LightKV(layers=[1, 2, 3], windows=[2, 2, 1], ratios=[0.5] * 3, rounds=rounds)


def test_rounds_from_the_spec_grammar():
    method = lightkv.build_method("lightkv:layers=[1,2],windows=[2,1],ratios=[0.5,0.5],rounds=[2,1]")
    assert method.rounds == (2, 1)
    assert lightkv.build_method("tome:layers=[1],windows=[2],ratios=[0.5],rounds=3").rounds == (3,)


@pytest.mark.parametrize("rounds,per_stage", [(1, 1), (2, 2), (3, 2)])
def test_rounds_syncs(rounds, per_stage):
    """One device -> host read per stage, plus one for all further rounds (their tokens merged per row)."""
    from lightkv.perf.syncs import count_syncs

    model = testing.tiny_llava(num_layers=4)
    padded = testing.batch_prompts([one_image(model), testing.llava_prompt(model, [1, 13], [25], num_images=2)])
    method = lightkv.LightKV(layers=[0, 1], windows=[2, 1], ratios=[0.5, 0.5], rounds=rounds)
    report = count_syncs(model, method, padded, decode_steps=2)
    assert [report.prefill[f"stage {s}"] for s in range(2)] == [per_stage] * 2
    assert report.decode == [0, 0]
