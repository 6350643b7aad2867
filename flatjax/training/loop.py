"""``train_and_evaluate(config, workdir)``: the whole run, resumable.

The loop of the flax examples, with the pieces of this package: build the
data stream and the model from the config, create the state, resume from
the latest good checkpoint, run the jitted step, fetch metrics every
``config.log_every_steps`` steps (one host sync), evaluate and checkpoint at
epoch boundaries, and write ``final.json`` and ``curves.png`` at the end.

Reliability: one run per workdir at a time (:class:`WorkdirLock`); history
is never overwritten (a workdir whose metrics or checkpoints cannot be used
is refused until ``restart=True``, which moves them to ``old-<time>/``); the
running train averages are checkpointed, so a resumed run's
``metrics.jsonl`` equals an uninterrupted one's; ``nan_policy='skip'`` warns
and fails past ``max_skipped_fraction``.

Data come from a :class:`DataSource`: :func:`dataset_source` wraps
``flatjax.data`` (the catalogue of offline datasets); :func:`array_source`
wraps arrays in memory with the same resumable batching rule.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
import warnings

import jax
import ml_collections

from flatjax._mesh import host_batch_to_global, make_mesh, process_batch_slice
from flatjax.training import algorithms
from flatjax.training.checkpoint import Checkpointer
from flatjax.training.config import plan_steps, validate_config
from flatjax.training.data_source import DataSource, array_source, dataset_source
from flatjax.training.evaluate import evaluate
from flatjax.training.metrics import MetricsWriter, plot_curves
from flatjax.training.sharding import shard_train_state, shard_train_step
from flatjax.training.state import (
    abstract_train_state,
    build_train_state,
    eval_variables,
    info_field,
    with_saved_hparams,
)
from flatjax.training.steps import NonFiniteError, check_finite, make_train_step
from flatjax.training.workdir import (
    STRUCTURAL_FIELDS,
    ConfigMismatchError,
    RunHistoryError,
    TrainingInterrupted,
    WorkdirBusyError,
    WorkdirLock,
    check_history,
    check_saved_config,
    check_workdir,
    close_all,
    move_run_aside,
    write_json,
)

__all__ = [
    "DataSource",
    "array_source",
    "dataset_source",
    "train_and_evaluate",
    "ConfigMismatchError",
    "RunHistoryError",
    "WorkdirBusyError",
    "WorkdirLock",
    "TrainingInterrupted",
    "move_run_aside",
    "STRUCTURAL_FIELDS",
]


# The per-step scalars that go to TensorBoard's train_step/ group.
_STEP_SCALARS = ("loss", "error", "grad_norm", "coupling", "replica_distance", "param_norm")


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{'esgd': {'inner_steps': 5}}`` -> ``{'esgd.inner_steps': 5}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _evaluate(state, config, algorithm, data: DataSource) -> dict:
    x, y = data.eval_arrays
    split = data.eval_split
    recompute = bool(state.batch_stats) and algorithm.needs_stats_batches(config)
    batches = data.stats_batches() if recompute else None
    variables = eval_variables(
        state, center_batch_stats=config.rsgd.center_batch_stats, batches=batches
    )
    out = evaluate(state.apply_fn, variables, x, y, batch_size=config.eval_batch_size)
    row = {f"{split}_loss": out["loss"], f"{split}_error": out["error"]}
    extra = algorithm.evaluate_extra(state, x, y, batch_size=config.eval_batch_size)
    row.update({f"{split}_{k}": v for k, v in extra.items()})
    return row


def _mesh(config, algorithm):
    """The ``("replica", "data")`` mesh of ``config.mesh``, or None for one device."""
    replica, data = int(config.mesh.replica), int(config.mesh.data)
    if replica * data == 1:
        return None
    if replica > 1 and not algorithm.has_replicas:
        raise ValueError(
            f"mesh.replica = {replica} needs an algorithm with replicas ('replicated_sgd'; "
            f"got {config.algorithm!r}); SGD and Entropy-SGD use the 'data' axis only."
        )
    return make_mesh(replica=replica, data=data)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    model=None,
    data: DataSource | None = None,
    restart: bool = False,
) -> dict:
    """Trains per ``config``, evaluating and checkpointing in ``workdir``; resumes if possible.

    Files in ``workdir``: ``config.json`` (checked on resume: structural
    fields must match), ``checkpoints/<step>/`` (orbax, the last
    ``keep_checkpoints``), ``metrics.jsonl``, ``tensorboard/``,
    ``final.json`` (the last row plus run facts) and ``curves.png``;
    ``.lock`` while it runs (:class:`WorkdirLock`).

    Resuming: the latest checkpoint that passes its checksum is restored
    with the loop's running train sums, so ``metrics.jsonl`` ends up as an
    uninterrupted run's would (apart from ``wall_time``). A workdir whose
    history cannot be used (checkpoints that cannot be read, metrics past
    any checkpoint, a damaged ``config.json`` or ``metrics.jsonl``) is
    refused until ``restart=True``, which moves the earlier run to
    ``old-<time>/`` (nothing is deleted). ``config.json`` is written only
    once every check has passed.

    Args:
      config: a config from :func:`flatjax.training.base_config`.
      workdir: the run's directory (created; must be writable).
      model: a flax module to use instead of ``flatjax.models.get_model(
        config.model, num_classes, **config.model_kwargs)``.
      data: a :class:`DataSource` to use instead of :func:`dataset_source`.
      restart: move an earlier run in ``workdir`` aside and start from scratch.

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
      flatjax.training.NonFiniteError: divergence under ``nan_policy='stop'``;
        under ``'skip'``, more than ``max_skipped_fraction`` of the steps
        skipped or a non-finite final loss.
      RunHistoryError: an earlier run in ``workdir`` cannot be resumed.
      WorkdirBusyError: another live run holds ``workdir``.
      TrainingInterrupted: Ctrl-C (a KeyboardInterrupt naming the step and
        the last checkpoint).

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
    validate_config(config)  # the one validation of the run
    workdir = check_workdir(workdir)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        if restart:
            aside = move_run_aside(workdir)
            if aside is not None:
                warnings.warn(f"restart: moved the earlier run to {aside}.", UserWarning,
                              stacklevel=2)
        return _train(config, workdir, model, data)
    finally:
        if lock is not None:
            lock.release()


