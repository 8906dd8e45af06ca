"""`lightkv eval` without lmms-eval: method labels and fields, the local task, the command lines, the results table."""

import json

import pytest

import lightkv
from lightkv.cli import main
from lightkv.evaluation.lmms_run import EvalRun, build_command, markdown_table, read_efficiency, read_scores
from lightkv.evaluation.lmms_stats import TaskStats, summarize
from lightkv.evaluation.local_task import TEMPLATE, read_shapes_task, write_shapes_task
from lightkv.evaluation.method_spec import build_method, parse_field, parse_method_spec
from lightkv.methods.spec import MethodSpec


def test_method_labels():
    assert parse_method_spec("none") == MethodSpec("none")
    assert parse_method_spec(" LightKV@0.55 ") == MethodSpec("lightkv", 0.55)
    assert parse_method_spec("fastv") == MethodSpec("fastv")
    for bad, match in (("nope@0.5", "unknown method"), ("lightkv@x", "number"), ("lightkv@1.5", r"\(0, 1\]"),
                       ("none@0.5", "no budget")):
        with pytest.raises(ValueError, match=match):
            parse_method_spec(bad)


def test_fields_from_strings():
    assert parse_field("[12,18,24]") == [12, 18, 24]
    assert parse_field("0.5;0.25") == [0.5, 0.25]
    assert parse_field("3") == 3 and parse_field("0.5") == 0.5 and parse_field("true") is True
    assert parse_field("uniform") == "uniform"
    with pytest.raises(ValueError, match="list"):
        parse_field("[1,")


def test_build_method_from_budget_or_fields():
    assert build_method("none") is None
    matched = build_method("lightkv", budget=0.55, num_layers=8, grid=(16, 16))
    assert matched == lightkv.match_budget("lightkv", 0.55, 8, (16, 16)).method
    assert build_method("lightkv", budget="0.55", num_layers=32, grid=(24, 24), guidance="uniform").guidance == "uniform"
    assert build_method("fastv", layer="3", ratio="0.25") == lightkv.FastV(layer=3, ratio=0.25)
    assert build_method("pdrop", layers="8;16", ratio=0.5) == lightkv.PDrop(layers=(8, 16), ratio=0.5)
    with pytest.raises(ValueError, match="fields: positions, layer, ratio"):
        build_method("fastv", windows=2)
    with pytest.raises(ValueError, match="num_layers"):
        build_method("fastv", budget=0.5)
    with pytest.raises(ValueError, match="no budget"):
        build_method("none", budget=0.5)


def test_local_task_files(tmp_path):
    folder = write_shapes_task(tmp_path / "t", per_family=2, task="my_shapes")
    rows = read_shapes_task(folder)
    assert len(rows) == 10 and [r["question_id"] for r in rows] == list(range(10))
    assert {r["family"] for r in rows} == {"attribute", "existence", "counting", "spatial", "location"}
    yaml = (folder / "my_shapes.yaml").read_text()
    assert f'include: "{TEMPLATE}"' in yaml and "task: my_shapes" in yaml and "test: test.jsonl" in yaml
    assert TEMPLATE.exists() and (TEMPLATE.parent / "utils.py").exists()
    with pytest.raises(ValueError, match="per_family"):
        write_shapes_task(tmp_path / "u", per_family=0)


def test_task_scoring_functions():
    from lightkv.evaluation.lmms_tasks import utils

    doc = {"answer": "yes", "family": "existence", "question": "is there a red circle ?"}
    scores = utils.shapes_process_results(doc, [" Yes "])
    assert scores["exact_match"] == 1.0
    items = [utils.shapes_process_results(doc, ["no"])["existence"], scores["existence"]]
    assert utils.shapes_family_mean(items) == 0.5
    assert utils.shapes_doc_to_text(doc) == doc["question"]


