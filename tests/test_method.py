import pytest

import lightkv


def test_reference_schedule_fraction_on_llava_7b():
    method = lightkv.LightKV(layers=[12, 18, 24], windows=[4, 2, 1], ratios=[0.5, 0.5, 0.5])
    pred = lightkv.predict_retained_fraction(method, num_layers=32, grid=576)
    assert pred["retained_fraction"] == pytest.approx((13 * 1 + 6 * 0.5 + 6 * 0.25 + 7 * 0.125) / 32)
    assert pred["kept_per_layer"][12] == 576 and pred["kept_per_layer"][13] == 288
    assert pred["kept_per_layer"][19] == 144 and pred["kept_per_layer"][31] == 72


def test_qwen_reference_schedule_on_non_square_grid():
    method = lightkv.LightKV(layers=[12, 17, 22], windows=[6, 4, 2], ratios=[0.5, 0.5, 0.5])
    pred = lightkv.predict_retained_fraction(method, num_layers=28, grid=(24, 36))
    kept = pred["kept_per_layer"]
    assert kept[0] == 864 and kept[13] == 432  # stage 1 is exact: every 4x6 window halves
    # 4x4 windows of 6x9 cells do not nest in the 6x6 windows of 4x6: survivors are spread evenly,
    # 27 per window, and each window merges floor(27/2) = 13 of them
    assert kept[18] == 16 * (27 - 13)
    assert kept[27] == 4 * (56 - 28)


def test_non_square_count_needs_grid():
    with pytest.raises(ValueError, match="square"):
        lightkv.predict_retained_fraction(lightkv.LightKV(layers=[1], windows=[1], ratios=[0.5]), 4, grid=300)


def test_schedule_fields_are_validated_types():
    with pytest.raises(TypeError):
        lightkv.LightKV(layers="12", windows=[1], ratios=[0.5])
    with pytest.raises(TypeError):
        lightkv.LightKV(layers=[1.5], windows=[1], ratios=[0.5])
    with pytest.raises(ValueError, match="min_tokens_per_window"):
        lightkv.LightKV(layers=[1], windows=[1], ratios=[0.5], min_tokens_per_window=0)
