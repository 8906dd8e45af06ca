"""``lightkv.apply(model, "lightkv@0.55")``: any registered method by name, configured from the model itself."""

import pytest
import torch

import lightkv
from lightkv import testing
from tests.helpers import one_image

NUM_LAYERS = 6


@pytest.fixture(scope="module")
def model():
    return testing.tiny_llava(num_layers=NUM_LAYERS)


@pytest.mark.parametrize("name", ["lightkv", "tome", "fastv", "pdrop", "dart", "random", "sparsevlm"])
def test_any_method_by_name_is_the_matched_method(model, name):
    prompt = one_image(model)
    expected = lightkv.match_budget(name, 0.4, NUM_LAYERS, grid=(16, 16))
    with torch.no_grad():
        with lightkv.apply(model, f"{name}@0.4") as handle:
            by_name = model(**prompt).logits
            stats = handle.stats
        assert handle.method == expected.method
        with lightkv.apply(model, expected.method):
            by_method = model(**prompt).logits
    assert torch.equal(by_name, by_method)
    assert stats.vision_tokens[0] == expected.kept_per_layer
    assert stats.mean_retained_fraction == pytest.approx(expected.retained_fraction)


def test_low_budget_is_reached_on_a_short_decoder(model):
    """0.20 on 6 layers: beyond half a window per stage, the matcher adds bipartite rounds; the run keeps what
    was predicted."""
    with lightkv.apply(model, "lightkv@0.2") as handle, torch.no_grad():
        model(**one_image(model))
    assert max(handle.method.rounds) > 1
    assert abs(handle.stats.mean_retained_fraction - 0.2) <= 0.01
    assert handle.stats.vision_tokens[0] == handle.method.kept_per_layer(NUM_LAYERS, [(16, 16)])


def test_unreachable_budget_names_the_floor(model):
    floor = lightkv.match_budget("lightkv", 1e-6, NUM_LAYERS, grid=(16, 16), strict=False).retained_fraction
    with pytest.raises(ValueError, match=rf"lightkv@0.05 is out of reach on {NUM_LAYERS} decoder layers with images of "
                                         rf"16x16 tokens: the lowest budget lightkv reaches there is {floor:.3f}"):
        lightkv.apply(model, "lightkv@0.05")
    with pytest.raises(ValueError, match="with rounds=1: the lowest budget lightkv reaches there is"):
        lightkv.apply(model, "lightkv@0.2:rounds=1")
    assert not model.model.language_model.layers[0]._forward_pre_hooks


def test_names_without_a_budget_and_bad_names(model):
    with lightkv.apply(model, "lightkv:layers=[1,2],windows=[2,1],ratios=[0.5,0.5]") as handle:
        assert handle.method == lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"stage layer 12 does not exist.*or give a budget, e.g. 'lightkv@0.55'"):
        lightkv.apply(model, "lightkv")  # the class defaults are LLaVA-1.5-7B's 32-layer schedule
    with pytest.raises(ValueError, match="names no method"):
        lightkv.apply(model, "none")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        lightkv.apply(model, "nope@0.5")
    with pytest.raises(ValueError, match="configured already"):
        lightkv.apply(model, lightkv.LightKV(layers=[1], windows=[2], ratios=[0.5]), grids=[(16, 16)])
    with pytest.raises(TypeError, match="or a method name such as 'lightkv@0.55'"):
        lightkv.apply(model, 0.55)


def test_grid_from_the_caller_when_the_config_does_not_tell():
    qwen = testing.tiny_qwen2_5_vl(num_layers=NUM_LAYERS)
    with pytest.raises(ValueError, match="cannot tell the image token grid of Qwen2_5_VLForConditionalGeneration"):
        lightkv.apply(qwen, "lightkv@0.55")
    with lightkv.apply(qwen, "lightkv@0.55", grids=[(6, 8)]) as handle:
        assert handle.method == lightkv.match_budget("lightkv", 0.55, NUM_LAYERS, grids=[(6, 8)]).method
    patch, merge = qwen.config.vision_config.patch_size, qwen.config.vision_config.spatial_merge_size
    with lightkv.apply(qwen, "fastv@0.5", max_pixels=(10 * patch * merge) ** 2) as handle:
        assert handle.method == lightkv.match_budget("fastv", 0.5, NUM_LAYERS, grid=(10, 10)).method


@pytest.mark.parametrize("name,kwargs,layers", [("llava-1.5-7b", {}, (11, 17, 23)),
                                                ("qwen2.5-vl-7b", {"max_pixels": 672 * 672}, (10, 14, 19))])
def test_real_size_configs(name, kwargs, layers):
    """Full-size LLaVA-1.5-7B and Qwen2.5-VL-7B (on the meta device: no weights): the paper's 3-stage shape
    placed on the depth, 24 x 24 tokens per image."""
    from lightkv.perf.specs import get_spec

    spec = get_spec(name)
    config = spec.config()
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        big = AutoModelForImageTextToText.from_config(config)
    with lightkv.apply(big, "lightkv@0.55", **kwargs) as handle:
        assert handle.method.layers == layers and handle.method.windows == (4, 2, 1)
        depth = config.text_config.num_hidden_layers
        assert abs(lightkv.retained_fraction(handle.method, depth, [(24, 24)]) - 0.55) <= 0.01
