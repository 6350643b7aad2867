"""Small networks on MNIST and Fashion-MNIST with SGD, eSGD and rSGD.

What it reproduces. The small-network experiments of Pittorino et al.
(ICLR 2021, arXiv 2006.07897, §6, which also runs Fashion-MNIST/MNIST
with small networks): at the same number of gradient evaluations,
Entropy-SGD (L = 5) and Replicated-SGD (y = 3, centre evaluated) find
flatter minima (lower local energy) with lower or equal test error than
SGD. Full 60k-image datasets, so they need tfds's ``mnist`` /
``fashion_mnist`` prepared once on a connected machine; a CPU trains them in
tens of minutes, a GPU in a few.

Setup: batch 128, Nesterov 0.9, lr 0.05 with a cosine schedule, weight decay
5e-4, no augmentation, 50 SGD-epochs of gradient evaluations for every
algorithm (``budget='gradients'``); eSGD uses outer lr 1 with γ from 0.1
to 1 (``common.set_algorithm``). The MLP is ``flatjax.models``' default
multi-layer perceptron on flattened images.

``get_config(arg)``: ``arg`` is ``DATASET,MODEL,ALGORITHM[,quick]`` with
DATASET in {mnist, fashion_mnist}, MODEL in {lenet5, mlp}, ALGORITHM in
{sgd, esgd, rsgd}; the default is ``fashion_mnist,lenet5,sgd``. Commands, e.g.::

    flatjax train --config flatjax/configs/small.py:fashion_mnist,lenet5,rsgd \\
        --workdir runs/fashion_mnist/lenet5/rsgd
    flatjax train --config flatjax/configs/small.py:mnist,mlp,esgd \\
        --workdir runs/mnist/mlp/esgd
"""

from flatjax.configs import common

DATASETS = ("mnist", "fashion_mnist")
MODELS = ("lenet5", "mlp")
ALGORITHMS = tuple(common.ALGORITHMS)


def get_config(arg: str = ""):
    """One small-network run; see the module docstring."""
    args = common.parse_arg(
        arg,
        {"dataset": DATASETS, "model": MODELS, "algorithm": ALGORITHMS},
        {"dataset": "fashion_mnist", "model": "lenet5", "algorithm": "sgd"},
    )
    config = common.experiment_base()
    config.dataset = args["dataset"]
    config.model = args["model"]
    config.learning_rate = 0.05
    config.lr_schedule = "cosine"
    config.num_epochs = 50.0
    config.checkpoint_every_epochs = 5.0
    common.set_algorithm(config, args["algorithm"], inner_steps=5, num_replicas=3)
    if args["quick"]:
        config.model = {"lenet5": "lenet5", "mlp": "mlp_tiny"}[args["model"]]
        common.make_quick(config, num_epochs=0.05)
    return config
