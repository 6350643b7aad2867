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
import errno
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from flatjax.configs._loading import (
    PACKAGED_CONFIGS,
    apply_overrides,
    config_flag_overrides,
    configs_help,
    load_config,
    parse_value,
)

__all__ = ["main", "load_config", "apply_overrides", "parse_value", "CLIError"]

EXIT_USAGE = 2
# The demo's config, relative to the repository root.
DEMO_ALGORITHMS = ("sgd", "esgd", "rsgd")


class CLIError(Exception):
    """A mistake in the command line or its inputs; printed as one line, exit status 2."""


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
    # train_and_evaluate validates the config (once) before it touches the workdir.
    workdir = Path(args.workdir).expanduser()
    final = training.train_and_evaluate(config, str(workdir), restart=args.restart)
    _print_json(final)
    return 0


def _cmd_eval(args) -> int:
    from flatjax import _restore

    workdir = _existing_workdir(args.workdir)
    result = _restore.evaluate_run(str(workdir), split=args.split, overrides=args.set)
    _print_json(result)
    return 0


def _cmd_flatness(args) -> int:
    from flatjax import _restore

    workdir = _existing_workdir(args.workdir)
    record = _restore.measure_flatness(
        str(workdir),
        sigmas=args.sigmas,
        num_draws=args.num_draws,
        split=args.split,
        seed=args.seed,
        overrides=args.set,
    )
    print(_restore.flatness_table(record))
    print(f"wrote {workdir / _restore.FLATNESS_FILE}")
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
    """The Gaussian-mixture result, then SGD, Entropy-SGD and Replicated-SGD on mnist5k.

    First (seconds) the Gaussian-mixture comparison of
    :func:`flatjax.theory.mixture_demo` into ``workdir/gaussian_mixture``:
    the error-counting flat centre against the Bayes plug-in rule and
    validated ridge ERM, paired over training sets. Then each algorithm
    trains with ``flatjax/configs/mnist5k.py`` (same gradient budget) into
    ``workdir/<algorithm>``; the local energy of each evaluation network is
    measured on the training set, and the comparison table (``results.md``)
    and figures are written into ``workdir``.

    Args:
      workdir: the output directory.
      quick: the tests' tiny mode (one epoch, two noise draws; a small mixture).
      progress: show progress bars.

    Returns:
      The comparison table (markdown).
    """
    from flatjax import _restore, _results, theory, training

    out = _writable_workdir(workdir)
    config_path = _demo_config_path()
    run_dirs = []
    start = time.perf_counter()
    print("[0/3] Gaussian mixture: flat centre vs Bayes plug-in vs ridge ERM ...", flush=True)
    mixture = {"n": 60, "alphas": (1,), "seeds": 2} if quick else {}
    mixture_table, _ = theory.mixture_demo(out / "gaussian_mixture", **mixture)
    print(mixture_table, flush=True)
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
        _restore.measure_flatness(str(run_dir))
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
        help="offline demo: the Gaussian-mixture result, then SGD vs Entropy-SGD vs "
        "Replicated-SGD on mnist5k",
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
        argv = config_flag_overrides(argv)
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
