"""``train_and_evaluate(config, workdir)``: the whole run, resumable.

The loop of the flax examples, with the pieces of this package: build the
data stream and the model from the config, create the state, resume from
the latest good checkpoint, run the jitted step, fetch metrics every
``config.log_every_steps`` steps (one host sync), evaluate and checkpoint at
epoch boundaries, and write ``final.json`` and ``curves.png`` at the end.

Data come from a :class:`DataSource`: :func:`dataset_source` wraps
``flatjax.data`` (the catalogue of offline datasets); :func:`array_source`
wraps arrays in memory with the same resumable batching rule.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import numbers
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from flatjax.training.checkpoint import Checkpointer
from flatjax.training.config import plan_steps, validate_config
from flatjax.training.evaluate import evaluate, evaluate_replicas
from flatjax.training.metrics import MetricsWriter, plot_curves
from flatjax.training.state import create_train_state, eval_variables, info_field
from flatjax.training.steps import check_finite, make_train_step

__all__ = [
    "DataSource",
    "array_source",
    "dataset_source",
    "train_and_evaluate",
    "ConfigMismatchError",
    "STRUCTURAL_FIELDS",
]

# Fields that change the shapes or the meaning of the saved state: a resumed
# run must agree on them with the run that wrote the checkpoints.
STRUCTURAL_FIELDS = (
    "dataset",
    "model",
    "model_kwargs",
    "algorithm",
    "batch_size",
    "seed",
    "validation_fraction",
    "esgd.inner_steps",
    "esgd.mode",
    "esgd.batch_norm",
    "rsgd.num_replicas",
)


class ConfigMismatchError(ValueError):
    """The workdir holds a run with a different structural configuration."""


@dataclasses.dataclass(frozen=True)
class DataSource:
    """The data a run needs, independent of where it comes from.

    Attributes:
      info: object or mapping with ``num_classes`` and ``input_shape``.
      data_steps_per_epoch: minibatches per pass over the training set (N/B).
      train_batches: ``train_batches(start_step, num_replicas, stack)`` → an
        endless iterator of ``{'image', 'label'}`` numpy batches with leading
        axes ``[y, L, B]`` (each only when given); step k must be a pure
        function of the seed and k, so a resumed stream is bitwise the same.
      eval_split: name of the evaluation split ('test' or 'val').
      eval_arrays: ``(x, y)`` of the evaluation split.
      stats_batches: ``stats_batches()`` → a few training batches ``[B, ...]``
        for recomputing BatchNorm statistics of the centre.
    """

    info: Any
    data_steps_per_epoch: int
    train_batches: Callable[..., Iterator[dict]]
    eval_split: str
    eval_arrays: tuple
    stats_batches: Callable[[], list]


def array_source(
    train: tuple,
    evaluation: tuple,
    *,
    num_classes: int,
    batch_size: int,
    seed: int = 0,
    eval_split: str = "test",
) -> DataSource:
    """A :class:`DataSource` over arrays in memory.

    Batch j of replica r holds examples π_{r,e}(jB − eN/B·B …) of the
    permutation π_{r,e} = ``default_rng([seed, r, e]).permutation(N)`` of
    epoch e = ⌊j / (N/B)⌋ (the last partial batch of each epoch is dropped),
    so every step is a pure function of ``(seed, step)`` and streams resume
    exactly.

    Args:
      train: ``(x [N, ...], y [N])`` training arrays.
      evaluation: ``(x, y)`` of the evaluation split.
      num_classes: number of classes.
      batch_size: B.
      seed: shuffling seed.
      eval_split: name for the evaluation split in metrics.

    Returns:
      A :class:`DataSource`.

    Example:
      >>> import numpy as np
      >>> from flatjax.training import array_source
      >>> x, y = np.zeros((10, 3), np.float32), np.arange(10) % 2
      >>> data = array_source((x, y), (x, y), num_classes=2, batch_size=4)
      >>> data.data_steps_per_epoch, next(data.train_batches(0, 3, 2))["image"].shape
      (2, (3, 2, 4, 3))
    """
    for name, value in (("batch_size", batch_size), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    for name, (xs, ys) in (("train", train), ("evaluation", evaluation)):
        if len(xs) != len(ys):
            raise ValueError(
                f"{name} inputs and labels must have the same length, got x with {len(xs)} "
                f"rows and y with {len(ys)} labels."
            )
    x, y = np.asarray(train[0], np.float32), np.asarray(train[1], np.int32)
    n = len(y)
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples.")

    def batch(replica, j):
        epoch, pos = divmod(j, per_epoch)
        order = np.random.default_rng([seed, replica, epoch]).permutation(n)
        idx = order[pos * batch_size : (pos + 1) * batch_size]
        return {"image": x[idx], "label": y[idx]}

    def train_batches(start_step=0, num_replicas=None, stack=None):
        step = start_step
        while True:
            replicas = []
            for r in range(num_replicas or 1):
                if stack:
                    parts = [batch(r, step * stack + i) for i in range(stack)]
                    replicas.append({k: np.stack([p[k] for p in parts]) for k in parts[0]})
                else:
                    replicas.append(batch(r, step))
            if num_replicas is None:
                yield replicas[0]
            else:
                yield {k: np.stack([b[k] for b in replicas]) for k in replicas[0]}
            step += 1

    def stats_batches():
        return [batch(0, j) for j in range(min(per_epoch, 10))]

    info = {"num_classes": num_classes, "input_shape": tuple(x.shape[1:]), "num_train": n}
    evaluation = (np.asarray(evaluation[0], np.float32), np.asarray(evaluation[1], np.int32))
    return DataSource(info, per_epoch, train_batches, eval_split, evaluation, stats_batches)


def dataset_source(config: ml_collections.ConfigDict) -> DataSource:
    """A :class:`DataSource` over ``flatjax.data``'s catalogue dataset ``config.dataset``.

    Evaluation uses the ``test`` split, or the ``validation`` hold-out (the
    tail ``config.validation_fraction`` of train) when that is > 0.

    Example:
      >>> from flatjax.training import base_config, dataset_source
      >>> config = base_config()
      >>> config.dataset = "digits"
      >>> dataset_source(config).data_steps_per_epoch  # doctest: +SKIP
      11
    """
    from flatjax import data

    name, data_dir = config.dataset, config.data_dir
    fraction = config.validation_fraction
    info = data.get_info(name, data_dir=data_dir)
    per_epoch = data.steps_per_epoch(
        name, config.batch_size, validation_fraction=fraction, data_dir=data_dir
    )

    def train_batches(start_step=0, num_replicas=None, stack=None):
        return data.train_batches(
            name, batch_size=config.batch_size, seed=config.seed, num_replicas=num_replicas,
            stack=stack, augment=config.augment, start_step=start_step, data_dir=data_dir,
            validation_fraction=fraction,
        )

    split = "validation" if fraction > 0 else "test"
    arrays = data.load_arrays(name, split, data_dir=data_dir, validation_fraction=fraction)

    def stats_batches():
        it = data.eval_batches(
            name, "train", config.batch_size, data_dir=data_dir, validation_fraction=fraction
        )
        return [b for _, b in zip(range(10), it, strict=False)]

    return DataSource(info, per_epoch, train_batches, "val" if fraction > 0 else "test",
                      arrays, stats_batches)


def _check_workdir(workdir) -> str:
    workdir = os.path.abspath(os.fspath(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir):
            pass
    except OSError as error:
        raise PermissionError(
            f"The workdir {workdir} cannot be created or written to ({error}). "
            "Pass a writable directory."
        ) from error
    return workdir


def _lookup(config_dict: dict, dotted: str):
    value = config_dict
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _check_saved_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json())
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        differ = [
            f"{k}: saved {_lookup(saved, k)!r}, now {_lookup(current, k)!r}"
            for k in STRUCTURAL_FIELDS
            if _lookup(saved, k) != _lookup(current, k)
        ]
        if differ:
            raise ConfigMismatchError(
                f"The workdir {workdir} holds a run with a different configuration "
                f"({'; '.join(differ)}). Use a fresh workdir, or restore the config."
            )
        changed = sorted(
            k for k in set(saved) | set(current)
            if k not in ("progress",) and saved.get(k) != current.get(k)
        )
        if changed:
            warnings.warn(
                f"Resuming in {workdir} with changed config fields {changed}: schedules and "
                "durations follow the new values, so the run will not equal an uninterrupted one.",
                UserWarning,
                stacklevel=3,
            )
    with open(path, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)


def _evaluate(state, config, data: DataSource) -> dict:
    x, y = data.eval_arrays
    split = data.eval_split
    recompute = (
        state.algorithm == "replicated_sgd"
        and bool(state.batch_stats)
        and config.rsgd.center_batch_stats == "recompute"
    )
    batches = data.stats_batches() if recompute else None
    variables = eval_variables(
        state, center_batch_stats=config.rsgd.center_batch_stats, batches=batches
    )
    out = evaluate(state.apply_fn, variables, x, y, batch_size=config.eval_batch_size)
    row = {f"{split}_loss": out["loss"], f"{split}_error": out["error"]}
    if state.algorithm == "replicated_sgd":
        replicated = {"params": state.params}
        if state.batch_stats:
            replicated["batch_stats"] = state.batch_stats
        rep = evaluate_replicas(state.apply_fn, replicated, x, y, batch_size=config.eval_batch_size)
        row.update({f"{split}_{k}": v for k, v in rep.items()})
    return row


def _batch_shape(config):
    if config.algorithm == "replicated_sgd":
        return {"num_replicas": int(config.rsgd.num_replicas)}
    if config.algorithm == "entropy_sgd" and config.esgd.mode == "scan":
        return {"stack": int(config.esgd.inner_steps)}
    return {}


def _mesh(config):
    """The ``("replica", "data")`` mesh of ``config.mesh``, or None for one device."""
    replica, data = int(config.mesh.replica), int(config.mesh.data)
    if replica * data == 1:
        return None
    import flatjax

    if replica > 1 and config.algorithm != "replicated_sgd":
        raise ValueError(
            f"mesh.replica = {replica} needs algorithm 'replicated_sgd' (got "
            f"{config.algorithm!r}); SGD and Entropy-SGD use the 'data' axis only."
        )
    return flatjax.make_mesh(replica=replica, data=data)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    model=None,
    data: DataSource | None = None,
) -> dict:
    """Trains per ``config``, evaluating and checkpointing in ``workdir``; resumes if possible.

    Files in ``workdir``: ``config.json`` (checked on resume: structural
    fields must match), ``checkpoints/<step>/`` (orbax, the last
    ``keep_checkpoints``), ``metrics.jsonl``, ``tensorboard/``,
    ``final.json`` (the last row plus run facts) and ``curves.png``.

    Args:
      config: a config from :func:`flatjax.training.base_config`.
      workdir: the run's directory (created; must be writable).
      model: a flax module to use instead of ``flatjax.models.get_model(
        config.model, num_classes, **config.model_kwargs)``.
      data: a :class:`DataSource` to use instead of :func:`dataset_source`.

    Returns:
      The final metrics: the last evaluation row (``epoch``, ``step``,
      ``grad_evals``, ``train_loss``, ``train_error``, ``test_loss``,
      ``test_error``, ``coupling``, ...).

    Raises:
      ValueError: invalid config values.
      PermissionError: the workdir is not writable.
      ConfigMismatchError: the workdir holds a run of another configuration.
      flatjax.training.CheckpointMismatchError: its checkpoints do not fit the model/optimizer.
      flatjax.training.CorruptCheckpointError: checkpoints exist but none can be read.
      flatjax.training.NonFiniteError: divergence under ``nan_policy='stop'``.

    Example:
      >>> import tempfile, numpy as np
      >>> from flatjax.models.mlp import MLPTiny
      >>> from flatjax.training import array_source, base_config, train_and_evaluate
      >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
      >>> y = (x[:, 0] > 0).astype(np.int32)
      >>> config = base_config()
      >>> config.batch_size, config.num_epochs, config.progress = 16, 1, False
      >>> data = array_source((x, y), (x, y), num_classes=2, batch_size=16)
      >>> out = train_and_evaluate(config, tempfile.mkdtemp(), model=MLPTiny(num_classes=2),
      ...                          data=data)
      >>> out["epoch"], out["step"], out["grad_evals"]
      (1.0, 4, 4)
    """
    validate_config(config)
    workdir = _check_workdir(workdir)
    data = data if data is not None else dataset_source(config)
    if model is None:
        from flatjax import models

        num_classes = int(info_field(data.info, "num_classes"))
        model = models.get_model(config.model, num_classes, **dict(config.model_kwargs))
    _check_saved_config(workdir, config)

    plan = plan_steps(config, int(data.data_steps_per_epoch))
    shape = _batch_shape(config)
    balance = None
    if config.algorithm == "replicated_sgd" and config.rsgd.coupling is None:
        # The authors' balanced γ_0: the mean training loss at initialisation,
        # over one pass of the training set unless rsgd.balance_batches says fewer.
        count = config.rsgd.balance_batches or int(data.data_steps_per_epoch)
        balance = itertools.islice(data.train_batches(0), count)
    state = create_train_state(
        config, model, data.info, jax.random.PRNGKey(config.seed), plan=plan,
        balance_batches=balance,
    )
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints, cleanup_tmp=True
    )
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        state = restored
    start = int(state.step)
    wall_offset = 0.0
    writer = MetricsWriter(
        workdir, total_steps=plan.total_steps, resume_step=start, progress=config.progress
    )
    if writer.rows:
        wall_offset = float(writer.rows[-1].get("wall_time", 0.0))

    train_step = make_train_step(config)
    place = lambda batch: batch
    mesh = _mesh(config)
    if mesh is not None:
        import flatjax

        layout = flatjax.batch_layout(config)
        train_step = flatjax.shard_train_step(train_step, mesh, state, layout)
        state = flatjax.shard_train_state(state, mesh)

        def place(batch):
            # Every process draws the same global batch (same seed) and hands
            # over only the rows its own devices hold.
            local = {k: v[flatjax.process_batch_slice(mesh, layout, v.shape)]
                     for k, v in batch.items()}
            shapes = {k: v.shape for k, v in batch.items()}
            return flatjax.host_batch_to_global(local, mesh, layout, shapes)

    batches = iter(data.train_batches(start, **shape))
    started = time.time()
    pending, sums, count, skipped = [], {"loss": 0.0, "error": 0.0}, 0, 0
    last_row: dict = writer.rows[-1] if writer.rows else {}
    clamp_warned = False
    try:
        for step in range(start, plan.total_steps):
            state, metrics = train_step(state, place(next(batches)))
            pending.append(metrics)
            done = step + 1
            at_eval = done % plan.eval_every == 0 or done == plan.total_steps
            at_ckpt = done % plan.checkpoint_every == 0 or done == plan.total_steps
            if not (at_eval or at_ckpt or done % config.log_every_steps == 0):
                continue
            fetched = jax.device_get(pending)
            for i, m in enumerate(fetched):
                step_i = done - len(fetched) + i + 1
                if config.nan_policy == "stop":
                    check_finite(m, step_i)
                if not bool(m["finite"]):
                    skipped += 1
                    continue
                sums["loss"] += float(m["loss"])
                sums["error"] += float(m["error"])
                count += 1
            pending = []
            latest = fetched[-1]
            requested = float(latest.get("requested_coupling", latest["coupling"]))
            if requested > float(latest["coupling"]) * (1 + 1e-6) and not clamp_warned:
                clamp_warned = True
                warnings.warn(
                    f"step {done}: the coupling schedule asks for γ = {requested:.4g}, past "
                    "the stability bound of the explicit coupling step; it is clamped to "
                    f"γ = {float(latest['coupling']):.4g} (logged as coupling, the request "
                    "as requested_coupling).",
                    stacklevel=2,
                )
            writer.progress(
                done, loss=float(latest["loss"]), error=float(latest["error"]),
                coupling=float(latest["coupling"]),
            )
            if at_eval:
                grad_evals = done * plan.grads_per_step
                row = {
                    "epoch": done / plan.steps_per_epoch,
                    "step": done,
                    "grad_evals": grad_evals,
                    "effective_epochs": grad_evals / plan.data_steps_per_epoch,
                    "train_loss": sums["loss"] / count if count else float("nan"),
                    "train_error": sums["error"] / count if count else float("nan"),
                    "coupling": float(latest["coupling"]),
                    "requested_coupling": requested,
                    "skipped_steps": skipped,
                }
                if "replica_distance" in latest:
                    row["replica_distance"] = float(latest["replica_distance"])
                row.update(_evaluate(state, config, data))
                row["wall_time"] = wall_offset + time.time() - started
                writer.write(row)
                last_row = row
                sums, count = {"loss": 0.0, "error": 0.0}, 0
            if at_ckpt:
                checkpointer.save(state)
    finally:
        writer.close()
        checkpointer.close()

    final = dict(last_row)
    final.update(
        algorithm=config.algorithm, dataset=config.dataset, model=config.model,
        total_steps=plan.total_steps, grads_per_step=plan.grads_per_step,
        data_steps_per_epoch=plan.data_steps_per_epoch,
    )
    with open(os.path.join(workdir, "final.json"), "w") as f:
        json.dump(final, f, indent=2)
    if writer.rows:
        plot_curves(
            writer.rows, os.path.join(workdir, "curves.png"),
            title=f"{config.algorithm} · {config.model} · {config.dataset}",
        )
    return final
