"""The baselines (Random, ToMe, FastV, PDrop, DART) on tiny random LLaVA models, and matched budgets: exact counts,
which tokens each method keeps, ToMe sizes, pruned positions, and the equivalences the contract table does not
hold (plain ToMe; FastV / PDrop decoding on the pruned cache equals recomputing with the same tokens pruned).

The contracts every family x method x attention keeps (batched = unbatched, removing nothing = unpatched, cached
= uncached where it holds, ...) are checked once, from one table, in test_contract.py."""

import math

import pytest
import torch

import lightkv
from lightkv.budget import place_layers
from lightkv.engine.handle import _destination_of_dropped
from lightkv.methods.tome import SIZE_KEY
from lightkv.testing import batch_prompts, tiny_llava

from helpers import KeepPositions, check_batched_equals_unbatched, TEXT_AFTER, TEXT_BEFORE, generate, mixed_prompts, one_image, run

N_LAYERS, GRID, NV = 4, 8, 64  # decoder layers, image grid side, vision tokens per image
VISION = list(range(4, 4 + NV))  # positions of the image tokens in `one_image`

# name -> (method, vision tokens per layer for one 8x8 image, vision tokens after each stage)
METHODS = {
    "random": (lambda **kw: lightkv.Random(layer=1, seed=3, **kw), [64, 64, 32, 32], [32]),
    "tome": (lambda ratios=(0.5, 0.5): lightkv.ToMe(layers=[1, 2], windows=[2, 1], ratios=ratios),
             [64, 64, 32, 16], [32, 16]),
    "tome_sized": (lambda ratios=(0.5, 0.5): lightkv.ToMe(layers=[1, 2], windows=[2, 1], ratios=ratios,
                                                          size_weighted=True), [64, 64, 32, 16], [32, 16]),
    "fastv": (lambda **kw: lightkv.FastV(layer=1, **kw), [64, 64, 32, 32], [32]),
    "pdrop": (lambda **kw: lightkv.PDrop(layers=[0, 1, 2], **kw), [64, 32, 16, 8], [32, 16, 8]),
    "dart": (lambda **kw: lightkv.DART(layer=1, **kw), [64, 64, 32, 32], [32]),
}
# methods whose choice depends on the last token: an uncached generation step re-decides with the newest token
LAST_TOKEN_SCORED = ("fastv", "pdrop")


def make(name, ratio=None):
    """The method of the table; ``ratio=0`` gives no reduction."""
    factory = METHODS[name][0]
    if ratio is None:
        return factory()
    if name.startswith("tome"):
        return factory(ratios=[ratio, ratio])
    return factory(ratio=ratio)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_llava(num_layers=N_LAYERS, grid=GRID, attn_implementation=request.param)


@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava(num_layers=N_LAYERS, grid=GRID, attn_implementation="eager")


# -- counts and budgets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_kept_counts_and_predicted_fraction(model, name):
    method = make(name)
    out, stats = run(model, method, one_image(model), use_cache=True)
    expected = METHODS[name][1]
    assert stats.vision_tokens == [expected]
    n_text = len(TEXT_BEFORE) + len(TEXT_AFTER)
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [n_text + v for v in expected]
    assert method.kept_per_layer(N_LAYERS, [(GRID, GRID)]) == expected
    assert stats.mean_retained_fraction == pytest.approx(sum(expected) / (N_LAYERS * NV))
    # one entry per stage; every kept position is an image token of the prompt
    assert [len(kept) for kept in stats.kept_positions[0]] == METHODS[name][2]
    assert all(set(kept) <= set(VISION) for kept in stats.kept_positions[0])


@pytest.mark.parametrize("name", ["lightkv", "tome", "random", "fastv", "pdrop", "dart"])
@pytest.mark.parametrize("target", [0.7, 0.55])
def test_matched_budget_equals_measured(eager_model, name, target):
    model = eager_model
    prompts = mixed_prompts(model)
    match = lightkv.match_budget(name, target, N_LAYERS, (GRID, GRID))
    match2 = lightkv.match_budget(name, target, N_LAYERS, (GRID, GRID), num_images=2)
    _, stats = run(model, match.method, batch_prompts(prompts[:2]))
    assert stats.vision_tokens[0] == match.kept_per_layer
    assert stats.retained_fraction[0] == pytest.approx(match.retained_fraction, abs=1e-12)
    _, stats2 = run(model, match2.method, prompts[1])
    assert stats2.vision_tokens[0] == match2.kept_per_layer
    assert stats2.mean_retained_fraction == pytest.approx(match2.retained_fraction, abs=1e-12)
    assert abs(match.retained_fraction - target) < 0.02


