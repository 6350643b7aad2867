"""The data and loss shared by the small digits experiments (esgd_vs_sgd, rsgd_vs_sgd)."""

import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def load_data(split_seed: int = 0):
    """scikit-learn's 8x8 digits scaled to [0, 1], split 70/30 stratified by ``split_seed``."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.3, random_state=split_seed, stratify=y)


def loss_fn(model, params, x, y):
    """Mean softmax cross-entropy of ``model`` with ``params`` on (x, y)."""
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
