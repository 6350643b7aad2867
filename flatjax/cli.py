"""The ``flatjax`` command line: train, eval, flatness, results, demo.

A thin layer over the library, in the style of the flax examples' ``main.py``:
configuration is data (``flatjax/configs/*.py``), the command line only
picks a config, overrides fields and names a work directory.

::

    flatjax train --config flatjax/configs/mnist5k.py:esgd --workdir runs/esgd \\
        [--set num_epochs=3 --set esgd.inner_steps=10 ...]
    flatjax eval --workdir runs/esgd
    flatjax flatness --workdir runs/esgd [--sigmas 0 0.01 0.05] [--num-draws 32]
    flatjax results runs/sgd runs/esgd [--out results/]
    flatjax demo [--workdir runs/demo] [--quick]

``--config PATH[:ARG]`` follows ``ml_collections.config_flags``: the file's
``get_config(ARG)`` builds the config. ``--set key=value`` overrides a field
by its dotted name; the value is parsed to the type of the field it replaces.

Errors a user can fix (an unknown config key, a bad value, a missing file or
dataset, an unwritable work directory, a checkpoint that does not match the
model) print ONE line to stderr and exit with status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import errno
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "load_config", "apply_overrides", "parse_value", "CLIError"]

EXIT_USAGE = 2
# The demo's config, relative to the repository root.
DEMO_ALGORITHMS = ("sgd", "esgd", "rsgd")


class CLIError(Exception):
    """A mistake in the command line or its inputs; printed as one line, exit status 2."""


# --------------------------------------------------------------------------
# Configs: loading and overriding.


def _import_config_module(path: Path):
    """Imports a config file; inside a package (``flatjax/configs``) by its dotted name.

    Importing by dotted name lets config files share a base with ordinary
    imports (``from flatjax.configs import common``), as they do under
    ``ml_collections.config_flags`` when run from the repository root.
    """
    path = path.resolve()
    parts = [path.stem]
    root = path.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if len(parts) > 1:
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        return importlib.import_module(".".join(parts))
    spec = importlib.util.spec_from_file_location(f"_flatjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> dict[str, str]:
    """The config files that ship with flatjax: ``{name: first line of its docstring}``."""
    import ast

    out = {}
    for path in sorted(PACKAGED_CONFIGS.glob("*.py")):
        if path.stem.startswith("_") or path.stem == "common":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        out[path.name] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def _resolve_config_path(path_text: str) -> Path:
    """A config file: the path as given, else the packaged config of that name.

    ``mnist5k``, ``mnist5k.py`` and ``flatjax/configs/mnist5k.py`` all name
    the packaged ``flatjax/configs/mnist5k.py`` from any working directory.
    """
    path = Path(path_text)
    if path.is_file():
        return path
    name = path.name if path.suffix else f"{path.name}.py"
    packaged = PACKAGED_CONFIGS / name
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(
        f"config file not found: {path_text!r} (neither a file nor one of the packaged "
        f"configs {', '.join(packaged_configs())}; `flatjax train --help` lists them)"
    )


def _config_tokens(name: str) -> str:
    """The tokens ``get_config`` of a packaged config accepts, from its own error message."""
    try:
        module = _import_config_module(PACKAGED_CONFIGS / name)
        module.get_config("\x00")
    except ValueError as error:
        text = str(error)
        if "expected comma-separated tokens from (" in text:
            return text.split("tokens from (", 1)[1].rsplit(")", 1)[0] + "; quick"
    except Exception:  # noqa: BLE001 - help must print even if a config is broken
        return "?"
    return "quick"


def configs_help() -> str:
    """The help text listing the packaged configs, their purpose and their tokens."""
    lines = ["packaged configs (--config NAME.py:TOKEN,TOKEN,... from any folder):"]
    for name, doc in packaged_configs().items():
        lines.append(f"  {name:12s} {doc}")
        lines.append(f"  {'':12s} tokens: {_config_tokens(name)}")
    lines.append("override any field with --config.KEY=VALUE (or --set KEY=VALUE), e.g. "
                 "--config.num_epochs=1 --config.esgd.inner_steps=10")
    return "\n".join(lines)


def _config_flag_overrides(argv: list[str]) -> list[str]:
    """``ml_collections.config_flags`` overrides (``--config.key=value``) as ``--set key=value``.

    Example:
      >>> _config_flag_overrides(["train", "--config.num_epochs=1", "--config.esgd.noise", "0"])
      ['train', '--set', 'num_epochs=1', '--set', 'esgd.noise=0']
    """
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config.") and len(arg) > len("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{arg}: expected {arg}=VALUE or {arg} VALUE")
                value, i = argv[i + 1], i + 1
            out += ["--set", f"{key}={value}"]
        else:
            out.append(arg)
        i += 1
    return out


def load_config(spec: str):
    """Builds the config named by ``PATH[:ARG]``: ``get_config(ARG)`` of the Python file PATH.

    Args:
      spec: a path to a config file, optionally followed by ``:`` and the
        argument its ``get_config`` takes (e.g. ``cifar.py:cifar10,resnet18,esgd``).

    Returns:
      The ``ml_collections.ConfigDict``, locked (new keys raise, values can change).

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file has no ``get_config`` or it returned no ConfigDict.

    Example:
      >>> config = load_config("flatjax/configs/mnist5k.py:rsgd")  # doctest: +SKIP
      >>> config.algorithm  # doctest: +SKIP
      'replicated_sgd'
    """
    import ml_collections

    path_text, sep, arg = spec.partition(":")
    path = _resolve_config_path(path_text)
    if path.suffix != ".py":
        raise ValueError(
            f"{path_text!r} is not a config file: expected a Python file defining "
            "get_config(), e.g. flatjax/configs/mnist5k.py:esgd"
        )
    try:
        module = _import_config_module(path)
    except (SyntaxError, ImportError) as error:
        raise ValueError(f"config file {path_text!r} cannot be imported: {error}") from error
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"config file {path_text!r} defines no get_config() function")
    try:
        config = get_config(arg) if sep else get_config()
    except AttributeError as error:  # a typo'd key in the config file (the base is locked)
        raise ValueError(f"{path_text}: {error}") from error
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(
            f"{path_text}: get_config() must return an ml_collections.ConfigDict, "
            f"got {type(config).__name__}"
        )
    config.lock()
    return config


def _flat_keys(config, prefix: str = "") -> list[str]:
    import ml_collections

    keys = []
    for key, value in config.items():
        name = prefix + key
        keys.append(name)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_flat_keys(value, name + "."))
    return keys


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_value(text: str, current, key: str = "value"):
    """Parses the command-line ``text`` to the type of the field's ``current`` value.

    bool: ``true/false/yes/no/on/off/1/0``; int and float: Python literals
    (an int field rejects ``0.5``, a float field accepts ``1``); str: the text
    as given; list/tuple: ``[a, b]`` or ``a,b``, elements typed like the
    current first element; dict: a Python literal. ``none``/``null`` sets
    None. A field whose value is None takes any Python literal, else the text.

    Example:
      >>> parse_value("3", 10.0), parse_value("no", True), parse_value("0.01,0.1", [0.0])
      (3.0, False, [0.01, 0.1])
    """
    import ml_collections

    if text.strip().lower() in ("none", "null"):
        return None
    expected = None
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        expected = "true or false"
    elif isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            expected = "an integer"
    elif isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            expected = "a number"
    elif isinstance(current, str):
        return text
    elif isinstance(current, (list, tuple)):
        value = _literal(text)
        if not isinstance(value, (list, tuple)):
            value = [item.strip() for item in text.split(",") if item.strip()]
        if current:
            value = [parse_value(str(item), current[0], key) for item in value]
        return type(current)(value)
    elif isinstance(current, (dict, ml_collections.ConfigDict)):
        value = _literal(text)
        if isinstance(value, dict):
            return value
        expected = "a dict literal such as {'width': 8}"
    else:
        return _literal(text)
    raise ValueError(f"--set {key}={text}: expected {expected} (the field is {current!r})")


def apply_overrides(config, overrides: Sequence[str]):
    """Applies ``key=value`` overrides (dotted keys) to ``config`` in place.

    Args:
      config: an ``ml_collections.ConfigDict``.
      overrides: strings ``"a.b=value"``; values parsed by :func:`parse_value`.

    Returns:
      ``config``.

    Raises:
      ValueError: a malformed override, an unknown key (the message lists
        close matches) or a value of the wrong type.

    Example:
      >>> import ml_collections
      >>> config = ml_collections.ConfigDict({"lr": 0.1, "esgd": {"inner_steps": 5}})
      >>> apply_overrides(config, ["lr=0.05", "esgd.inner_steps=10"]).esgd.inner_steps
      10
      >>> apply_overrides(config, ["esgd.inner_step=3"])
      Traceback (most recent call last):
      ...
      ValueError: unknown config key 'esgd.inner_step'; did you mean: esgd.inner_steps?
    """
    import ml_collections

    keys = _flat_keys(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=4, cutoff=0.6)
            if not close:
                last = key.rsplit(".", 1)[-1]
                close = [k for k in keys if k.rsplit(".", 1)[-1] == last][:4]
            hint = f"did you mean: {', '.join(close)}?" if close else "see the config file for keys"
            raise ValueError(f"unknown config key {key!r}; {hint}")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        current = node[leaf]
        value = parse_value(text, current, key)
        if isinstance(current, ml_collections.ConfigDict):
            value = ml_collections.ConfigDict(value)
        try:
            node[leaf] = value
        except TypeError as error:
            raise ValueError(
                f"--set {key}={text}: cannot store {value!r} in a field of type "
                f"{type(current).__name__}"
            ) from error
    return config


# --------------------------------------------------------------------------
# Helpers shared by the commands.


def _writable_workdir(workdir: str) -> Path:
    """Creates ``workdir`` if needed and checks that files can be written in it."""
    path = Path(workdir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".flatjax_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise CLIError(f"cannot write to workdir {workdir!r}: {reason}") from error
    return path


def _check_names(config) -> None:
    """Fails early, before any work, on an unknown dataset or model name."""
    from flatjax import data, models

    info = data.get_info(config.dataset, config.data_dir)
    models.get_model(config.model, info.num_classes, **dict(config.model_kwargs))


def _existing_workdir(workdir: str) -> Path:
    path = Path(workdir).expanduser()
    if not path.is_dir():
        raise CLIError(f"workdir {workdir!r} does not exist")
    return path


def _print_json(record: dict) -> None:
    print(json.dumps(record, indent=2, sort_keys=True))


# --------------------------------------------------------------------------
# Commands.


def _cmd_train(args) -> int:
    import flatjax
    from flatjax import training

    # Multi-process runs (several hosts, a TPU pod slice): every process runs
    # this same command; a no-op on a single process (docs/distributed.md).
    flatjax.initialize_distributed()
    config = load_config(args.config)
    apply_overrides(config, args.set)
    training.validate_config(config)
    _check_names(config)
    workdir = _writable_workdir(args.workdir)
    final = training.train_and_evaluate(config, str(workdir), restart=args.restart)
    _print_json(final)
    return 0


def _cmd_eval(args) -> int:
    from flatjax import _results

    workdir = _existing_workdir(args.workdir)
    result = _results.evaluate_run(str(workdir), split=args.split, overrides=args.set)
    _print_json(result)
    return 0


def _cmd_flatness(args) -> int:
    from flatjax import _results

    workdir = _existing_workdir(args.workdir)
    record = _results.measure_flatness(
        str(workdir),
        sigmas=args.sigmas,
        num_draws=args.num_draws,
        split=args.split,
        seed=args.seed,
        overrides=args.set,
    )
    print(_results.flatness_table(record))
    print(f"wrote {workdir / _results.FLATNESS_FILE}")
    return 0


def _cmd_results(args) -> int:
    from flatjax import _results

    for run_dir in args.run_dirs:
        _existing_workdir(run_dir)
    out = _writable_workdir(args.out)
    table, figures = _results.write_results(args.run_dirs, str(out))
    print(table)
    for figure in figures:
        print(f"wrote {figure}")
    print(f"wrote {out / _results.TABLE_FILE}")
    return 0


def _demo_config_path() -> Path:
    """The packaged demo config, ``flatjax/configs/mnist5k.py``."""
    return PACKAGED_CONFIGS / "mnist5k.py"


def run_demo(workdir: str, *, quick: bool = False, progress: bool = True) -> str:
    """Trains SGD, Entropy-SGD and Replicated-SGD on mnist5k, measures and compares them.

    Each algorithm trains with ``flatjax/configs/mnist5k.py`` (same
    gradient budget) into ``workdir/<algorithm>``; then the local energy of
    each evaluation network is measured on the training set, and the
    comparison table (``results.md``) and figures are written into
    ``workdir``.

    Args:
      workdir: the output directory.
      quick: the tests' tiny mode (one epoch, two noise draws).
      progress: show progress bars.

    Returns:
      The comparison table (markdown).
    """
    from flatjax import _results, training

    out = _writable_workdir(workdir)
    config_path = _demo_config_path()
    run_dirs = []
    start = time.perf_counter()
    for i, name in enumerate(DEMO_ALGORITHMS, 1):
        config = load_config(f"{config_path}:{name}{',quick' if quick else ''}")
        config.progress = progress
        run_dir = out / name
        step = f"[{i}/{len(DEMO_ALGORITHMS)}]"
        print(f"{step} training {config.algorithm} into {run_dir} ...", flush=True)
        final = training.train_and_evaluate(config, str(run_dir))
        print(
            f"{step} {config.algorithm}: test error {final.get('test_error', math.nan):.2f}% "
            f"after {time.perf_counter() - start:.0f} s; measuring its local energy ...",
            flush=True,
        )
        _results.measure_flatness(str(run_dir))
        run_dirs.append(str(run_dir))
    table, figures = _results.write_results(run_dirs, str(out))
    elapsed = time.perf_counter() - start
    print(table)
    for figure in figures:
        print(f"wrote {figure}")
    print(f"demo finished in {elapsed / 60:.1f} min; results in {out}")
    return table


def _cmd_demo(args) -> int:
    # Quick and full runs get different default folders: a demo rerun in the
    # same folder resumes from its checkpoints instead of training again.
    workdir = args.workdir or os.path.join("runs", "demo-quick" if args.quick else "demo")
    run_demo(workdir, quick=args.quick, progress=not args.no_progress)
    return 0


# --------------------------------------------------------------------------
# Parser and entry point.


_EXAMPLES = """examples:
  flatjax demo                                   offline demo (mnist5k, LeNet-5)
  flatjax train --config flatjax/configs/mnist5k.py:esgd --workdir runs/esgd
  flatjax train --config flatjax/configs/cifar.py:cifar10,resnet18,rsgd \\
      --workdir runs/c10_r18_rsgd --set num_epochs=100
  flatjax eval --workdir runs/esgd
  flatjax flatness --workdir runs/esgd --sigmas 0 0.01 0.05 --num-draws 32
  flatjax results runs/sgd runs/esgd --out results/