def test_command_lines(tmp_path):
    run = EvalRun(model="llava-hf/llava-1.5-7b-hf", label="lightkv@0.55", tasks=["mme", "pope"], out=tmp_path,
                  batch_size=8, model_args={"dtype": "bfloat16", "layers": [1, 2]}, limit=10, extra_args=["--seed", "1"])
    cmd = build_command(run, python="python")
    assert cmd[:3] == ["python", "-m", "lmms_eval"]
    args = cmd[cmd.index("--model_args") + 1]
    assert args == (f"pretrained=llava-hf/llava-1.5-7b-hf,method=lightkv,budget=0.55,dtype=bfloat16,layers=1;2,"
                    f"stats_path={tmp_path}/lightkv_0.55/lightkv_stats.json")
    assert cmd[cmd.index("--tasks") + 1] == "mme,pope" and cmd[-2:] == ["--seed", "1"]
    assert "--log_samples" in cmd and cmd[cmd.index("--limit") + 1] == "10"
    dp = build_command(EvalRun(model="m", label="none", tasks=["gqa"], out=tmp_path, num_processes=8), python="py")
    assert dp[:7] == ["py", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "8",
                      "--num_machines"]
    assert dp[dp.index("--model_args") + 1].startswith("pretrained=m,method=none,stats_path=")
    with pytest.raises(ValueError, match="may not contain"):
        build_command(EvalRun(model="a,b", label="none", tasks=["t"], out=tmp_path))


def test_cli_dry_run(tmp_path, capsys):
    assert main(["eval", "--model", "org/model", "--methods", "none,fastv@0.35", "--tasks", "lightkv_shapes,mme",
                 "--out", str(tmp_path), "--grid", "24x24", "--model-args", "guidance=uniform", "--dry-run",
                 "--", "--seed", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert len(lines) == 2
    assert "method=fastv,budget=0.35,grid=24x24,guidance=uniform" in lines[1]
    assert f"--include_path {tmp_path / 'tasks'}" in lines[0] and lines[0].endswith("--seed 3")
    with pytest.raises(SystemExit) as info:  # a usage error (tests/test_cli.py has them all)
        main(["eval", "--model", "m", "--methods", "bogus", "--tasks", "mme", "--dry-run"])
    assert info.value.code == 2 and "unknown method 'bogus'" in capsys.readouterr().err


def test_command_lines_of_specs_with_fields(tmp_path):
    run = EvalRun(model="m", label="lightkv:layers=12;18;24,windows=[4,2,1]", tasks=["mme"], out=tmp_path)
    cmd = build_command(run, python="python")
    assert cmd[cmd.index("--model_args") + 1] == (f"pretrained=m,method=lightkv,layers=12;18;24,windows=4;2;1,"
                                                  f"stats_path={tmp_path}/lightkv_layers_12_18_24_windows_4_2_1/"
                                                  "lightkv_stats.json")


def test_results_are_read_and_merged(tmp_path):
    folder = tmp_path / "lmms" / "org__model"
    folder.mkdir(parents=True)
    (folder / "20260101_results.json").write_text(json.dumps({"results": {"pope": {
        "alias": "pope", "pope_accuracy,none": 0.86, "pope_accuracy_stderr,none": 0.01, "pope_f1_score,none": 0.85}}}))
    scores, path = read_scores(tmp_path / "lmms")
    assert scores == {"pope": {"pope_accuracy": 0.86, "pope_f1_score": 0.85}} and path.name == "20260101_results.json"
    for rank, (n, kv) in enumerate(((3, 300), (2, 100))):
        stats = TaskStats()
        stats.add(sequences=n, batches=1, retained_sum=0.5 * n, retained_count=n, kv_bytes=kv,
                  uncompressed_kv_bytes=2 * kv, prefill_s=0.1 * n)
        (tmp_path / f"lightkv_stats.rank{rank}.json").write_text(json.dumps({"raw": {"pope": stats.raw()}}))
    eff = read_efficiency(tmp_path / "lightkv_stats.json")["pope"]
    assert eff["sequences"] == 5 and eff["retained_fraction"] == 0.5 and eff["kv_ratio"] == 0.5
    assert eff["kv_bytes_per_sequence"] == 80 and eff["prefill_ms_per_sequence"] == pytest.approx(100)
    assert summarize(TaskStats().raw())["retained_fraction"] is None
    table = markdown_table([{"method": "none", "task": "pope", "scores": scores["pope"], "efficiency": eff}])
    assert "| none | pope | pope_accuracy 0.860, pope_f1_score 0.850 | 0.500 |" in table
