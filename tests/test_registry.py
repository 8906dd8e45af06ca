"""The method registry and the one method-spec grammar (parse, split, build)."""

import pytest

import lightkv
from lightkv.methods import MethodSpec, build_method, get_method, method_names, parse_method_spec, split_method_list
from lightkv.methods.registry import register_method, unregister_method
from lightkv.methods.spec import method_fields, parse_field

BUILT_IN = {"lightkv": lightkv.LightKV, "tome": lightkv.ToMe, "random": lightkv.Random, "fastv": lightkv.FastV,
            "pdrop": lightkv.PDrop, "sparsevlm": lightkv.SparseVLM, "visionzip": lightkv.VisionZip,
            "dart": lightkv.DART}


def test_every_built_in_method_registers_its_class_and_matcher():
    assert method_names() == tuple(BUILT_IN)
    for name, cls in BUILT_IN.items():
        entry = get_method(name)
        assert (entry.name, entry.cls) == (name, cls) and callable(entry.matcher)
    assert get_method(" FastV ").cls is lightkv.FastV
    assert lightkv.budget.budget_methods() == tuple(BUILT_IN)


def test_unknown_and_duplicate_names():
    with pytest.raises(ValueError, match="unknown method 'nope'; methods: lightkv, tome"):
        get_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_method("fastv", lightkv.FastV)
    with pytest.raises(ValueError, match="spec syntax"):
        register_method("a:b", lightkv.FastV)
    with pytest.raises(ValueError, match="no method"):
        register_method("none", lightkv.FastV)


def test_register_as_decorator_and_replace():
    @register_method("test_decorated")
    class Thing(lightkv.FastV):
        pass

    try:
        assert get_method("test_decorated").cls is Thing and get_method("test_decorated").matcher is None
        register_method("test_decorated", lightkv.FastV, replace=True)
        assert get_method("test_decorated").cls is lightkv.FastV
        assert isinstance(build_method("test_decorated:layer=1"), lightkv.FastV)
        with pytest.raises(ValueError, match="unknown method 'test_decorated'; budgets are known"):
            lightkv.match_budget("test_decorated", 0.5, 4, (4, 4))
    finally:
        unregister_method("test_decorated")
    assert "test_decorated" not in method_names()


@pytest.mark.parametrize("text,expected", [
    ("none", MethodSpec("none")),
    ("", MethodSpec("none")),
    ("uncompressed", MethodSpec("none")),
    ("lightkv", MethodSpec("lightkv")),
    ("LightKV@0.55", MethodSpec("lightkv", 0.55)),
    ("fastv@0.35", MethodSpec("fastv", 0.35)),
    ("fastv:layer=3,ratio=0.75", MethodSpec("fastv", None, {"layer": 3, "ratio": 0.75})),
    ("fastv:layer=3:ratio=0.75", MethodSpec("fastv", None, {"layer": 3, "ratio": 0.75})),
    ("lightkv:layers=12;18;24", MethodSpec("lightkv", None, {"layers": [12, 18, 24]})),
    ("lightkv:layers=[12,18,24]", MethodSpec("lightkv", None, {"layers": [12, 18, 24]})),
    ("lightkv:layers=[12,18,24],windows=[4,2,1]", MethodSpec("lightkv", None, {"layers": [12, 18, 24],
                                                                              "windows": [4, 2, 1]})),
    ("lightkv@0.35:guidance=uniform", MethodSpec("lightkv", 0.35, {"guidance": "uniform"})),
    ("fastv:budget=0.35", MethodSpec("fastv", 0.35)),
    ("tome:size_weighted=true", MethodSpec("tome", None, {"size_weighted": True})),
    ("lightkv:guidance='uniform'", MethodSpec("lightkv", None, {"guidance": "uniform"})),
])
def test_parse_method_spec(text, expected):
    assert parse_method_spec(text) == expected


