"""The ``lightkv`` command line as a new user meets it: instant help, one-line usage errors before any work, every
option documented with its default, and one method-spec grammar through every entry point."""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import lightkv.cli as cli
from lightkv.cli import build_parser, main
from lightkv.evaluation.lmms_run import EvalRun, build_command
from lightkv.evaluation.method_spec import spec_from_model_args
from lightkv.methods.registry import method_names
from lightkv.methods.spec import MethodSpec, parse_method_spec

SRC = Path(cli.__file__).resolve().parents[1]

# -- help and usage errors import no torch ---------------------------------------------------------------------

# lightkv.cli run with the package's __init__ bypassed: what the command line itself imports before parsing
ISOLATED = f"""
import sys, types
package = types.ModuleType("lightkv")
package.__path__ = [{str(SRC / "lightkv")!r}]
sys.modules["lightkv"] = package
from lightkv.cli import main
for argv in (["--help"], ["bench", "--help"], ["eval", "--help"], ["compare", "--per-family", "0"], ["--version"]):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)
print("HEAVY", heavy, file=sys.stderr)
"""


def test_parsing_imports_only_the_standard_library():
    proc = subprocess.run([sys.executable, "-c", ISOLATED], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in proc.stderr, proc.stderr[-2000:]
    assert "usage: lightkv bench" in proc.stdout and "lightkv compare: error: argument --per-family" in proc.stderr


def test_help_of_the_installed_command_imports_no_torch():
    check = "import lightkv, sys; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.strip() == "False"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "lightkv.cli", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "transformers" not in imported


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("lightkv ")


# -- every bad argument: one line, exit 2, nothing written ----------------------------------------------------------


def _bad(tmp_path, name):
    """A file and a path beneath it, for --out."""
    path = tmp_path / name
    path.write_text("not a folder")
    return path


BAD = [
    (["compare", "--methods", "bogus"], "unknown method 'bogus'"),
    (["compare", "--methods", "lightkv@1.5"], "(0, 1]"),
    (["compare", "--methods", "lightkv@half"], "must be a number"),
    (["compare", "--methods", "fastv:windows=2"], "fastv has no field 'windows'"),
    (["compare", "--budgets", "0.5,0"], "argument --budgets"),
    (["compare", "--budgets", "0.5,x"], "argument --budgets"),
    (["compare", "--per-family", "0"], "argument --per-family: expected a positive integer, got 0"),
    (["demo", "--per-family", "-3"], "argument --per-family: expected a positive integer, got -3"),
    (["demo", "--per-family", "many"], "argument --per-family"),
    (["demo", "--model", "/no/such/model"], "not a model folder"),
    (["bench", "--model", "llava-99b"], "unknown model spec 'llava-99b'"),
    (["bench", "--methods", "none,fastv@2"], "(0, 1]"),
    (["bench", "--repeats", "0"], "argument --repeats"),
    (["bench", "--dtype", "int3"], "argument --dtype: invalid choice"),
    (["eval", "--model", "m", "--tasks", "mme", "--methods", "bogus", "--dry-run"], "unknown method 'bogus'"),
    (["eval", "--model", "m", "--tasks", "mme", "--model-args", "novalue", "--dry-run"], "key=value"),
    (["eval", "--model", "m"], "the following arguments are required: --tasks"),
    (["nosuchcommand"], "invalid choice"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(argv) for argv, _ in BAD])
def test_bad_arguments_are_one_line_usage_errors(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out folders (out/...) would appear here
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightkv") and ": error: " in lines[0], captured.err
    assert message in lines[0]
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["demo", "compare", "bench", "eval", "calibrate"])
def test_out_must_be_a_writable_folder(command, tmp_path, capsys):
    extra = ["--model", "m", "--tasks", "mme", "--dry-run"] if command == "eval" else []
    file = tmp_path / "results.txt"
    file.write_text("not a folder")
    for out, message in ((file, "is a file, not a folder"), (file / "sub", "is a file, so the folder cannot")):
        with pytest.raises(SystemExit) as info:
            main([command, "--out", str(out), *extra])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


def test_eval_without_lmms_eval_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lmms_eval" else real(name, *a))
    ran = []
    monkeypatch.setattr("lightkv.evaluation.lmms_run.run_eval", lambda *a, **k: ran.append(a))
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", "m", "--tasks", "mme", "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lightkv[eval]'" in err and "make eval-venv" in err
    assert not out.exists() and ran == []
    assert main(["eval", "--model", "m", "--tasks", "mme", "--out", str(out), "--dry-run"]) == 0  # no lmms-eval needed
    assert len(ran) == 1


# -- help text -------------------------------------------------------------------------------------------------------


def _options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, (argparse._HelpAction,
                                                                                 argparse._VersionAction))]


def test_every_option_has_help_and_shows_its_default():
    parser, commands = build_parser()
    assert set(commands) == {"demo", "compare", "bench", "eval", "calibrate", "methods"}
    for name, command in commands.items():
        text = command.format_help()
        for action in _options(command):
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.nargs != 0 and not action.required:  # flags are off unless given
                assert "default" in command.formatter_class(name)._get_help_string(action), (name, action.dest)
        assert "(default: None)" not in text
    # the method names come from the registry, not from help strings
    help_text = commands["eval"].format_help() + commands["bench"].format_help()
    assert "sparsevlm" not in help_text and "`lightkv methods`" in help_text.replace("\n", " ").replace("  ", " ")