def _guard_finite(metrics: dict, step: int, restored_step: int | None, window: int,
                  checkpoint_dir: str) -> None:
    """check_finite, saying when the divergence comes right after a restore."""
    try:
        check_finite(metrics, step)
    except NonFiniteError as error:
        if restored_step is None or step > restored_step + window:
            raise
        path = os.path.join(checkpoint_dir, str(restored_step))
        raise NonFiniteError(
            f"{error} This is {step - restored_step} step(s) after resuming from the "
            f"checkpoint at step {restored_step}: the restored checkpoint may be bad. Move "
            f"{path} aside to resume from the previous one, or rerun with --restart."
        ) from None


def _skip_failure(skipped: int, done: int, limit: float) -> str | None:
    """The failure message when more than ``limit`` of ``done`` steps were skipped."""
    if done and skipped / done > limit:
        return (
            f"nan_policy='skip' skipped {skipped} of {done} steps ({100 * skipped / done:.1f}%, "
            f"more than max_skipped_fraction = {limit:g}): the run is not training. Lower the "
            "learning rate or bound the coupling, or raise config.max_skipped_fraction."
        )
    return None


def _train(config, workdir: str, model, data) -> dict:
    data = data if data is not None else dataset_source(config)
    if model is None:
        from flatjax import models

        num_classes = int(info_field(data.info, "num_classes"))
        model = models.get_model(config.model, num_classes, **dict(config.model_kwargs))
    current_config = check_saved_config(workdir, config)

    algorithm = algorithms.get(config.algorithm)
    plan = plan_steps(config, int(data.data_steps_per_epoch))
    shape = algorithm.batch_shape(config)
    key = jax.random.PRNGKey(config.seed)
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    checkpointer = Checkpointer(checkpoint_dir, keep=config.keep_checkpoints, cleanup_tmp=True)
    try:
        # The restore target is abstract (jax.eval_shape: structure, shapes and
        # dtypes only); a resumed run takes the measured hyperparameters from its
        # checkpoint instead of measuring them again.
        state = restored = None
        if checkpointer.all_steps():
            template = abstract_train_state(config, model, data.info, key, plan=plan)
            restored = checkpointer.restore_latest(template)
        if restored is None:
            check_history(workdir, checkpoint_dir, plan.checkpoint_every)
            loop_state = None
            balance = None
            if algorithm.needs_measurement(config):
                # The authors' balanced γ_0: the mean training loss at initialisation,
                # over one pass of the training set unless rsgd.balance_batches says fewer.
                count = config.rsgd.balance_batches or int(data.data_steps_per_epoch)
                balance = itertools.islice(data.train_batches(0), count)
            state = build_train_state(config, model, data.info, key, plan=plan,
                                      balance_batches=balance)
        else:
            state = with_saved_hparams(restored, config, plan)
            loop_state = checkpointer.loop_state(checkpointer.restored_step)
        start = int(state.step)
        writer = MetricsWriter(
            workdir, total_steps=plan.total_steps, resume_step=start, progress=config.progress
        )
    except BaseException:
        checkpointer.close()
        raise
    # Every check has passed: only now does the workdir's config.json change.
    write_json(os.path.join(workdir, "config.json"), current_config, indent=2, sort_keys=True)
    wall_offset = float(writer.rows[-1].get("wall_time", 0.0)) if writer.rows else 0.0

    train_step = make_train_step(config)
    place = lambda batch: batch
    mesh = _mesh(config, algorithm)
    if mesh is not None:
        layout = algorithm.batch_layout(config)
        train_step = shard_train_step(train_step, mesh, state, layout)
        state = shard_train_state(state, mesh)

        def place(batch):
            # Every process draws the same global batch (same seed) and hands
            # over only the rows its own devices hold.
            local = {k: v[process_batch_slice(mesh, layout, v.shape)]
                     for k, v in batch.items()}
            shapes = {k: v.shape for k, v in batch.items()}
            return host_batch_to_global(local, mesh, layout, shapes)

    # The running train sums since the last evaluation row are part of the
    # checkpoint, so a resume between evaluations continues them exactly.
    loop_state = loop_state or {}
    sums = {"loss": 0.0, "error": 0.0, **loop_state.get("sums", {})}
    count = int(loop_state.get("count", 0))
    skipped = int(loop_state.get("skipped", 0))
    limit = float(config.get("max_skipped_fraction", 0.1))
    batches = iter(data.train_batches(start, **shape))
    learning_rate = algorithm.learning_rate_fn(config, plan)  # built once, read per log
    started = time.time()
    pending = []
    last_row: dict = writer.rows[-1] if writer.rows else {}
    clamp_warned = skip_warned = False
    restored_step = checkpointer.restored_step
    done = start
    failing = True
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
                    _guard_finite(m, step_i, restored_step, config.log_every_steps,
                                  checkpoint_dir)
                if not bool(m["finite"]):
                    skipped += 1
                    continue
                sums["loss"] += float(m["loss"])
                sums["error"] += float(m["error"])
                count += 1
            pending = []
            if skipped and not skip_warned:
                skip_warned = True
                warnings.warn(
                    f"step {done}: nan_policy='skip' has skipped {skipped} step(s) with a "
                    "non-finite loss or gradient (logged as skipped_steps); the run fails if "
                    f"more than max_skipped_fraction = {limit:g} of its steps are skipped.",
                    RuntimeWarning,
                    stacklevel=2,
                )
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
            writer.log_step(done, done * plan.grads_per_step, {
                **{k: float(latest[k]) for k in _STEP_SCALARS if k in latest},
                "learning_rate": learning_rate(done - 1),
            })
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
                row.update(_evaluate(state, config, algorithm, data))
                row["wall_time"] = wall_offset + time.time() - started
                writer.write(row)
                last_row = row
                sums, count = {"loss": 0.0, "error": 0.0}, 0
            if at_ckpt:
                checkpointer.save(
                    state, loop_state={"sums": sums, "count": count, "skipped": skipped}
                )
            if at_eval and config.nan_policy == "skip":
                message = _skip_failure(skipped, done, limit)
                if message:
                    raise NonFiniteError(message)
        writer.log_hparams(_flat(json.loads(config.to_json())),
                           {k: v for k, v in last_row.items() if k.endswith(("_error", "_loss"))})
        failing = False
    except KeyboardInterrupt:
        steps = checkpointer.all_steps()
        last = f"the last checkpoint is step {steps[-1]}" if steps else "there is no checkpoint yet"
        raise TrainingInterrupted(
            f"interrupted at step {done}; {last}; rerun the same command to resume"
        ) from None
    finally:
        if failing:  # the run's own error matters more than one from closing
            with contextlib.suppress(Exception):
                close_all(writer.close, checkpointer.close)
        else:
            close_all(writer.close, checkpointer.close)

    final = dict(last_row)
    final.update(
        algorithm=config.algorithm, dataset=config.dataset, model=config.model,
        total_steps=plan.total_steps, grads_per_step=plan.grads_per_step,
        data_steps_per_epoch=plan.data_steps_per_epoch,
    )
    facts, warning = algorithm.final_facts(final)
    final.update(facts)
    if warning is not None:
        warnings.warn(warning, RuntimeWarning, stacklevel=2)
    write_json(os.path.join(workdir, "final.json"), final, indent=2)
    if writer.rows:
        plot_curves(
            writer.rows, os.path.join(workdir, "curves.png"),
            title=f"{config.algorithm} · {config.model} · {config.dataset}",
        )
    losses = {k: v for k, v in last_row.items() if k.endswith("_loss") and k.count("_") == 1}
    bad = [f"{k} = {v}" for k, v in losses.items() if not math.isfinite(float(v))]
    if bad:
        raise NonFiniteError(
            f"The run finished with a non-finite loss ({', '.join(bad)}; "
            f"{skipped} of {plan.total_steps} steps skipped); the final network is not usable. "
            "Lower the learning rate or bound the coupling."
        )
    return final