@pytest.mark.parametrize("text,message", [
    ("nope@0.5", r"unknown method 'nope' in 'nope@0.5'; methods: none, lightkv, tome"),
    ("fastv@1.5", r"budget in 'fastv@1.5' must be a retained fraction in \(0, 1\], got 1.5"),
    ("fastv@0", r"\(0, 1\]"),
    ("fastv@abc", r"budget in 'fastv@abc' must be a number in \(0, 1\]"),
    ("fastv:budget=x", r"must be a number"),
    ("fastv:layer", r"malformed field 'layer' in 'fastv:layer'; expected FIELD=VALUE"),
    ("fastv:=3", r"malformed field"),
    ("fastv:", r"nothing after ':'"),
    ("fastv:layers=3", r"fastv has no field 'layers' \(in 'fastv:layers=3'\); its fields: positions, layer, ratio"),
    ("fastv@0.5:budget=0.4", r"budget twice"),
    ("fastv:layer=1,layer=2", r"given twice"),
    ("none@0.5", r"'none' takes no budget"),
    ("lightkv:layers=[1,2", r"cannot read the list"),
])
def test_parse_errors_are_one_clear_line(text, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_method_spec(text)
    assert "\n" not in str(err.value)


def test_parse_field_values():
    assert parse_field("3") == 3 and parse_field("0.5") == 0.5 and parse_field("False") is False
    assert parse_field("[1, 2]") == [1, 2] and parse_field("1;2.5") == [1, 2.5] and parse_field("(3,)") == [3]
    assert parse_field("faithful") == "faithful" and parse_field(7) == 7
    assert method_fields("fastv") == ("positions", "layer", "ratio")


def test_spec_text_round_trips():
    for text in ("lightkv@0.55", "fastv:layer=3,ratio=0.75", "lightkv@0.35:guidance=uniform",
                 "lightkv:layers=[12,18,24]", "tome:size_weighted=true", "none"):
        spec = parse_method_spec(text)
        assert parse_method_spec(str(spec)) == spec


def test_split_method_list():
    assert split_method_list("none,fastv:layer=3,ratio=0.75,lightkv@0.55") == [
        "none", "fastv:layer=3,ratio=0.75", "lightkv@0.55"]
    assert split_method_list("lightkv:layers=[12,18,24],windows=[4,2,1], tome,pdrop@0.3") == [
        "lightkv:layers=[12,18,24],windows=[4,2,1]", "tome", "pdrop@0.3"]
    assert split_method_list("fastv:layer=3:ratio=0.75,lightkv@0.35:guidance=uniform,none") == [
        "fastv:layer=3:ratio=0.75", "lightkv@0.35:guidance=uniform", "none"]
    assert split_method_list("lightkv:layers=12;18;24,windows=4;2;1") == ["lightkv:layers=12;18;24,windows=4;2;1"]
    assert split_method_list(" , ") == []


def test_build_method_from_fields_and_budgets():
    assert build_method("none") is None
    assert build_method("fastv:layer=3,ratio=0.75") == lightkv.FastV(layer=3, ratio=0.75)
    assert build_method("fastv", layer="3", ratio=0.75) == lightkv.FastV(layer=3, ratio=0.75)
    assert build_method("lightkv:layers=1;2,windows=[2,1],ratios=0.5;0.5") == \
        lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5])
    # a budget goes through the method's matcher, with the other fields fixed
    for text in ("lightkv@0.6:guidance=uniform", "lightkv:budget=0.6,guidance=uniform"):
        built = build_method(text, num_layers=32, grids=[(24, 24)])
        assert built == lightkv.match_budget("lightkv", 0.6, 32, (24, 24), guidance="uniform").method
        assert built.guidance == "uniform"
    assert build_method("fastv", budget=0.35, num_layers=32, grid=(24, 24)) == \
        lightkv.match_budget("fastv", 0.35, 32, (24, 24)).method
    two = build_method("pdrop@0.4", num_layers=32, grids=[(24, 24), (12, 18)])
    assert two == lightkv.match_budget("pdrop", 0.4, 32, grids=[(24, 24), (12, 18)]).method
    with pytest.raises(ValueError, match="needs the model's num_layers and the image grids"):
        build_method("fastv@0.35")
    with pytest.raises(ValueError, match=r"fastv has no field\(s\) \['layers'\]"):
        build_method("fastv", layers=[1])
    with pytest.raises(ValueError, match="'none' takes no budget or fields"):
        build_method("none", layer=1)


def test_match_budget_accepts_grids():
    one = lightkv.match_budget("fastv", 0.5, 32, (24, 24), num_images=2)
    same = lightkv.match_budget("fastv", 0.5, 32, grids=[(24, 24), (24, 24)])
    assert one == same
    mixed = lightkv.match_budget("lightkv", 0.6, 32, grids=[(24, 24), (12, 18)])
    assert mixed.kept_per_layer == mixed.method.kept_per_layer(32, [(24, 24), (12, 18)])
    assert mixed.retained_fraction == lightkv.retained_fraction(mixed.method, 32, [(24, 24), (12, 18)])
    with pytest.raises(ValueError, match="not both"):
        lightkv.match_budget("fastv", 0.5, 32, (24, 24), grids=[(24, 24)])
    with pytest.raises(ValueError, match="needs grid"):
        lightkv.match_budget("fastv", 0.5, 32)


def test_register_budget_old_signature_is_adapted():
    calls = []

    def old_style(target, num_layers, grid, num_images, **kwargs):
        calls.append((grid, num_images, kwargs))
        method = lightkv.FastV(layer=0, ratio=1 - target)
        kept = method.kept_per_layer(num_layers, [grid] * num_images)
        return lightkv.BudgetMatch(method, sum(kept) / (num_layers * kept[0]), kept, target)

    lightkv.register_budget("test_old", old_style)
    try:
        # strict=False: one matcher call (a strict match far above the target also asks the matcher for its floor)
        assert lightkv.match_budget("test_old", 0.5, 2, (4, 6), num_images=3, strict=False).kept_per_layer == [72, 36]
        assert calls == [((4, 6), 3, {})]
        with pytest.raises(ValueError, match="one grid only"):
            lightkv.match_budget("test_old", 0.5, 2, grids=[(4, 6), (2, 2)])
        with pytest.raises(ValueError, match="only: give a budget"):
            build_method("test_old")
    finally:
        unregister_method("test_old")