def test_bench_defaults_are_bench_configs():
    from lightkv.perf.bench import BenchConfig, config_from_args

    parser, _ = build_parser()
    assert config_from_args(parser.parse_args(["bench"])) == BenchConfig()


def test_demo_and_compare_write_to_out_by_default():
    parser, _ = build_parser()
    assert cli._default_out(parser.parse_args(["demo"])) == "out/demo"
    assert cli._default_out(parser.parse_args(["demo", "--random"])) == "out/demo-random"
    assert cli._default_out(parser.parse_args(["compare"])) == "out/compare"
    assert cli._default_out(parser.parse_args(["bench"])) == "out/bench"
    assert cli._default_out(parser.parse_args(["demo", "--out", "x"])) == "x"


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[0] for row in rows[1:-1]] == ["none", *method_names()]
    assert any(row.split()[:2] == ["fastv", "yes"] and "layer, ratio" in row for row in rows)


# -- one grammar through every entry point --------------------------------------------------------------------------

FORMS = {
    "none": MethodSpec("none"),
    "lightkv@0.55": MethodSpec("lightkv", 0.55),
    "fastv@0.35": MethodSpec("fastv", 0.35),
    "fastv:budget=0.35": MethodSpec("fastv", 0.35),
    "fastv:layer=3,ratio=0.75": MethodSpec("fastv", None, {"layer": 3, "ratio": 0.75}),
    "fastv:layer=3:ratio=0.75": MethodSpec("fastv", None, {"layer": 3, "ratio": 0.75}),
    "lightkv:layers=12;18;24": MethodSpec("lightkv", None, {"layers": [12, 18, 24]}),
    "lightkv@0.35:guidance=uniform": MethodSpec("lightkv", 0.35, {"guidance": "uniform"}),
}


def _lmms_eval_model_args(text):
    """What lmms-eval makes of --model_args (lmms_eval.utils.simple_parse_args_string)."""
    def value(v):
        if v.lower() in ("true", "false"):
            return v.lower() == "true"
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    return {key: value(v) for key, v in (item.split("=") for item in text.split(",") if item)}


@pytest.fixture
def captured(monkeypatch):
    seen = {}
    monkeypatch.setattr("lightkv.evaluation.compare.run_compare", lambda methods, *a, **k: seen.update(compare=methods))
    monkeypatch.setattr("lightkv.evaluation.lmms_run.run_eval", lambda model, methods, *a, **k: seen.update(eval=methods))

    def bench(args):
        from lightkv.perf.bench import config_from_args

        seen["bench"] = config_from_args(args).methods
        return 0

    monkeypatch.setattr("lightkv.perf.bench.main", bench)
    return seen


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_parses_the_same_through_every_entry_point(form, captured, tmp_path):
    expected = FORMS[form]
    assert parse_method_spec(form) == expected
    # the three commands, each with a list: the form between two other methods
    listed = f"none,{form},dart@0.5"
    assert main(["compare", "--methods", listed, "--out", str(tmp_path / "c")]) == 0
    assert main(["eval", "--model", "m", "--tasks", "mme", "--methods", listed, "--out", str(tmp_path / "e"),
                 "--dry-run"]) == 0
    assert main(["bench", "--model", "tiny", "--methods", listed, "--out", str(tmp_path / "b")]) == 0
    for command in ("compare", "eval", "bench"):
        assert [parse_method_spec(m) for m in captured[command]] == [MethodSpec("none"), expected,
                                                                      MethodSpec("dart", 0.5)], command
    # lmms-eval: lightkv eval's command line, split as lmms-eval splits it, back into the plugin's arguments
    command = build_command(EvalRun(model="m", label=form, tasks=["mme"], out=tmp_path), python="py")
    args = _lmms_eval_model_args(command[command.index("--model_args") + 1])
    args.pop("pretrained"), args.pop("stats_path")
    assert spec_from_model_args(args.pop("method"), args.pop("budget", None), args) == expected
    # or the plugin's method= given the whole spec (a Python caller, or a spec without ',' and '=')
    assert spec_from_model_args(form) == expected
    assert not tmp_path.joinpath("c").exists() and not tmp_path.joinpath("b").exists()


def test_compare_runs_every_method_without_a_budget_at_each_budget():
    from lightkv.evaluation.compare import compare_runs

    runs = compare_runs(["none", "fastv", "lightkv@0.3", "lightkv:guidance=uniform"], [0.55, 0.35])
    assert [label for label, _ in runs] == ["fastv@0.55", "fastv@0.35", "lightkv@0.30",
                                            "lightkv@0.55:guidance=uniform", "lightkv@0.35:guidance=uniform"]
    assert runs[-1][1] == MethodSpec("lightkv", 0.35, {"guidance": "uniform"})


def test_plugin_arguments_given_twice_are_errors():
    with pytest.raises(ValueError, match="budget given twice"):
        spec_from_model_args("fastv", 0.3, {"budget": 0.4})
    with pytest.raises(ValueError, match="both in method="):
        spec_from_model_args("fastv@0.3", 0.4)
    with pytest.raises(ValueError, match="no budget or fields"):
        spec_from_model_args("none", 0.4)
    assert spec_from_model_args("fastv", "0.35", {"layer": "3"}) == MethodSpec("fastv", 0.35, {"layer": 3})
