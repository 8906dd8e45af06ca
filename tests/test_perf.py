"""lightkv.perf: analytic FLOPs and KV bytes against real runs, the overhead timer, ``lightkv bench`` on a tiny spec.

No wall-clock assertions: times are measured and written, never checked.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lightkv
from lightkv.perf import Workload, get_spec, predict_profile, profile_from_stats, scale_layers
from lightkv.perf.bench import REQUIRED_KEYS, BenchConfig, run_bench, write_outputs
from lightkv.perf.memory import max_batch, parameter_count
from lightkv.methods.spec import split_method_list
from lightkv.perf.methods import make_method
from lightkv.perf.runs import cache_bytes, cache_of, cache_kwarg, make_inputs, next_token, tile_cache
from lightkv.perf.timer import OverheadTimer

REPO = Path(__file__).resolve().parents[1]
TINY = get_spec("tiny")
SCHEDULE = dict(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny kernels: one thread avoids OpenMP oversubscription on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eager_model():
    return TINY.build(attn_implementation="eager")


@pytest.fixture(scope="module")
def sdpa_model():
    return TINY.build(attn_implementation="sdpa")


def counted_flops(model, inputs):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs, use_cache=True, logits_to_keep=1)
    return counter.get_total_flops()


# -- specs and schedules -------------------------------------------------------------------------------------------


def test_scale_layers_keeps_the_share_of_layers_between_stages():
    assert scale_layers((12, 18, 24), 32, 32) == (12, 18, 24)
    assert scale_layers((12, 18, 24), 32, 8) == (2, 4, 5)
    assert scale_layers((12, 18, 24), 32, 40) == (15, 23, 30)
    assert scale_layers((12, 18, 24), 32, 4) == (1, 2)  # a stage on the last layer would shorten nothing


def test_real_size_specs_need_no_weights():
    t, v = get_spec("llava-1.5-7b").dims()
    assert (t.hidden, t.intermediate, t.layers, t.heads, t.kv_heads, t.head_dim, t.vocab) == \
        (4096, 11008, 32, 32, 32, 128, 32064)
    assert (v.patches, v.tokens) == (576, 577)
    # LLaVA-1.5-7B has ~7.06 B parameters
    assert 7.0e9 < parameter_count(t, v) < 7.1e9
    assert get_spec("llava-1.5-13b").reference_schedule()["layers"] == [15, 23, 30]
    qwen = get_spec("qwen2.5-vl-7b")
    assert qwen.dims()[0].kv_heads == 4 and not qwen.runnable
    with pytest.raises(ValueError, match="adapter"):
        qwen.build()


def test_trained_spec_loads_a_local_checkpoint(sdpa_model, tmp_path):
    sdpa_model.save_pretrained(tmp_path / "ckpt")
    spec = get_spec(f"trained:{tmp_path / 'ckpt'}")
    assert spec.dims() == TINY.dims()
    assert spec.reference_schedule() == {"layers": [1, 2], "windows": [4, 2], "ratios": [0.5, 0.5]}
    model = spec.build(num_layers=3)
    assert len(model.model.language_model.layers) == 3
    with pytest.raises(ValueError, match="config.json"):
        get_spec(f"trained:{tmp_path}")


def test_parameter_count_matches_the_built_model(sdpa_model):
    t, v = TINY.dims()
    assert parameter_count(t, v) == sum(p.numel() for p in sdpa_model.parameters())


# -- analytic FLOPs against a brute-force count --------------------------------------------------------------------


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("guidance", [None, "faithful", "uniform", "text_to_vision"])
def test_analytic_matmul_flops_equal_flop_counter(eager_model, guidance, images):
    """FlopCounterMode counts every matmul of an eager-attention forward (vision tower, projector, decoder,
    LM head, and LightKV's matching and guidance products); the analytic model gives the same number.
    Its element-wise terms (norms, softmax, RoPE, activations, merging) are not counted by FlopCounterMode: under
    10% at this tiny width (head_dim 16), under 0.5% at real sizes (test below)."""
    workload = Workload(images=images, text_before=6, text_after=5)
    inputs = make_inputs(eager_model, workload, torch.device("cpu"), torch.float32)
    method = None if guidance is None else lightkv.LightKV(**SCHEDULE, guidance=guidance)
    if method is None:
        counted = counted_flops(eager_model, inputs)
        profile = predict_profile(TINY, None, workload, dtype_bytes=4)
    else:
        with lightkv.apply(eager_model, method) as handle:
            counted = counted_flops(eager_model, inputs)
        profile = profile_from_stats(TINY, method, handle.stats, [images], [workload.text_after_first_image()],
                                     dtype_bytes=4)
        # the schedule prediction gives the same counts without running the model
        predicted = predict_profile(TINY, method, workload, dtype_bytes=4)
        assert predicted.tokens == profile.tokens
        assert predicted.flops.matmul == profile.flops.matmul
    assert profile.flops.matmul_total == counted
    assert 0 < profile.flops.total - counted < 0.10 * counted


def test_compressed_flops_are_lower_and_method_cost_is_separate(eager_model):
    workload = Workload(text_before=6, text_after=5)
    base = predict_profile(TINY, None, workload)
    ours = predict_profile(TINY, lightkv.LightKV(**SCHEDULE), workload)
    assert ours.flops.group("decoder.") < base.flops.group("decoder.")
    assert ours.flops.group("vision.") == base.flops.group("vision.")
    assert ours.flops.group("lightkv.") > 0 and base.flops.group("lightkv.") == 0


def test_full_size_llava_7b_reference_schedule_analytic():
    spec = get_spec("llava-1.5-7b")
    workload = Workload()
    base = predict_profile(spec, None, workload)
    ours = predict_profile(spec, lightkv.LightKV(**spec.reference_schedule()), workload)
    assert ours.retained_fraction == pytest.approx(0.574, abs=1e-3)
    assert sum(ours.vision_kv_bytes) / sum(base.vision_kv_bytes) == pytest.approx(ours.retained_fraction)
    assert ours.flops.total / base.flops.total < 0.65  # >= 35% fewer prefill FLOPs
    assert base.flops.total - base.flops.matmul_total < 0.005 * base.flops.total  # element-wise terms are small


# -- KV bytes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_formula_matches_the_real_cache(dtype):
    model = TINY.build(dtype=dtype)
    workload = Workload(text_before=6, text_after=5, batch=2)
    inputs = make_inputs(model, workload, torch.device("cpu"), dtype)
    bytes_per = torch.tensor([], dtype=dtype).element_size()
    method = lightkv.LightKV(**SCHEDULE)
    for m in (None, method):
        with torch.no_grad():
            if m is None:
                out = model(**inputs, use_cache=True)
            else:
                with lightkv.apply(model, m) as handle:
                    out = model(**inputs, use_cache=True)
                assert handle.stats.kv_bytes == cache_bytes(cache_of(out))
        predicted = predict_profile(TINY, m, workload, dtype_bytes=bytes_per)
        assert predicted.kv_bytes == cache_bytes(cache_of(out))
        if m is not None:
            assert predicted.vision_kv_bytes == handle.stats.vision_kv_bytes


def test_max_batch():
    assert max_batch(100, 40, 6) == 10
    assert max_batch(100, 40, 5, activation_bytes_per_sample=1) == 10
    assert max_batch(10, 40, 6) == 0
    with pytest.raises(ValueError):
        max_batch(100, 40, 0)


# -- overhead timer ------------------------------------------------------------------------------------------------


class CountingTimer(OverheadTimer):
    def __init__(self):
        super().__init__()
        self.starts = 0

    def start(self):
        self.starts += 1
        return super().start()


def test_overhead_timer_is_off_by_default_and_times_every_hook_when_set(sdpa_model):
    inputs = make_inputs(sdpa_model, Workload(text_before=6, text_after=5), torch.device("cpu"), torch.float32)
    with lightkv.apply(sdpa_model, lightkv.LightKV(**SCHEDULE)) as handle, torch.no_grad():
        assert handle.timer is None
        reference = sdpa_model(**inputs).logits
        timer = CountingTimer()
        handle.timer = timer
        timed = sdpa_model(**inputs).logits
        handle.timer = None
        starts = timer.starts
        sdpa_model(**inputs)
    assert timer.starts == starts  # nothing is timed once the timer is unset
    torch.testing.assert_close(timed, reference)  # timing changes nothing
    assert {"entry", "layer_pre", "layer_post", "capture"} <= set(timer.seconds)
    # entry pre + post, pre + post of layers 1..3, q and k capture at the two stage layers
    assert timer.calls == {"entry": 2, "layer_pre": 3, "layer_post": 3, "capture": 4}
    assert timer.total > 0


# -- methods from the command line ---------------------------------------------------------------------------------


def test_make_method():
    spec = get_spec("llava-1.5-7b")
    assert make_method("none", spec) == ("none", None)
    label, method = make_method("lightkv", spec, depth=8)
    assert (method.layers, method.windows, method.ratios) == ((2, 4, 5), (4, 2, 1), (0.5, 0.5, 0.5))
    _, method = make_method("lightkv:guidance=uniform:layers=[3,5]:windows=[2,1]:ratios=[0.5,0.5]", spec, 8)
    assert method.guidance == "uniform" and method.layers == (3, 5)
    assert split_method_list("none,lightkv:layers=[3,5],tome") == ["none", "lightkv:layers=[3,5]", "tome"]
    # baselines come at LightKV's budget (its average retained fraction at this depth), or at budget=...
    for name, target in (("fastv", 0.574), ("pdrop", 0.574), ("visionzip:budget=0.35", 0.35), ("dart@0.35", 0.35)):
        _, method = make_method(name, spec, 32)
        assert predict_profile(spec, method, Workload()).retained_fraction == pytest.approx(target, abs=0.01)
    with pytest.raises(ValueError, match="unknown method"):
        make_method("nosuchmethod", spec)
    with pytest.raises(ValueError):
        make_method("lightkv:layers=[40]:windows=[1]:ratios=[0.5]", spec, 32)


# -- tiled decode equals a real batched prefill --------------------------------------------------------------------


def test_tiled_cache_decodes_like_a_batched_prefill(sdpa_model):
    single = make_inputs(sdpa_model, Workload(text_before=6, text_after=5), torch.device("cpu"), torch.float32)
    batch = make_inputs(sdpa_model, Workload(text_before=6, text_after=5, batch=3), torch.device("cpu"), torch.float32)

    def steps(cache, logits, mask, handle):
        out_logits = []
        token = next_token(logits, sdpa_model.config.image_token_id)
        for _ in range(3):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = sdpa_model(input_ids=token, attention_mask=mask, use_cache=True, **{cache_kwarg(sdpa_model): cache})
            out_logits.append(out.logits[:, -1])
            token = next_token(out.logits, sdpa_model.config.image_token_id)
        return torch.stack(out_logits, 1)

    with lightkv.apply(sdpa_model, lightkv.LightKV(**SCHEDULE)) as handle, torch.no_grad():
        out = sdpa_model(**single, use_cache=True)
        tiled = tile_cache(cache_of(out), 3)
        assert [layer.keys.shape[0] for layer in tiled.layers] == [3] * 4
        got = steps(tiled, out.logits.repeat(3, 1, 1), single["attention_mask"].repeat(3, 1), handle)
        out_b = sdpa_model(**batch, use_cache=True)
        expected = steps(cache_of(out_b), out_b.logits, batch["attention_mask"], handle)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# -- lightkv bench ---------------------------------------------------------------------------------------------------


def test_bench_on_tiny_spec_writes_bench_json(tmp_path):
    config = BenchConfig(model="tiny", methods=["lightkv"], repeats=2, warmup=0, decode_tokens=2,
                         text_before=6, text_after=5, scaling=True, scaling_images=[1, 2], batch_sizes=[1, 2],
                         scaling_decode_tokens=2, budgets_gb=[1.0])
    result = run_bench(config)
    written = write_outputs(result, tmp_path, plots=False)
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"none", "lightkv"}  # the uncompressed baseline is always measured
    for row in data["rows"]:
        assert set(REQUIRED_KEYS) <= set(row)
        assert len(row["prefill_ms_runs"]) == 2
    none, ours = rows["none"], rows["lightkv"]
    for key in ("prefill_ratio", "vision_kv_ratio", "total_kv_ratio", "flops_ratio", "decode_ratio"):
        assert none[key] == 1.0
    assert none["overhead_fraction"] == 0.0
    assert ours["vision_kv_ratio"] == pytest.approx(ours["retained_fraction"]) == pytest.approx(0.6875)
    assert ours["total_kv_ratio"] < 1 and ours["flops_ratio"] < 1
    assert 0 < ours["overhead_fraction"] < 1
    assert ours["full_size"]["vision_kv_ratio"] == pytest.approx(0.6875)
    images = [r["vision_tokens"] for r in data["scaling"]["vision_tokens"] if r["method"] == "none"]
    assert images == [256, 512]
    assert [r["batch"] for r in data["scaling"]["batch"]] == [1, 1, 2, 2]
    budget = {r["method"]: r["max_batch"] for r in data["scaling"]["budget"]}
    assert budget["lightkv"] > budget["none"] > 0
    for row in (none, ours):  # the decoder span and the rest add up to each measured prefill
        assert row["prefill_decoder_ms"] + row["prefill_outside_ms"] == pytest.approx(row["prefill_ms"], rel=1e-6)
        assert 0 < row["prefill_decoder_ms"] < row["prefill_ms"]
    # FLOPs inside the span: the layers plus the method's stages, everything but vision tower and LM head
    assert ours["flops_layers"] - ours["flops_method"] < none["flops_layers"] < none["flops"]
    assert none["prefill_flops_expected_ratio"] == pytest.approx(1.0)
    share = none["prefill_decoder_ms"] / (none["prefill_decoder_ms"] + none["prefill_outside_ms"])
    outside_flops = (ours["flops"] - ours["flops_layers"]) / (none["flops"] - none["flops_layers"])
    assert ours["prefill_flops_expected_ratio"] == pytest.approx(
        share * ours["flops_layers_ratio"] + (1 - share) * outside_flops)
    assert "| lightkv |" in (tmp_path / "bench.md").read_text()
    assert "Where the prefill time goes" in (tmp_path / "bench.md").read_text()
    assert len(written) == 2


def test_prefill_split_times_the_decoder_span_and_removes_its_hooks(sdpa_model):
    from lightkv.adapters import get_adapter
    from lightkv.perf.runs import prefill

    inputs = make_inputs(sdpa_model, Workload(text_before=4, text_after=3), torch.device("cpu"), torch.float32)
    layers = get_adapter(sdpa_model).decoder_layers
    seen = []
    # other hooks on the layers still run, and the split leaves none of its own behind
    hooks = [layer.register_forward_hook(lambda *a: seen.append(1)) for layer in layers]
    try:
        before = (len(layers[0]._forward_pre_hooks), len(layers[-1]._forward_hooks))
        split = {}
        with torch.no_grad():
            _, wall, _ = prefill(sdpa_model, inputs, torch.device("cpu"), split)
        assert (len(layers[0]._forward_pre_hooks), len(layers[-1]._forward_hooks)) == before
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == len(layers)
    assert 0 < split["decoder_s"] < wall
    assert split["decoder_s"] + split["outside_s"] == pytest.approx(wall)


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from lightkv.perf.plots import plot_scaling

    rows = [{"method": m, "images": 1, "vision_tokens": 256, "prefill_ms": 1.0, "total_kv_bytes": 2**20,
             "vision_kv_bytes": 2**19} for m in ("none", "lightkv")]
    batch = [{"method": m, "batch": b, "decode_tokens_per_s": 10.0 * b} for m in ("none", "lightkv") for b in (1, 2)]
    budget = [{"method": m, "budget_gb": 1.0, "max_batch": 3} for m in ("none", "lightkv")]
    result = {"meta": {"spec": "tiny", "layers": 4, "full_layers": 4, "dtype": "float32", "device": "cpu"},
              "scaling": {"vision_tokens": rows, "batch": batch, "budget": budget}}
    paths = plot_scaling(result, tmp_path)
    assert [p.name for p in paths] == ["scaling_prefill.png", "scaling_kv.png", "scaling_decode.png",
                                       "budget_batch.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_cli_bench_and_gpu_script_tiny(tmp_path):
    """``scripts/gpu_bench.sh --tiny`` runs the whole GPU suite on tiny configs on CPU, via ``lightkv bench``."""
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_bench.sh"), "--tiny", str(out)], capture_output=True,
                          text=True, timeout=300, env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
                                                       "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("tiny-a", "tiny-b"):
        data = json.loads((out / name / "bench.json").read_text())
        assert {r["method"] for r in data["rows"]} == {"none", "lightkv"}
        assert "scaling" in data
    assert (out / "analytic.md").exists() and (out / "SUMMARY.md").exists()


def test_layer_rates_script_counts_the_tokens_each_layer_runs(tmp_path):
    """``scripts/layer_rates.py`` times every decoder layer; the tokens it records per layer are those the
    engine reports for the same schedule (``handle.stats.tokens``), and the uncompressed run keeps the prompt."""
    out = tmp_path / "rates.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "layer_rates.py"), "--model", "tiny", "--layers", "4",
                           "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    model = TINY.build()
    _, method = make_method("lightkv", TINY, 4)
    inputs = make_inputs(model, Workload(images=1, text_before=40, text_after=20), torch.device("cpu"), torch.float32)
    handle = lightkv.apply(model, method)
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)
    assert data["tokens"]["lightkv"] == handle.stats.tokens[0]
    assert data["tokens"]["none"] == [inputs["input_ids"].shape[1]] * 4
    assert len(data["tokens"]["lightkv"]) == 4 and min(data["tokens"]["lightkv"]) < data["tokens"]["none"][0]
    assert set(data["linear"]) == {str(n) for n in set(data["tokens"]["none"]) | set(data["tokens"]["lightkv"])}
    assert "| all |" in proc.stdout and "GFLOP/s" in proc.stdout and "Decoder time ratio expected" in proc.stdout
