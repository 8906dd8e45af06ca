"""Adapters own the family knowledge: matching (subclasses, user-registered adapters), the image token grid that
every caller plans for, and LLaVA image ids without image features."""

import re
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import lightkv
from lightkv import adapters
from lightkv.adapters import LlavaAdapter, adapter_class_for_config, get_adapter
from lightkv.evaluation import harness
from lightkv.evaluation.shapes import IMAGE_SIZE
from lightkv.perf.specs import QWEN_IMAGE_PX, SPECS, ModelSpec
from lightkv.testing import llava_prompt, qwen_prompt, tiny_llava, tiny_qwen2_5_vl

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = dict(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5])


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl()


@pytest.fixture
def registry():
    """Restores the adapter registry after a test that registers adapters."""
    saved = list(adapters.ADAPTERS)
    yield adapters.ADAPTERS
    adapters.ADAPTERS[:] = saved
    adapters._refresh_families()


# -- the image token grid: the adapter says, every caller agrees -----------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_grid_callers_agree_with_the_adapter(family, llava, qwen, tmp_path):
    model = llava if family == "llava" else qwen
    adapter = get_adapter(model)
    assert adapter_class_for_config(model.config) is type(adapter)

    # evaluation harness: a shapes image (IMAGE_SIZE px square)
    shapes = adapter.default_grid(max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    assert harness.vision_grid(model) == shapes and harness.vision_grid_side(model) == shapes[0]

    # perf specs: a spec of the same config, at the reference image
    model.config.save_pretrained(tmp_path)
    spec = ModelSpec(name="same", family=family, description="", pretrained=str(tmp_path))
    assert spec.grid() == adapter.default_grid(max_pixels=QWEN_IMAGE_PX * QWEN_IMAGE_PX)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_lmms_grid_agrees_with_the_adapter(family, llava, qwen):
    """The lmms-eval plugin's grid for budget matching (needs lmms-eval installed: ``make eval-venv``)."""
    lmms_model = pytest.importorskip("lightkv.evaluation.lmms_model", exc_type=ImportError)
    model = llava if family == "llava" else qwen
    adapter = get_adapter(model)
    for max_pixels in (None, 64 * 64, 448 * 448):
        assert lmms_model._config_grid(model.config, max_pixels) == adapter.default_grid(max_pixels)


def test_grid_values():
    """LLaVA: fixed by the config whatever the image; Qwen: from max_pixels, None without; real-size specs."""
    llava, qwen = tiny_llava(), tiny_qwen2_5_vl()  # 2 px patches: a 16 x 16 LLaVA grid; Qwen merges 2 x 2
    assert get_adapter(llava).default_grid() == get_adapter(llava).default_grid(10**6) == (16, 16)
    assert get_adapter(qwen).default_grid() is None
    assert get_adapter(qwen).default_grid(64 * 64) == (16, 16)
    assert get_adapter(qwen).default_grid(65 * 67) == (16, 16)  # floor(sqrt) // (patch * merge)
    assert SPECS["llava-1.5-7b"].grid() == (24, 24) and SPECS["qwen2.5-vl-7b"].grid() == (24, 24)


def test_grid_matches_the_layout_of_a_prompt(llava, qwen):
    """The planned grid is the grid the adapter finds in a real prompt of that image size."""
    inputs = llava_prompt(llava, [1, 10], [20])
    layout = get_adapter(llava).vision_layout(inputs["input_ids"], None, inputs)
    assert tuple(layout.grid_hw[0].tolist()) == get_adapter(llava).default_grid()
    inputs = qwen_prompt(qwen, [1, 10], [20], images=[(16, 16)])  # a 64 x 64 px image at 2 px patches, 2 x 2 merge
    layout = get_adapter(qwen).vision_layout(inputs["input_ids"], None, inputs)
    assert tuple(layout.grid_hw[0].tolist()) == get_adapter(qwen).default_grid(64 * 64)


# -- matching: subclasses, registered adapters, unsupported models ---------------------------------------------


class MyLlava(LlavaForConditionalGeneration):
    pass


def test_subclass_of_a_supported_class(llava):
    """Defect 6: a subclass of LlavaForConditionalGeneration is LLaVA (entry module included)."""
    mine = MyLlava(llava.config).eval()
    mine.load_state_dict(llava.state_dict())
    adapter = get_adapter(mine)
    assert isinstance(adapter, LlavaAdapter) and adapter.entry_module is mine.model
    inputs = llava_prompt(llava, [1, 10, 11], [20, 21])
    with torch.no_grad():
        with lightkv.apply(llava, lightkv.LightKV(**SCHEDULE)):
            ref = llava(**inputs).logits
        with lightkv.apply(mine, lightkv.LightKV(**SCHEDULE)) as handle:
            got = mine(**inputs).logits
    assert handle.stats.vision_tokens == [[256, 256, 128, 64]]
    assert torch.equal(got, ref)


class RenamedVLM(torch.nn.Module):
    """A user's own model class: a LLaVA inside, under a name no built-in adapter knows."""

    def __init__(self, llava):
        super().__init__()
        self.llava, self.config = llava, llava.config

    def forward(self, **inputs):
        return self.llava(**inputs)


class RenamedVLMAdapter(LlavaAdapter):
    family = "renamed_vlm"
    model_classes = ("RenamedVLM",)
    model_types = ()

    @property
    def entry_module(self):
        return self.model.llava.model


def test_registered_adapter_is_picked_by_apply(llava, registry):
    model = RenamedVLM(llava).eval()
    with pytest.raises(TypeError, match=r"RenamedVLM.*llava: LlavaForConditionalGeneration.*qwen2_5_vl"):
        lightkv.apply(model, lightkv.LightKV(**SCHEDULE))
    assert "renamed_vlm" not in lightkv.SUPPORTED_FAMILIES

    assert lightkv.register_adapter(RenamedVLMAdapter) is RenamedVLMAdapter
    assert registry[0] is RenamedVLMAdapter
    assert lightkv.SUPPORTED_FAMILIES["renamed_vlm"] == ("RenamedVLM",)
    inputs = llava_prompt(llava, [1, 10, 11], [20, 21])
    with torch.no_grad():
        with lightkv.apply(llava, lightkv.LightKV(**SCHEDULE)):
            ref = llava(**inputs).logits
        with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)) as handle:
            assert type(handle.adapter) is RenamedVLMAdapter
            got = model(**inputs).logits
    assert handle.stats.vision_tokens == [[256, 256, 128, 64]]
    assert torch.equal(got, ref)

    lightkv.register_adapter(RenamedVLMAdapter, first=False)  # registering again moves it
    assert registry[-1] is RenamedVLMAdapter and registry.count(RenamedVLMAdapter) == 1
    assert type(get_adapter(model)) is RenamedVLMAdapter  # still the only one that fits


