"""The ``flatjax`` command line: parsing, overrides, one-line errors, end-to-end runs."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from flatjax import cli

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "experiments" / "configs" / "mnist5k.py")
QUICK = DEMO + ":sgd,quick"


def _config():
    return ml_collections.ConfigDict(
        {
            "lr": 0.1,
            "steps": 5,
            "name": "sgd",
            "flag": True,
            "maybe": None,
            "sigmas": [0.0, 0.1],
            "kw": {},
            "esgd": {"inner_steps": 5, "coupling": ml_collections.FieldReference(None, float)},
        }
    )


# --------------------------------------------------------------------------
# Parsing and overrides.


@pytest.mark.parametrize(
    ("text", "current", "expected"),
    [
        ("0.05", 0.1, 0.05),
        ("1", 0.1, 1.0),
        ("1e-3", 0.1, 1e-3),
        ("7", 5, 7),
        ("entropy_sgd", "sgd", "entropy_sgd"),
        ("false", True, False),
        ("Yes", False, True),
        ("0", True, False),
        ("[0, 0.5]", [0.0], [0.0, 0.5]),
        ("0.01,0.2", [0.0], [0.01, 0.2]),
        ("(1, 2)", (0,), (1, 2)),
        ("{'width': 8}", {}, {"width": 8}),
        ("none", 0.1, None),
        ("0.5", None, 0.5),
        ("abc", None, "abc"),
    ],
)
def test_parse_value_types_by_the_field(text, current, expected):
    value = cli.parse_value(text, current)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "current", "match"),
    [
        ("0.5", 5, "expected an integer"),
        ("fast", 0.1, "expected a number"),
        ("maybe", True, "expected true or false"),
        ("[1", [0.0], "expected a number"),
        ("3", {}, "expected a dict literal"),
    ],
)
def test_parse_value_rejects_wrong_type(text, current, match):
    with pytest.raises(ValueError, match=match):
        cli.parse_value(text, current, "key")


def test_apply_overrides_dotted_and_typed():
    config = cli.apply_overrides(
        _config(),
        ["lr=1", "steps=3", "flag=off", "esgd.coupling=0.5", "sigmas=0,0.05", "kw={'a': 1}"],
    )
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert (config.steps, config.flag, config.esgd.coupling) == (3, False, 0.5)
    assert config.sigmas == [0.0, 0.05] and config.kw.a == 1


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            "esgd.inner_step=3",
            r"unknown config key 'esgd.inner_step'; did you mean: esgd.inner_steps",
        ),
        ("inner_steps=3", r"did you mean: esgd.inner_steps"),
        ("zzz=1", r"unknown config key 'zzz'; see the config file"),
        ("lr", r"--set expects key=value"),
        ("=3", r"--set expects key=value"),
        ("steps=two", r"--set steps=two: expected an integer"),
    ],
)
def test_apply_overrides_errors(override, match):
    with pytest.raises(ValueError, match=match):
        cli.apply_overrides(_config(), [override])


def test_load_config_with_and_without_argument():
    assert cli.load_config(DEMO).algorithm == "sgd"
    config = cli.load_config(DEMO + ":rsgd")
    assert config.algorithm == "replicated_sgd" and config.is_locked


def test_load_config_standalone_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "from flatjax.training import base_config\n"
        "def get_config(arg='5'):\n"
        "    c = base_config()\n"
        "    c.num_epochs = float(arg)\n"
        "    return c\n"
    )
    assert cli.load_config(f"{path}:2").num_epochs == 2.0
    assert cli.load_config(str(path)).num_epochs == 5.0


@pytest.mark.parametrize(
    ("source", "match"),
    [("x = 1\n", "defines no get_config"), ("def get_config():\n    return {}\n", "ConfigDict")],
)
def test_load_config_bad_file(tmp_path, source, match):
    path = tmp_path / "bad.py"
    path.write_text(source)
    with pytest.raises(ValueError, match=match):
        cli.load_config(str(path))


def test_parser_subcommands_and_defaults():
    parser = cli.build_parser()
    args = parser.parse_args(
        ["train", "--config", "c.py:x", "--workdir", "w", "--set", "a=1", "--set", "b.c=2"]
    )
    assert (args.command, args.config, args.workdir, args.set) == (
        "train",
        "c.py:x",
        "w",
        ["a=1", "b.c=2"],
    )
    args = parser.parse_args(
        ["flatness", "--workdir", "w", "--sigmas", "0", "0.1", "--num-draws", "4"]
    )
    assert (args.sigmas, args.num_draws, args.split) == ([0.0, 0.1], 4, "train")
    args = parser.parse_args(["demo", "--debug"])
    assert (args.workdir, args.quick, args.debug) == (None, False, True)
    for argv in (["--debug", "eval", "--workdir", "w"], ["eval", "--workdir", "w", "--debug"]):
        assert parser.parse_args(argv).debug
    assert not parser.parse_args(["eval", "--workdir", "w"]).debug
    args = parser.parse_args(["results", "r1", "r2", "--out", "o"])
    assert (args.run_dirs, args.out) == (["r1", "r2"], "o")


# --------------------------------------------------------------------------
# Errors: one line on stderr, exit status 2.


def _error_cases(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    empty = tmp_path / "empty"
    empty.mkdir()
    train = ["train", "--config", QUICK, "--workdir", str(tmp_path / "run")]
    return {
        "unknown key": (train + ["--set", "learning_rte=0.1"], "did you mean: learning_rate"),
        "bad value type": (train + ["--set", "batch_size=big"], "expected an integer"),
        "invalid value": (train + ["--set", "budget=lots"], "config.budget must be one of"),
        "missing config file": (
            ["train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "r")],
            "config file not found",
        ),
        "unwritable workdir": (
            ["train", "--config", QUICK, "--workdir", str(blocker / "run")],
            "cannot be created or written to",
        ),
        "missing dataset name": (train + ["--set", "dataset=mnist6k"], "Unknown dataset 'mnist6k'"),
        "unknown model": (train + ["--set", "model=lenet7"], "unknown model 'lenet7'"),
        "eval on empty workdir": (["eval", "--workdir", str(empty)], "no checkpoint"),
        "eval on missing workdir": (["eval", "--workdir", str(tmp_path / "x")], "does not exist"),
        "flatness on empty workdir": (["flatness", "--workdir", str(empty)], "no checkpoint"),
        "results on missing run": (["results", str(tmp_path / "x")], "does not exist"),
        "missing argument": (["train", "--config", QUICK], "required: --workdir"),
        "unknown command": (["fly"], "invalid choice: 'fly'"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown key",
        "bad value type",
        "invalid value",
        "missing config file",
        "unwritable workdir",
        "missing dataset name",
        "unknown model",
        "eval on empty workdir",
        "eval on missing workdir",
        "flatness on empty workdir",
        "results on missing run",
        "missing argument",
        "unknown command",
    ],
)
def test_error_is_one_line_and_exit_2(case, tmp_path, capsys):
    argv, message = _error_cases(tmp_path)[case]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


# --------------------------------------------------------------------------
# End to end, in-process: the quick demo, then train/eval/flatness/results on its runs.


def _run(argv):
    """cli.main(argv) with stdout captured; returns (exit status, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    code, out = _run(["demo", "--quick", "--no-progress", "--workdir", str(workdir)])
    assert code == 0
    return workdir, out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo's Replicated-SGD run trained again through `flatjax train`."""
    workdir = tmp_path_factory.mktemp("train") / "rsgd"
    code, out = _run(
        ["train", "--config", DEMO + ":rsgd,quick", "--workdir", str(workdir),
         "--set", "progress=false"]
    )  # fmt: skip
    assert code == 0
    return workdir, json.loads(out)


@pytest.mark.slow
def test_demo_quick_prints_the_comparison_table(demo):
    workdir, out = demo
    assert "| run | algorithm | grad evals |" in out and "δE σ=0.05" in out
    for name, algorithm in [("sgd", "sgd"), ("esgd", "entropy_sgd"), ("rsgd", "replicated_sgd")]:
        assert f"| {name} | {algorithm} |" in out
        assert (workdir / name / "flatness.json").is_file()
        assert (workdir / name / "final.json").is_file()
    for name in ("results.md", "curves.png", "local_energy.png"):
        assert (workdir / name).stat().st_size > 0
    # Same gradient budget: one SGD-epoch of gradients each, to within one step.
    grads = [
        json.loads((workdir / n / "final.json").read_text())["grad_evals"]
        for n in ("sgd", "esgd", "rsgd")
    ]
    assert max(grads) - min(grads) <= 5


def _metrics(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("wall_time")
    return rows


@pytest.mark.slow
def test_same_seed_same_metrics(demo, trained):
    """Issue 11: the quick rSGD config trained twice gives identical metrics."""
    assert _metrics(trained[0]) == _metrics(demo[0] / "rsgd")


@pytest.mark.slow
def test_train_prints_final_metrics(trained):
    workdir, final = trained
    assert final == json.loads((workdir / "final.json").read_text())
    assert final["algorithm"] == "replicated_sgd"


@pytest.mark.slow
def test_eval_restores_the_evaluated_network(trained):
    workdir, final = trained
    code, out = _run(["eval", "--workdir", str(workdir)])
    result = json.loads(out)
    assert code == 0 and result["step"] == final["step"]
    # The centre the loop evaluated at its last step is the network restored.
    assert result["error"] == pytest.approx(final["test_error"], abs=1e-6)
    assert result["loss"] == pytest.approx(final["test_loss"], rel=1e-5)


@pytest.mark.slow
def test_eval_of_a_run_older_than_a_config_field(demo, tmp_path):
    # A run whose config.json predates a field (here esgd.noise_generator)
    # evaluates with the field's default, to the same result.
    workdir, _ = demo
    old = tmp_path / "esgd"
    shutil.copytree(workdir / "esgd", old)
    saved = json.loads((old / "config.json").read_text())
    del saved["esgd"]["noise_generator"]
    (old / "config.json").write_text(json.dumps(saved))
    code_new, out_new = _run(["eval", "--workdir", str(workdir / "esgd")])
    code_old, out_old = _run(["eval", "--workdir", str(old)])
    assert code_new == code_old == 0
    new, older = json.loads(out_new), json.loads(out_old)
    keys = ("error", "loss", "step")
    assert [older[k] for k in keys] == [new[k] for k in keys]


@pytest.mark.slow
def test_flatness_cli_writes_json(trained):
    workdir, _ = trained
    code, out = _run(
        ["flatness", "--workdir", str(workdir), "--sigmas", "0", "0.1", "--num-draws", "3"]
    )
    record = json.loads((workdir / "flatness.json").read_text())
    assert code == 0 and "| 0.1 |" in out
    assert record["sigmas"] == pytest.approx([0.0, 0.1]) and record["num_draws"] == 3
    # σ = 0 perturbs nothing; the base energy is the training error of the centre.
    assert record["mean"][0] == 0.0 and record["stderr"][0] == 0.0
    _, train = _run(["eval", "--workdir", str(workdir), "--split", "train"])
    assert record["base"] == pytest.approx(json.loads(train)["error"], abs=1e-4)


@pytest.mark.slow
def test_results_cli_table_and_figures(demo, tmp_path):
    workdir, _ = demo
    out_dir = tmp_path / "out"
    runs = [workdir / name for name in ("sgd", "esgd", "rsgd")]
    code, out = _run(["results", *map(str, runs), "--out", str(out_dir)])
    assert code == 0
    table = (out_dir / "results.md").read_text()
    assert "| sgd | sgd |" in table and "| esgd | entropy_sgd |" in table
    header = next(line for line in table.splitlines() if line.startswith("| run"))
    assert "train error (%)" in header and "test error, ensemble (%)" in header
    # The rSGD row's replica and ensemble cells are the final.json values.
    final = json.loads((workdir / "rsgd" / "final.json").read_text())
    replicas = sum(final["test_replica_error"]) / len(final["test_replica_error"])
    rsgd_row = next(line for line in table.splitlines() if line.startswith("| rsgd"))
    assert f"| {replicas:.2f} | {final['test_ensemble_error']:.2f} |" in rsgd_row
    sgd_row = next(line for line in table.splitlines() if line.startswith("| sgd"))
    assert sgd_row.split(" | ").count("–") >= 2  # SGD has no replicas
    for figure in ("curves.png", "local_energy.png", "error_vs_local_energy.png"):
        assert (out_dir / figure).is_file(), figure


@pytest.mark.slow
def test_checkpoint_of_another_model_is_one_line_exit_2(demo, capsys):
    workdir, _ = demo
    code = cli.main(["eval", "--workdir", str(workdir / "sgd"), "--set", "model=mlp"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not match" in err, err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        cli.main(
            ["train", "--debug", "--config", str(tmp_path / "x.py"), "--workdir", str(tmp_path)]
        )


def test_python_m_flatjax_help():
    result = subprocess.run(
        [sys.executable, "-m", "flatjax", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0
    for command in ("train", "eval", "flatness", "results", "demo"):
        assert command in result.stdout


def test_packaged_configs_and_config_flag_overrides_work_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A packaged config by name, with ml_collections.config_flags-style overrides.
    argv = cli.config_flag_overrides(["train", "--config", "mnist5k:rsgd,quick",
                                       "--config.num_epochs=2", "--config.rsgd.num_replicas", "4"])
    assert argv[-4:] == ["--set", "num_epochs=2", "--set", "rsgd.num_replicas=4"]
    config = cli.load_config("mnist5k.py:rsgd,quick")
    assert config.algorithm == "replicated_sgd" and config.dataset == "mnist5k"
    assert cli.load_config("flatjax/configs/small.py:quick").dataset in ("mnist", "fashion_mnist")
    with pytest.raises(FileNotFoundError, match="packaged configs cifar.py, mnist5k.py, small.py"):
        cli.load_config("nonexistent.py")
    help_text = cli.configs_help()
    assert "mnist5k.py" in help_text and "algorithm: sgd, esgd, rsgd; quick" in help_text
