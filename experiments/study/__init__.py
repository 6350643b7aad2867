"""The paper's claims at CPU scale: SGD vs Entropy-SGD vs Replicated-SGD, with error bars.

What it tests, at small scale (Pittorino et al., ICLR 2021, arXiv
2006.07897, §4-6): (1) at the same number of gradient evaluations and at the
same number of epochs, Entropy-SGD (eSGD, L = 5) and Replicated-SGD (rSGD,
y = 3, centre evaluated) reach test errors lower than or equal to SGD's;
(2) the networks they find are flatter: lower local energy
δE(w, σ) = E_z[E_train(w ⊙ (1 + σz))] − E_train(w) (training error in %,
multiplicative noise); (3) over many trained networks, test error and local
energy are correlated (Kendall's τ).

Modules:

* :mod:`~experiments.study.settings`: the testbeds (dataset × network,
  epochs, seeds, learning-rate grid; :data:`TESTBEDS`), the measurement grid
  (:func:`study_settings`) and each run's config (:func:`make_config`).
  ``digits`` and ``mnist1d`` train the 300-100 MLP, which interpolates its
  training set; ``mnist1d_cnn`` trains the 5,210-parameter 1-D CNN of the
  MNIST-1D paper (Greydanus 2020) on 10,000 generated signals, a network
  that does not; ``mnist5k`` (LeNet-5) is available with ``--datasets``.
* :mod:`~experiments.study.runner`: per testbed, the tuning grid (every
  algorithm, every learning rate, every seed, at equal gradients), the
  selection on the validation split, the equal-epoch runs and the
  measurements (errors, local energy, local entropy where set), saved in
  ``runs.json`` / ``meta.json``.
* :mod:`~experiments.study.report`: table cells (mean ± std over seeds),
  paired differences to SGD by seed (mean ± standard error, paired t-test and
  Wilcoxon signed-rank p), Kendall's τ, figures and the Markdown report.

Outputs in ``--out`` (default ``experiments/results/study``): ``runs.json``
(every network), ``meta.json``, ``local_energy_curves.json``,
``summary.json``, ``results_table.csv``, PNG figures, and ``RESULTS.md``; at
the default ``--out`` a non-quick run also rewrites ``experiments/RESULTS.md``,
keeping the hand-written block between the ``HAND-WRITTEN`` markers.
Commands::

    .venv/bin/python -m experiments.study             # every testbed (make results)
    .venv/bin/python -m experiments.study --datasets mnist1d_cnn   # one testbed
    .venv/bin/python -m experiments.study --quick --out /tmp/study   # smoke run
    .venv/bin/python -m experiments.study --report-only  # tables/figures from the JSON
"""

from experiments.study.cli import DEFAULT_OUT, RESULTS_MD, main
from experiments.study.report import (
    BEGIN_HAND,
    END_HAND,
    main_rows,
    paired_difference,
    summarize,
    write_report,
)
from experiments.study.runner import load_runs, run_dataset, run_study, train_seeds
from experiments.study.settings import (
    ALGORITHMS,
    BUDGETS,
    DEFAULT_TESTBEDS,
    LABELS,
    TESTBEDS,
    Testbed,
    make_config,
    study_settings,
)

__all__ = [
    "ALGORITHMS",
    "BEGIN_HAND",
    "BUDGETS",
    "DEFAULT_OUT",
    "DEFAULT_TESTBEDS",
    "END_HAND",
    "LABELS",
    "RESULTS_MD",
    "TESTBEDS",
    "Testbed",
    "load_runs",
    "main",
    "main_rows",
    "make_config",
    "paired_difference",
    "run_dataset",
    "run_study",
    "study_settings",
    "summarize",
    "train_seeds",
    "write_report",
]