def test_budget_on_llava_7b_depth():
    """32 layers, 576 tokens: every pruning method lands within one kept token of the targets."""
    for target in (0.55, 0.35, 0.20):
        for name in ("random", "fastv", "dart"):
            match = lightkv.match_budget(name, target, 32, 576)
            assert match.method.layer == 2  # the published K reaches these targets
            assert abs(match.retained_fraction - target) <= 29 / (32 * 576) / 2 + 1e-12
            kept = match.method.kept_after_each_stage(((24, 24),))[0]
            assert match.retained_fraction == pytest.approx((3 * 576 + 29 * kept) / (32 * 576))
        pdrop = lightkv.match_budget("pdrop", target, 32, 576)
        assert abs(pdrop.retained_fraction - target) < 2e-3
    assert lightkv.match_budget("pdrop", 0.55, 32, 576).method.layers == (8, 16, 24)
    # LightKV's reference schedule reaches (13 + 6/2 + 6/4 + 7/8) / 32 = 0.57 at best: layers move earlier
    match = lightkv.match_budget("lightkv", 0.55, 32, 576, guidance="text_to_vision")
    assert match.method.layers[0] < 12 and match.method.windows == (4, 2, 1)
    assert match.method.guidance == "text_to_vision"
    assert abs(match.retained_fraction - 0.55) < 0.01
    assert match.retained_fraction == lightkv.retained_fraction(match.method, 32, [(24, 24)])
    assert lightkv.match_budget("lightkv", 0.6, 32, 576).method.layers == (12, 18, 24)
    # a target beyond reach is an error naming the floor (everything dropped after layer 0: 1/32); strict=False
    # gives the closest configuration
    with pytest.raises(ValueError, match=r"fastv@0.01 is out of reach on 32 decoder layers with images of 24x24 "
                                         r"tokens: the lowest budget fastv reaches there is 0.031"):
        lightkv.match_budget("fastv", 0.01, 32, 576)
    low = lightkv.match_budget("fastv", 0.01, 32, 576, strict=False)
    assert (low.method.layer, low.method.ratio) == (0, 1.0)
    assert low.retained_fraction == pytest.approx(1 / 32)


def test_place_layers_scales_to_depth():
    assert place_layers((12, 18, 24), 32, 32) == (12, 18, 24)
    assert place_layers((12, 18, 24), 32, 28) == (11, 16, 21)
    assert place_layers((12, 18, 24), 32, 4) == (2, 3)  # colliding stages are pushed later, then dropped
    assert place_layers((2,), None, 40) == (2,)
    assert place_layers((8, 16, 24), 32, 32, scale=0.5) == (4, 8, 12)


def test_budget_registry_and_bad_input():
    with pytest.raises(ValueError, match="unknown method"):
        lightkv.match_budget("nope", 0.5, 32, 576)
    with pytest.raises(ValueError, match="already registered"):
        lightkv.register_budget("fastv", lambda *a, **k: None)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        lightkv.match_budget("fastv", 1.5, 32, 576)
    with pytest.raises(ValueError, match="square"):
        lightkv.match_budget("fastv", 0.5, 32, 300)
    from lightkv import budget
    from lightkv.methods.registry import unregister_method

    def fake(target, num_layers, grid, num_images, **kwargs):
        method = lightkv.FastV(layer=0, ratio=1 - target)
        kept = method.kept_per_layer(num_layers, [grid] * num_images)
        return lightkv.BudgetMatch(method, sum(kept) / (num_layers * kept[0]), kept, target)

    lightkv.register_budget("test_only", fake)
    try:
        assert "test_only" in budget.budget_methods()
        # strict=False: this fake matcher does not search (its answer for 0.5 lands at 0.75)
        assert lightkv.match_budget("test_only", 0.5, 2, (4, 6), strict=False).kept_per_layer == [24, 12]
    finally:
        unregister_method("test_only")
    assert "test_only" not in budget.budget_methods()


# -- which tokens are kept ----------------------------------------------------------------------------------------


def top_vision(scores, positions, k):
    """The k positions with the highest score (ties: earlier position)."""
    order = sorted(positions, key=lambda p: (-scores[p], p))
    return sorted(order[:k])