def test_registered_adapter_first_takes_over_a_built_in_class(llava, registry):
    class Override(LlavaAdapter):
        family = "llava_override"

    assert type(get_adapter(llava)) is LlavaAdapter
    lightkv.register_adapter(Override)
    assert type(get_adapter(llava)) is Override
    lightkv.register_adapter(Override, first=False)
    assert type(get_adapter(llava)) is LlavaAdapter


def test_register_adapter_rejects_bad_classes(registry):
    with pytest.raises(TypeError, match="subclass of lightkv.adapters.Adapter"):
        lightkv.register_adapter(RenamedVLM)
    with pytest.raises(ValueError, match="family"):
        lightkv.register_adapter(type("NoFamily", (LlavaAdapter,), {"family": ""}))
    with pytest.raises(ValueError, match="model_classes"):
        lightkv.register_adapter(type("NoClasses", (LlavaAdapter,), {"family": "x", "model_classes": ()}))
    assert list(registry) == list(adapters.ADAPTERS)


def test_unsupported_model_names_the_supported_families():
    with pytest.raises(TypeError) as error:
        lightkv.apply(torch.nn.Linear(2, 2), lightkv.LightKV(**SCHEDULE))
    for family, classes in lightkv.SUPPORTED_FAMILIES.items():
        assert family in str(error.value) and all(c in str(error.value) for c in classes)


def test_readme_example_runs(registry):
    """README "Adding a model family": the example registers an adapter for a user's class and compresses."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Adding a model family", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["handle"].stats.vision_tokens == [[256, 256, 128, 64]]
    assert type(namespace["handle"].adapter).__name__ == "MyVLMAdapter"
    assert "my_vlm" in lightkv.SUPPORTED_FAMILIES


# -- defect 5: LLaVA image token ids without image features are text -------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("image_tokens", [1, 256])
def test_llava_image_ids_without_pixels_are_text(attn, image_tokens):
    model = tiny_llava(attn_implementation=attn)
    image_id = model.config.image_token_id
    ids = torch.tensor([[1, 10, 11] + [image_id] * image_tokens + [20, 21]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        ref = model(**inputs, use_cache=True)
        with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)) as handle:
            got = model(**inputs, use_cache=True)
    assert torch.equal(got.logits, ref.logits)
    assert [layer.keys.shape[2] for layer in got.cache.layers] == [ids.shape[1]] * 4
    assert handle.stats.vision_tokens == [[0] * 4]


def test_llava_generated_image_id_at_a_decode_step(llava):
    """A decode step whose token is the image id (no pixel values come with it) continues the compressed cache
    like any text token: with a schedule that merges nothing, exactly the unpatched model's logits."""
    inputs = llava_prompt(llava, [1, 10, 11], [20, 21])
    step = torch.tensor([[llava.config.image_token_id]])

    def prefill_then_image_id():
        out = llava(**inputs, use_cache=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
        return llava(input_ids=step, attention_mask=mask, cache=out.cache, use_cache=True).logits

    with torch.no_grad():
        ref = prefill_then_image_id()
        with lightkv.apply(llava, lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.0, 0.0])):
            got = prefill_then_image_id()
        with lightkv.apply(llava, lightkv.LightKV(**SCHEDULE)):
            compressed = prefill_then_image_id()  # runs: the compressed cache continues
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert compressed.shape == ref.shape and bool(torch.isfinite(compressed).all())


def test_llava_generate_still_compresses(llava):
    """generate() encodes the image before the prefill and passes the features, not pixel_values: still an
    image, still compressed."""
    inputs = llava_prompt(llava, [1, 10, 11], [20, 21])
    with torch.no_grad(), lightkv.apply(llava, lightkv.LightKV(**SCHEDULE)) as handle:
        llava.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert handle.stats.vision_tokens == [[256, 256, 128, 64]]
