"""Command line of the study: ``python -m experiments.study [--quick] [--datasets …]``."""

from __future__ import annotations

import argparse
import os

from experiments.study.report import write_report
from experiments.study.runner import _log, run_study
from experiments.study.settings import DEFAULT_TESTBEDS, TESTBEDS

__all__ = ["DEFAULT_OUT", "RESULTS_MD", "main"]

DEFAULT_OUT = os.path.join("experiments", "results", "study")
RESULTS_MD = os.path.join("experiments", "RESULTS.md")


def main(argv=None) -> int:
    """Runs the study (or only rebuilds its report) and writes the outputs; returns 0."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.study",
        description="SGD vs Entropy-SGD vs Replicated-SGD at CPU scale, with error bars.")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help=f"testbeds to run (default {' '.join(DEFAULT_TESTBEDS)}), of "
                             f"{sorted(TESTBEDS)}; the others' records in OUT are kept")
    parser.add_argument("--results-md", default=None,
                        help=f"also write the report here (default: {RESULTS_MD} for a full "
                             "run at the default --out)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild tables, figures and report from OUT/runs.json")
    args = parser.parse_args(argv)
    out = args.out or DEFAULT_OUT
    results_md = args.results_md
    if results_md is None and not args.quick and args.out is None:
        results_md = RESULTS_MD
    if not args.report_only:
        command = "python -m experiments.study" + (" --quick" if args.quick else "") + (
            f" --out {args.out}" if args.out else "") + (
            f" --datasets {' '.join(args.datasets)}" if args.datasets else "")
        run_study(out, quick=args.quick, datasets=args.datasets, command=command)
    write_report(out, results_md)
    _log(f"wrote {out}" + (f" and {results_md}" if results_md else ""))
    return 0