def test_fastv_keeps_top_attended_tokens(model, eager_model):
    inputs = one_image(model)
    with torch.no_grad():
        ref = eager_model(**inputs, output_attentions=True)
    scores = ref.attentions[1][0, :, -1, :].mean(0).tolist()  # layer 1, last token, mean over heads
    _, stats = run(model, lightkv.FastV(layer=1, ratio=0.5), inputs)
    assert stats.kept_positions[0][0] == top_vision(scores, VISION, NV // 2)
    _, stats = run(model, lightkv.FastV(layer=1, ratio=0.3), inputs)
    assert stats.kept_positions[0][0] == top_vision(scores, VISION, NV - math.floor(0.3 * NV))


def test_pdrop_keeps_top_attended_tokens_at_every_stage(eager_model):
    model = eager_model
    inputs = one_image(model)
    out, stats = run(model, lightkv.PDrop(layers=[0, 1, 2], ratio=0.5), inputs, output_attentions=True)
    text = [p for p in range(inputs["input_ids"].shape[1]) if p not in VISION]
    present = VISION
    for stage, layer in enumerate([0, 1, 2]):
        slots = sorted(text + present)  # the sequence that layer saw, in order
        row = out.attentions[layer][0, :, -1, :].mean(0).tolist()
        assert len(row) == len(slots)
        scores = dict(zip(slots, row))
        present = top_vision(scores, present, len(present) // 2)
        assert stats.kept_positions[0][stage] == present


def test_dart_keeps_least_duplicated_tokens(model, eager_model):
    inputs = one_image(model)
    with torch.no_grad():
        ref = eager_model(**inputs, output_hidden_states=True)
    layer = eager_model.model.language_model.layers[1]
    keys = layer.self_attn.k_proj(layer.input_layernorm(ref.hidden_states[1]))[0]  # pre-RoPE, (N, Hkv*Dh)
    norms = keys.norm(dim=-1).tolist()
    pivots = top_vision(norms, VISION, 8)
    hidden = torch.nn.functional.normalize(ref.hidden_states[2][0], dim=-1)  # output of layer 1
    duplication = {p: max(float(hidden[p] @ hidden[q]) for q in pivots) for p in VISION}
    rest = top_vision({p: -d for p, d in duplication.items()}, [p for p in VISION if p not in pivots], 24 - 8)
    _, stats = run(model, lightkv.DART(layer=1, ratio=1 - 24 / NV), inputs)
    assert stats.kept_positions[0][0] == sorted(pivots + rest)
    # fewer kept than pivots: the strongest pivots only
    _, stats = run(model, lightkv.DART(layer=1, ratio=1 - 5 / NV), inputs)
    assert stats.kept_positions[0][0] == top_vision(norms, VISION, 5)


def test_random_is_seeded_per_sample(eager_model):
    model = eager_model
    prompts = mixed_prompts(model)
    method = lightkv.Random(layer=1, ratio=0.5, seed=7)
    _, alone = run(model, method, prompts[0])
    _, again = run(model, lightkv.Random(layer=1, ratio=0.5, seed=7), prompts[0])
    _, batched = run(model, method, batch_prompts(prompts[::-1]))
    _, other_seed = run(model, lightkv.Random(layer=1, ratio=0.5, seed=8), prompts[0])
    kept = alone.kept_positions[0][0]
    assert again.kept_positions[0][0] == kept
    assert batched.kept_positions[2][0] == kept  # same sample, last row of a padded batch
    assert other_seed.kept_positions[0][0] != kept
    # the documented draw: uniform scores from the sample's own generator, the top half survives
    gen = torch.Generator().manual_seed(method.sample_seed(0, NV, len(TEXT_BEFORE)))
    draws = torch.rand(NV, generator=gen, dtype=torch.float64).tolist()
    assert kept == top_vision(dict(zip(VISION, draws)), VISION, NV // 2)
    # two images: one draw over both
    assert len(batched.kept_positions[1][0]) == NV


# -- ToMe sizes ---------------------------------------------------------------------------------------------------


def fake_context(hidden, grid, sizes=None):
    """A StageContext of one row holding one image of grid x grid patches and nothing else."""
    B, M, _ = hidden.shape
    index = torch.arange(M)
    ones = torch.ones(B, M, dtype=torch.bool)

    def no_attention():
        raise AssertionError("this stage must not read attention")

    return lightkv.StageContext(
        layer_index=0, hidden=hidden, token_valid=ones, vision_mask=ones,
        image_index=torch.zeros(B, M, dtype=torch.long), grid_rows=(index // grid)[None],
        grid_cols=(index % grid)[None], grid_hw=torch.tensor([[grid, grid]]), input_positions=index[None],
        token_state={} if sizes is None else {SIZE_KEY: sizes}, method_state={}, attention_fn=no_attention)


def test_tome_size_weighted_merge_formula():
    torch.manual_seed(0)
    hidden = torch.randn(1, 16, 8)
    sizes = torch.randint(1, 5, (1, 16)).float()
    method = lightkv.ToMe(layers=[0], windows=[1], ratios=[0.5], min_tokens_per_window=1, size_weighted=True)
    ctx = fake_context(hidden, 4, sizes.clone())
    result = method.reduce(ctx, 0)
    assert int(result.keep.sum()) == 8
    new_sizes = ctx.token_state[SIZE_KEY]
    for b in range(16):
        if not result.keep[0, b]:
            continue
        group = [b] + [a for a in range(16) if not result.keep[0, a] and int(result.destination[0, a]) == b]
        total = sum(float(sizes[0, t]) for t in group)
        expected = sum(float(sizes[0, t]) * hidden[0, t] for t in group) / total
        torch.testing.assert_close(result.hidden[0, b], expected)
        assert float(new_sizes[0, b]) == total
    assert float(new_sizes[0][result.keep[0]].sum()) == float(sizes.sum())
    # equal weights: plain means, sizes untouched
    plain = lightkv.ToMe(layers=[0], windows=[1], ratios=[0.5], min_tokens_per_window=1)
    ctx = fake_context(hidden, 4)
    equal = plain.reduce(ctx, 0)
    assert torch.equal(equal.keep, result.keep) and not ctx.token_state
    assert not torch.allclose(equal.hidden, result.hidden)


def test_tome_sizes_carried_across_stages(eager_model):
    model = eager_model
    inputs = one_image(model)
    method = lightkv.ToMe(layers=[0, 1, 2], windows=[2, 1, 1], ratios=[0.5, 0.5, 0.5], size_weighted=True)
    seen = []
    original_reduce = method.reduce

    def spy(ctx, stage):
        before = ctx.token_state.get(SIZE_KEY)
        seen.append(None if before is None else before[ctx.vision_mask].tolist())
        return original_reduce(ctx, stage)

    object.__setattr__(method, "reduce", spy)
    run(model, method, inputs)
    assert seen[0] is None
    # every stage sees the sizes gathered to its sequence: they always add up to the original patches
    assert [len(s) for s in seen[1:]] == [NV // 2, NV // 4] and [sum(s) for s in seen[1:]] == [NV, NV]
    assert max(seen[2]) >= 3


def test_tome_equals_lightkv_uniform(eager_model):
    inputs = one_image(eager_model)
    schedule = dict(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5])
    tome, _ = run(eager_model, lightkv.ToMe(**schedule), inputs)
    uniform, _ = run(eager_model, lightkv.LightKV(**schedule, guidance="uniform"), inputs)
    sized, _ = run(eager_model, lightkv.ToMe(**schedule, size_weighted=True), inputs)
    assert torch.equal(tome.logits, uniform.logits)
    assert not torch.allclose(sized.logits, tome.logits)  # sizes differ at stage 2


# -- pruned tokens in the engine ----------------------------------------------------------------------------------


def test_destination_of_dropped_tokens():
    keep = torch.tensor([[False, True, False, False, True, False]])
    own = torch.arange(6)[None]
    assert _destination_of_dropped(keep, own).tolist() == [[1, 1, 1, 1, 4, 4]]
    merged = torch.tensor([[4, 1, 1, 3, 4, 5]])  # slot 0 merged into 4, slot 2 into 1
    assert _destination_of_dropped(keep, merged).tolist() == [[4, 1, 1, 1, 4, 4]]


def test_pruned_position_reads_last_kept_token(model):
    inputs = one_image(model)
    out, stats = run(model, lightkv.FastV(layer=1, ratio=0.5), inputs)
    kept = set(stats.kept_positions[0][0]) | set(range(inputs["input_ids"].shape[1])) - set(VISION)
    assert len(kept) == NV // 2 + 9
    logits = out.logits[0]
    for p in VISION:
        if p not in kept:
            source = max(q for q in kept if q < p)
            assert torch.equal(logits[p], logits[source])


def test_token_state_of_wrong_shape_raises(eager_model):
    class BadState(lightkv.FastV):
        def reduce(self, ctx, stage):
            ctx.token_state["bad"] = torch.zeros(1, 3)
            return super().reduce(ctx, stage)

    with pytest.raises(ValueError, match="token_state"):
        run(eager_model, BadState(layer=1), one_image(eager_model))


# -- equivalences -------------------------------------------------------------------------------------------------


# Random, size-weighted ToMe and DART: test_contract.py's test_cached_generation_equals_uncached
@pytest.mark.parametrize("name", ["tome", *LAST_TOKEN_SCORED])
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_generate_equals_uncached(model, name, batch):
    prompts = mixed_prompts(model)[:2] if batch == 2 else [one_image(model)]
    inputs = batch_prompts(prompts)
    method = make(name)
    with lightkv.apply(model, method, record=True) as handle:
        cached = generate(model, inputs)
        kept = handle.stats.kept_positions
        uncached_same_method = generate(model, inputs, use_cache=False)
    if name in LAST_TOKEN_SCORED:
        # uncached, every step re-scores with its newest token; the first step is the same prefill
        torch.testing.assert_close(cached.logits[0], uncached_same_method.logits[0], rtol=1e-4, atol=1e-4)
        # decoding on the pruned cache equals recomputing everything with the same tokens pruned
        with lightkv.apply(model, KeepPositions(layers=method.stage_layers, kept=kept)):
            uncached = generate(model, inputs, use_cache=False)
    else:
        uncached = uncached_same_method
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# the methods of the contract table (Random, size-weighted ToMe, FastV, PDrop, DART): test_contract.py's
# test_batched_equals_unbatched and test_removing_nothing_gives_the_unpatched_logits
@pytest.mark.parametrize("name", ["tome"])
def test_batched_equals_unbatched(model, name):
    check_batched_equals_unbatched(model, make(name), N_LAYERS)


@pytest.mark.parametrize("name", ["tome"])
def test_no_reduction_matches_unpatched(model, name):
    inputs = batch_prompts(mixed_prompts(model))
    with torch.no_grad():
        ref = model(**inputs).logits
    got, stats = run(model, make(name, ratio=0.0), inputs)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got.logits[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert stats.vision_tokens[0] == [NV] * N_LAYERS


# -- bad hyperparameters ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kwargs,error,match", [
    (lightkv.Random, dict(ratio=1.5), ValueError, r"\[0, 1\]"),
    (lightkv.Random, dict(ratio="half"), TypeError, "ratio"),
    (lightkv.Random, dict(layer=-1), ValueError, ">= 0"),
    (lightkv.Random, dict(layer=1.0), TypeError, "integer"),
    (lightkv.Random, dict(seed=0.5), TypeError, "seed"),
    (lightkv.FastV, dict(ratio=-0.1), ValueError, r"\[0, 1\]"),
    (lightkv.FastV, dict(layer=True), TypeError, "integer"),
    (lightkv.PDrop, dict(layers=[8, 8]), ValueError, "increasing"),
    (lightkv.PDrop, dict(layers=[]), ValueError, "at least one"),
    (lightkv.PDrop, dict(layers="8"), TypeError, "list"),
    (lightkv.PDrop, dict(ratio=2), ValueError, r"\[0, 1\]"),
    (lightkv.DART, dict(num_pivots=0), ValueError, ">= 1"),
    (lightkv.DART, dict(num_pivots=2.0), TypeError, "integer"),
    (lightkv.DART, dict(ratio=1.01), ValueError, r"\[0, 1\]"),
    (lightkv.ToMe, dict(ratios=[0.5, 1.5, 0.5]), ValueError, r"\[0, 1\]"),
    (lightkv.ToMe, dict(windows=[4, 2]), ValueError, "same length"),
    (lightkv.ToMe, dict(size_weighted="yes"), TypeError, "size_weighted"),
    (lightkv.FastV, dict(positions="reset"), ValueError, "positions"),
])
def test_bad_hyperparameters_raise(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("method", [lightkv.PDrop(), lightkv.PDrop(layers=[1, 4]), lightkv.FastV(layer=4),
                                    lightkv.DART(layer=7), lightkv.Random(layer=9), lightkv.ToMe()])
def test_stage_beyond_model_raises(eager_model, method):
    with pytest.raises(ValueError, match="4 decoder layers"):
        lightkv.apply(eager_model, method)


def test_published_defaults():
    assert (lightkv.FastV().layer, lightkv.FastV().ratio) == (2, 0.5)
    assert (lightkv.PDrop().layers, lightkv.PDrop().ratio) == ((8, 16, 24), 0.5)
    assert (lightkv.DART().layer, lightkv.DART().num_pivots) == (2, 8)
    assert lightkv.ToMe().layers == (12, 18, 24) and lightkv.ToMe().windows == (4, 2, 1)
    for name in ("Random", "ToMe", "FastV", "PDrop", "DART"):
        assert name in lightkv.__all__ and name in lightkv.methods.__all__
