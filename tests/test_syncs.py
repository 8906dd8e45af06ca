"""Device -> host syncs of the hot path, counted on CPU with lightkv.perf.syncs (the ops that sync on CUDA).

Goals held here: decode steps add no sync (batch 1, padded batches, LLaVA and Qwen, a manual loop and
``generate``); a prefill adds the same syncs per stage whatever the batch size, padding or number of images;
the per-sample diagnostics (kept_positions, merge_maps) cost syncs only with ``apply(..., record=True)``.
"""

import pytest
import torch

import lightkv
from lightkv.perf.syncs import SyncCounter, count_syncs, format_report
from lightkv.testing import batch_prompts, llava_prompt, qwen_prompt, tiny_llava, tiny_qwen2_5_vl

SCHEDULE = dict(layers=(1, 2, 4), windows=(4, 2, 1), ratios=(0.5, 0.5, 0.5))
# per stage: the engine's read of the new length (1), bipartite_merge's table sizes (1) and
# WindowMergeMethod._active_images' skip check (nonzero + tolist, 2); stage 0 also reads the prompt width (1)
LIGHTKV_STAGES = [5, 4, 4]
TOME_STAGES = [4, 4, 4]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(num_layers=6)


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl(num_layers=6)


def llava_inputs(model, kind):
    one = llava_prompt(model, [1, 3, 4], [7, 8, 9])
    if kind == "batch1":
        return one
    two = llava_prompt(model, [1, 3, 4, 5, 6, 10, 11], [7, 8], seed=1)
    if kind == "padded2":
        return batch_prompts([one, two])
    return batch_prompts([one, llava_prompt(model, [1, 3], [7, 8], num_images=2, seed=2),
                          llava_prompt(model, [1, 3, 4, 5], [9], num_images=0)])  # "mixed3"


def test_counter_counts_the_syncing_ops_only():
    x = torch.arange(6)
    mask = x > 2
    with SyncCounter() as counter:
        y = x * 2 + 1  # no sync
        torch.repeat_interleave(x, x, output_size=15)  # the size is given: no sync
        int(x[0]), bool(mask.any()), x.tolist()
        x[mask], torch.nonzero(mask), torch.unique(x), torch.bincount(x)
        z = y.clone()
        z[mask] = 0
        torch.repeat_interleave(x, x)
    assert [op for _, op in counter.events] == [
        "_local_scalar_dense", "_local_scalar_dense", "tolist", "index[bool mask]", "nonzero", "_unique2",
        "bincount", "index_put_[bool mask]", "repeat_interleave"]


@pytest.mark.parametrize("kind", ["batch1", "padded2", "mixed3"])
def test_llava_decode_steps_add_no_sync_and_stages_do_not_depend_on_the_batch(llava, kind):
    report = count_syncs(llava, lightkv.LightKV(**SCHEDULE), llava_inputs(llava, kind), decode_steps=3)
    assert report.decode == [0, 0, 0], format_report(report)
    assert report.per_stage == LIGHTKV_STAGES, format_report(report)
    assert report.prefill["after"] == 1  # handle.stats: every count read back at once
    assert "index[bool mask]" not in report.prefill_ops and "unique_consecutive" not in report.prefill_ops


def test_tome_stages_and_decode(llava):
    report = count_syncs(llava, lightkv.ToMe(**SCHEDULE), llava_inputs(llava, "padded2"), decode_steps=2)
    assert report.decode == [0, 0] and report.per_stage == TOME_STAGES, format_report(report)


def test_generate_decode_steps_add_no_sync(llava):
    inputs = llava_inputs(llava, "padded2")
    steps = 4

    def run(model):
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)

    report = count_syncs(llava, lightkv.LightKV(**SCHEDULE), inputs, run=run)
    assert report.decode == [0] * (steps - 1), format_report(report)


@pytest.mark.parametrize("batch", [1, 2])
def test_qwen_decode_steps_add_no_sync(qwen, batch):
    prompts = [qwen_prompt(qwen, [1, 3, 4], [7, 8, 9]), qwen_prompt(qwen, [1, 3], [7], images=[(4, 4), (6, 8)])]
    inputs = prompts[0] if batch == 1 else batch_prompts(prompts)
    method = lightkv.LightKV(layers=(1, 2), windows=(1, 1), ratios=(0.5, 0.5), min_tokens_per_window=4)
    report = count_syncs(qwen, method, inputs, decode_steps=3)
    assert report.decode == [0, 0, 0], format_report(report)
    assert report.per_stage == [5, 4], format_report(report)  # as LLaVA's: batch 1 and a padded 2-image batch


def test_diagnostics_are_opt_in(llava):
    inputs = llava_inputs(llava, "padded2")
    method = lightkv.LightKV(**SCHEDULE)
    plain = count_syncs(llava, method, inputs, decode_steps=0)
    recorded = count_syncs(llava, method, inputs, decode_steps=0, record=True)
    # per stage and sample: the kept positions' boolean-mask read and their tolist
    assert [r - p for r, p in zip(recorded.per_stage, plain.per_stage)] == [4, 4, 4]
    with lightkv.apply(llava, method) as handle, torch.no_grad():
        llava(**inputs)
    assert handle.stats.kept_positions == [] and handle.stats.merge_maps == []
    assert handle.stats.vision_tokens[0][-1] < handle.stats.vision_tokens[0][0]  # the cheap counts remain
    with lightkv.apply(llava, method, record=True) as handle, torch.no_grad():
        llava(**inputs)
    assert len(handle.stats.kept_positions) == 2 and len(handle.stats.merge_maps) == 3


def test_record_must_be_a_bool(llava):
    with pytest.raises(TypeError, match="record must be True or False"):
        lightkv.apply(llava, lightkv.LightKV(**SCHEDULE), record="yes")