"""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line and exit with status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``flatjax`` argument parser (subcommands train, eval, flatness, results, demo)."""
    debug_help = "show the full traceback of an error"
    parser = _Parser(
        prog="flatjax",
        description="Flat-minima training in JAX: Entropy-SGD, Replicated-SGD, flatness.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # Also accepted after the subcommand; SUPPRESS keeps a `--debug` given
    # before the subcommand from being reset by the subparser's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    overrides = argparse.ArgumentParser(add_help=False)
    overrides.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by its dotted name (repeatable), e.g. esgd.inner_steps=10",
    )

    p = sub.add_parser(
        "train", parents=[common, overrides], help="train a config into a work directory",
        epilog=configs_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="PATH[:ARG]",
                   help="config file, or the name of a packaged config (listed below)")
    p.add_argument("--workdir", required=True, help="output directory (created)")
    p.add_argument(
        "--restart", action="store_true",
        help="move an earlier run in the workdir to workdir/old-<time>/ and start over",
    )
    p.set_defaults(func=_cmd_train)

    split_help = "dataset split: train, validation or test"
    p = sub.add_parser(
        "eval",
        parents=[common, overrides],
        help="test error and loss of the latest checkpoint's evaluation network",
    )
    p.add_argument("--workdir", required=True, help="a training run's directory")
    p.add_argument("--split", default="test", help=split_help + " (default test)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "flatness",
        parents=[common, overrides],
        help="local energy of the latest checkpoint's evaluation network",
    )
    p.add_argument("--workdir", required=True, help="a training run's directory")
    p.add_argument(
        "--sigmas", type=float, nargs="+", default=None, help="noise levels σ (default: config)"
    )
    p.add_argument(
        "--num-draws", type=int, default=None, help="noise draws per σ (default: config)"
    )
    p.add_argument("--split", default="train", help=split_help + " (default train)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    p.set_defaults(func=_cmd_flatness)

    p = sub.add_parser(
        "results", parents=[common], help="markdown table and figures from run directories"
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run directories")
    p.add_argument("--out", default="results", help="output directory (default results/)")
    p.set_defaults(func=_cmd_results)

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="offline demo: SGD vs Entropy-SGD vs Replicated-SGD on mnist5k (~5 min, 2 idle cores)",
    )
    p.add_argument(
        "--workdir", default=None, help="default runs/demo (runs/demo-quick with --quick)"
    )
    p.add_argument("--quick", action="store_true", help="tiny version, seconds (for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    return parser


def _one_line(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (
        CLIError, ValueError, TypeError, KeyError, OSError, ImportError,
    )  # fmt: skip
    from flatjax.training import CorruptCheckpointError, NonFiniteError
    from flatjax.training.loop import RunHistoryError, WorkdirBusyError

    return errors + (CorruptCheckpointError, NonFiniteError, RunHistoryError, WorkdirBusyError)


EXIT_INTERRUPTED = 130


def _disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a full disk (ENOSPC)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(
            error
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``flatjax`` command; returns the exit status (0, or 2 on a user error).

    Args:
      argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
      0 on success, 2 on an error, whose message is one line on stderr, 130 on Ctrl-C.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _config_flag_overrides(argv)
    except ValueError as error:
        parser.error(str(error))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt as error:
        if args.debug:
            raise
        print(f"flatjax {args.command}: {_one_line(error) if str(error) else 'interrupted'}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if args.debug:
            raise
        if _disk_full(error):
            where = getattr(error, "filename", None)
            print(f"flatjax {args.command}: error: no space left on device"
                  f"{f' writing {where}' if where else ''}; free some space and rerun the "
                  "same command to resume", file=sys.stderr)
            return EXIT_USAGE
        if not isinstance(error, _user_errors()):
            raise
        print(f"flatjax {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
