"""What every training stage shares: train state, optimizer, update core, the loop, the stage.

A stage (VCP pretraining and the probe in `pretrain.py`, fine-tuning and linear evaluation in
`finetune.py`) brings its model, its pure `train_step(state, batch, ctx)` / `eval_step(state,
batch, ctx)` built on `update()`, its data, its evaluation and its summary; everything else is
here, once:

- `TrainState` (a pytree: jitted, sharded and checkpointed whole) and `StepContext` (the model
  structure and optimizer the steps close over);
- the optimizer: PyTorch SGD semantics (L2 before momentum) with the lr schedules, and freezing a
  part of the model (no gradient computed for it, bit-identical after any number of steps);
- `update()`: forward, backward, cross-device gradient mean, optimizer step, new BN statistics;
- `init_state()`: resume > init_from > scratch, as big_vision and scenic order them (the
  backbone itself is `vcp_jax.backbone`'s);
- `train_loop()`: steps, progress bar, TensorBoard, one line per evaluation, checkpoints (the last
  few plus the lowest validation loss), bit-exact resumption, and its `Clock`;
- `run_stage()`: the skeleton around the loop (run checkpoints, init, BatchNorm re-estimation of
  a frozen backbone, provenance, the compiled steps, the best checkpoint restored);
- what it survives (docs/faults.md): divergence (`Diverged`, nothing non-finite saved), a
  resumed run with a changed config (refused), damaged checkpoints (the previous one is used),
  SIGTERM / SIGINT (a checkpoint at the step boundary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from vcp_jax import backbone as backbone_lib
from vcp_jax import (
    bn_calibration,
    checkpointing,
    config_utils,
    input_pipeline,
    models,
    parallel,
    provenance,
    reporting,
    signals,
)

SCHEDULES = ("constant", "cosine")

Batch = Mapping[str, Any]
Metrics = dict[str, float]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    """The checks every training stage shares; a `ConfigError` names the key and what is allowed.

    The model, the parallel strategy with the batch and how clips are read are checked as every
    stage checks them (`models`, `parallel`, `input_pipeline`); the rest is training's own.
    """
    models.validate_config(config)
    parallel.validate_config(config)
    input_pipeline.validate_config(config)
    config_utils.check_choice(config, "optimizer.schedule", SCHEDULES)
    for key in ("log_every_steps", "optimizer.learning_rate", "keep_checkpoints"):
        config_utils.check_positive(config, key)
    # None: a stage derives them from the data (fine-tuning: epochs of the training videos).
    for key in ("num_train_steps", "checkpoint_every_steps", "eval_every_steps"):
        if config.get(key) is not None:
            config_utils.check_positive(config, key)
    for key in ("optimizer.momentum", "optimizer.weight_decay", "optimizer.warmup_steps",
                "data.num_val_videos"):
        config_utils.check_positive(config, key, allow_zero=True)


def effective_learning_rate(config: ml_collections.ConfigDict) -> float:
    """The base rate, scaled linearly with the batch when `optimizer.scale_with_batch` is set."""
    lr = config.optimizer.learning_rate
    if config.optimizer.get("scale_with_batch", False):
        lr *= config.batch_size / config.optimizer.base_batch_size
    return lr


def describe_learning_rate(config: ml_collections.ConfigDict) -> str:
    """`peak learning rate 0.02 (0.01 x batch 16 / 8)`: the rate the optimizer uses, and why.

    Printed by every training stage, since with `scale_with_batch` the configured
    `optimizer.learning_rate` is not the rate that trains.
    """
    lr = effective_learning_rate(config)
    text = f"peak learning rate {lr:g}"
    if config.optimizer.get("scale_with_batch", False):
        text += (f" ({config.optimizer.learning_rate:g} x batch {config.batch_size} / "
                 f"{config.optimizer.base_batch_size})")
    return text


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Constant (the paper) or cosine to zero, each with an optional linear warm-up."""
    lr = effective_learning_rate(config)
    warmup = int(config.optimizer.warmup_steps)
    if config.optimizer.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, config.num_train_steps - warmup))
    else:
        main = optax.constant_schedule(lr)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def create_optimizer(
    config: ml_collections.ConfigDict, trainable: Any = None
) -> optax.GradientTransformation:
    """PyTorch SGD: L2 weight decay added to the gradient before momentum.

    `trainable`: a pytree of bools over the parameters (None: all trainable); the others get no
    update and no optimizer state.
    """
    tx = optax.chain(
        optax.add_decayed_weights(config.optimizer.weight_decay),
        optax.sgd(learning_rate_schedule(config), momentum=config.optimizer.momentum or None),
    )
    if trainable is None:
        return tx
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


# --------------------------------------------------------------------------------------------
# State and the update core
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; a pytree, so it is jitted, sharded and checkpointed whole."""

    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key; stages fold (step, example position) into it


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What the pure steps close over: model structure, optimizer, freezing, the pmap axis.

    `train_graphdef` is the model in training mode, or in inference mode when a part of it is
    frozen (a frozen backbone keeps its BatchNorm statistics and normalises with them).
    `task` holds the stage's own static settings (the cloze config, the number of classes).
    """

    train_graphdef: Any
    eval_graphdef: Any
    tx: optax.GradientTransformation
    trainable: Any  # pytree of bools over `params`, or None (everything trains)
    axis_name: str | None
    task: Any = None


def create_train_state(
    model: nnx.Module,
    config: ml_collections.ConfigDict,
    *,
    frozen: Callable[[tuple[Any, ...]], bool] | None = None,
    axis_name: str | None = None,
    task: Any = None,
) -> tuple[TrainState, StepContext]:
    """The state of a freshly initialised `model` and the context its steps close over.

    `frozen(path) -> bool` marks parameters that must not train (e.g. the backbone of the probe
    and of linear evaluation); then the whole model runs in inference mode during training.
    """
    model.eval()
    eval_graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.train()
    train_graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    trainable = None
    if frozen is not None:
        trainable = jax.tree_util.tree_map_with_path(lambda path, _: not frozen(path), params)
        if not any(jax.tree.leaves(trainable)):
            raise config_utils.ConfigError("every parameter is frozen: nothing would train")
        train_graphdef = eval_graphdef
    tx = create_optimizer(config, trainable)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(config.seed + 1),
    )
    return state, StepContext(train_graphdef, eval_graphdef, tx, trainable, axis_name, task)


def path_has(name: str) -> Callable[[tuple[Any, ...]], bool]:
    """A `frozen` predicate: the parameter's path goes through a module called `name`."""
    return lambda path: any(getattr(k, "key", None) == name for k in path)


def update(
    state: TrainState,
    ctx: StepContext,
    loss_fn: Callable[[nnx.Module], tuple[jax.Array, Any]],
) -> tuple[TrainState, jax.Array, Any]:
    """One optimizer step: `loss_fn(model) -> (loss, aux)` on the model of `state`.

    Gradients are averaged over the pmap axis; frozen parameters get neither a gradient (the
    backward pass does not reach them) nor an update. `update_with_norm` also returns the
    gradient norm.
    """
    new_state, loss, aux, _ = update_with_norm(state, ctx, loss_fn)
    return new_state, loss, aux


def update_with_norm(
    state: TrainState,
    ctx: StepContext,
    loss_fn: Callable[[nnx.Module], tuple[jax.Array, Any]],
) -> tuple[TrainState, jax.Array, Any, jax.Array]:
    """`update`, plus the global norm of the (averaged) gradients: with the loss, what
    `train_loop` checks for divergence at every log step (computed on the device, fetched with
    the other metrics, so it costs no extra synchronisation)."""

    def wrapped(params: nnx.State) -> tuple[jax.Array, tuple[Any, nnx.State]]:
        if ctx.trainable is not None:
            params = jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p),
                                  ctx.trainable, params)
        model = nnx.merge(ctx.train_graphdef, params, state.batch_stats, copy=True)
        loss, aux = loss_fn(model)
        return loss, (aux, nnx.state(model, nnx.BatchStat))

    (loss, (aux, batch_stats)), grads = jax.value_and_grad(wrapped, has_aux=True)(state.params)
    if ctx.axis_name is not None:
        grads = jax.lax.pmean(grads, ctx.axis_name)
    updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params)
    if ctx.trainable is None:
        params = optax.apply_updates(state.params, updates)
    else:  # frozen leaves are returned as they are: bit-identical, not p + 0
        params = jax.tree.map(lambda t, p, u: p + u if t else p,
                              ctx.trainable, state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, loss, aux, optax.global_norm(grads)


def classification_update(
    state: TrainState, ctx: StepContext, inputs: jax.Array, labels: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step of softmax cross-entropy of `model(inputs)` against integer `labels` (the
    cloze options of VCP, the action classes of fine-tuning), with the metrics every training
    stage logs: loss, accuracy and gradient norm, averaged over the devices."""

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        logits = model(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    state, loss, logits, grad_norm = update_with_norm(state, ctx, loss_fn)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm}
    return state, reduce_metrics(metrics, ctx)


def eval_model(state: TrainState, ctx: StepContext) -> nnx.Module:
    """The model of `state` in inference mode (BatchNorm normalises with its running statistics)."""
    return nnx.merge(ctx.eval_graphdef, state.params, state.batch_stats, copy=True)


def example_keys(base: jax.Array, step: jax.Array, batch_size: int,
                 axis_name: str | None) -> jax.Array:
    """One PRNG key per example of the global batch, from (base, step, position in the batch).

    Under pmap the position is offset by the device's index, so jit, pmap and one device draw the
    same randomness for the same example.
    """
    positions = jnp.arange(batch_size)
    if axis_name is not None:
        positions = jax.lax.axis_index(axis_name) * batch_size + positions
    step_key = jax.random.fold_in(base, step)
    return jax.vmap(lambda p: jax.random.fold_in(step_key, p))(positions)


def reduce_metrics(metrics: dict[str, jax.Array], ctx: StepContext) -> dict[str, jax.Array]:
    """Means over the pmap axis (the jit strategy already computes them over the global batch)."""
    if ctx.axis_name is None:
        return metrics
    return jax.lax.pmean(metrics, ctx.axis_name)


def sum_metrics(sums: dict[str, jax.Array], ctx: StepContext) -> dict[str, jax.Array]:
    """Sums over the pmap axis, for evaluation totals."""
    if ctx.axis_name is None:
        return sums
    return jax.lax.psum(sums, ctx.axis_name)


# --------------------------------------------------------------------------------------------
# Initialisation: resume > init_from > scratch
# --------------------------------------------------------------------------------------------


def init_state(
    state: TrainState,
    checkpoints: checkpointing.RunCheckpoints,
    source: backbone_lib.BackboneCheckpoint | None,
) -> tuple[TrainState, int, str]:
    """(state, first step, what happened): resume > init_from > scratch.

    `state` is freshly initialised (host arrays); the result is too. Resuming compares the
    checkpoint's config with `checkpoints.config` (now complete: a stage has filled in what it
    derives from the data) and falls back past damaged checkpoints, with a warning on the
    console; the disk must have room for one more checkpoint.
    """
    checkpoints.check_free_space(state)
    if checkpoints.latest_step() is not None:
        accepted: list[str] = []

        def check(step: int, stored: dict[str, Any]) -> None:
            accepted[:] = checkpointing.check_resume_config(
                stored, checkpoints.config, step=step,
                where=checkpoints.directory / str(step))

        state, step, warnings = checkpoints.restore_newest(state, check_config=check)
        for warning in warnings:
            reporting.console(f"warning: {warning}")
        changed = (f"; with config changes allowed by --allow_config_change: "
                   f"{'; '.join(accepted)}" if accepted else "")
        return state, step, (f"resumed from the checkpoint of step {step} in "
                             f"{checkpoints.directory}{changed}")
    if source is None:
        return state, 0, "starting from random initialisation"
    state = backbone_lib.init_backbone(state, source)
    dropped = f"; not loaded: {', '.join(source.dropped)}" if source.dropped else ""
    return state, 0, f"loaded the {source.describe()}{dropped}"


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoopResult:
    state: Any  # placed on the devices (strategy layout)
    val_metrics: Metrics
    best_step: int | None
    start_step: int
    timing: dict[str, float]  # where the loop's wall time went (see `train_loop`)


class Diverged(config_utils.UserError):
    """Training produced a NaN or an infinity; nothing from that step on was saved."""

    exit_code = 3  # main's exit status: not a config mistake (2), not a signal (128 + n)


class Clock:
    """Where the loop's wall time goes, as big_vision's `u.chrono` keeps it: the first step
    (compilation, timed alone and kept out of the rates), training, waiting for input,
    evaluation and checkpointing. A log window's rates leave out the evaluations and saves in it.
    """

    KEYS = ("first_step_seconds", "train_seconds", "train_cpu_seconds", "input_wait_seconds",
            "eval_seconds", "checkpoint_seconds")

    def __init__(self) -> None:
        self.timing: dict[str, float] = dict.fromkeys(self.KEYS, 0.0)
        self.timing["train_steps"] = 0
        self.start = time.perf_counter()
        self._new_window()

    def _new_window(self) -> None:
        self.window_start, self.window_cpu = time.perf_counter(), time.process_time()
        self.window_wait = self.window_other = self.other_cpu = 0.0

    def first_step(self, started: float) -> None:
        """The first step (begun at `started`) has finished: rates count from now."""
        self.timing["first_step_seconds"] = time.perf_counter() - started
        self._new_window()

    def step(self, waited: float) -> None:
        """A later step, after waiting `waited` seconds for its batch."""
        self.window_wait += waited
        self.timing["input_wait_seconds"] += waited
        self.timing["train_steps"] += 1

    def window(self, steps: int) -> dict[str, float]:
        """Closes a log window of `steps` steps: its steps/s and input-wait fraction."""
        elapsed = time.perf_counter() - self.window_start - self.window_other
        self.timing["train_seconds"] += elapsed
        self.timing["train_cpu_seconds"] += (time.process_time() - self.window_cpu
                                             - self.other_cpu)
        rates = {"steps_per_second": steps / elapsed,
                 "input_wait_fraction": self.window_wait / elapsed}
        self._new_window()
        return rates

    @contextlib.contextmanager
    def pause(self, key: str) -> Iterator[None]:
        """Times the block as `key` ('eval_seconds', 'checkpoint_seconds'), not as training."""
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            self.timing[key] += seconds
            self.window_other += seconds
            self.other_cpu += time.process_time() - c0

    def total(self) -> dict[str, float]:
        return {**self.timing, "total_seconds": time.perf_counter() - self.start}


def train_loop(
    *,
    config: ml_collections.ConfigDict,
    state: Any,
    train_fn: Callable[..., Any],
    train_iter: Any,
    evaluate: Callable[[Any], Metrics],
    strategy: parallel.Strategy,
    checkpoints: checkpointing.RunCheckpoints,
    start_step: int,
    writer: Any,
    desc: str,
    eval_line: Callable[[int, Metrics], str],
) -> LoopResult:
    """Trains from `start_step` to `config.num_train_steps`: log, evaluate, checkpoint.

    `state` is already placed on the devices; `evaluate(state)` returns validation metrics
    (`val_loss` decides the best checkpoint). The next `config.prefetch_to_device` batches are
    placed on the devices while a step runs, and metrics are fetched from the devices only every
    `log_every_steps`, so the host does not wait for a step to finish in between. The timing
    (`Clock`; logged as `train/input_wait_fraction`, returned in `LoopResult.timing`) separates
    the first step (compilation), the time the loop waited for input, evaluation and
    checkpointing.

    Faults (docs/faults.md): the loss and the gradient norm of every step are checked when they
    are fetched (each log step, and before each save), and a non-finite one, or a non-finite
    validation loss, raises `Diverged` naming the step and the last checkpoint on disk, which
    stays the newest (a non-finite state is never saved). SIGTERM / SIGINT (`signals`) save the
    step just finished and raise `signals.Stopped`.
    """
    is_main = jax.process_index() == 0
    bar = tqdm.tqdm(total=config.num_train_steps, initial=start_step, unit="step", desc=desc,
                    disable=not is_main, dynamic_ncols=True, leave=True)
    lr_schedule = learning_rate_schedule(config)  # for logging; the optimizer holds its own
    batches = parallel.prefetch_to_device(train_iter, strategy,
                                          size=config.get("prefetch_to_device", 2))
    val_metrics: Metrics = {}
    recent: list[Any] = []
    recent_steps: list[int] = []
    clock = Clock()

    def save(step: int, metrics: Metrics | None) -> None:
        # The steps not checked yet must be finite before their state is saved; fetching them
        # costs nothing extra here, as the save waits for the step anyway.
        _check_finite([strategy.fetch(m) for m in recent], recent_steps, checkpoints, config)
        try:
            checkpoints.save(step, strategy.get_state(state), metrics=metrics)
        except checkpointing.NonFiniteError:
            raise _diverged(step, "the state holds non-finite values", checkpoints,
                            config) from None
        _hold_after_save(step, checkpoints)

    with signals.training_loop():
        try:
            for step in range(start_step + 1, config.num_train_steps + 1):
                t0 = time.perf_counter()
                batch = next(batches)
                waited = time.perf_counter() - t0
                state, metrics = train_fn(state, batch)
                if step == start_step + 1:  # compilation: timed alone, kept out of the rates
                    jax.block_until_ready(metrics)
                    clock.first_step(t0)
                    _check_finite([strategy.fetch(metrics)], [step], checkpoints, config)
                else:
                    clock.step(waited)
                    recent.append(metrics)
                    recent_steps.append(step)
                bar.update()
                is_last = step == config.num_train_steps
                if (step % config.log_every_steps == 0 or is_last) and recent:
                    fetched = [strategy.fetch(m) for m in recent]  # waits for the last step
                    _check_finite(fetched, recent_steps, checkpoints, config)
                    summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    summary.update(clock.window(len(recent)))
                    summary["learning_rate"] = float(lr_schedule(step - 1))
                    bar.set_postfix({k: f"{summary[k]:.3f}" for k in ("loss", "accuracy")
                                     if k in summary})
                    reporting.write_scalars(writer, step, summary, prefix="train/")
                    recent, recent_steps = [], []
                evaluated = step % config.eval_every_steps == 0 or is_last
                if evaluated:
                    with clock.pause("eval_seconds"):
                        val_metrics = evaluate(state)
                    val_loss = val_metrics.get("val_loss")
                    if isinstance(val_loss, float) and not math.isfinite(val_loss):
                        raise _diverged(step, f"val_loss={val_loss}", checkpoints, config)
                    reporting.write_scalars(writer, step, val_metrics)
                    if is_main:
                        bar.write(eval_line(step, val_metrics))
                saved = step % config.checkpoint_every_steps == 0 or is_last
                if saved:
                    with clock.pause("checkpoint_seconds"):
                        save(step, val_metrics if evaluated else None)
                signum = signals.stop_now(step)
                if signum is not None:
                    if not saved:
                        save(step, val_metrics if evaluated else None)
                    checkpoints.wait()
                    raise signals.Stopped(
                        signals.stopped_message(signum, step, checkpoints.directory), signum)
            checkpoints.wait()  # still in the loop: a signal now waits for the saves
        finally:
            bar.close()
    signum = signals.pending()
    if signum is not None:  # arrived after the last step's check, while its save completed
        raise signals.Stopped(
            signals.stopped_message(signum, config.num_train_steps, checkpoints.directory),
            signum)
    return LoopResult(state, val_metrics, checkpoints.best_step(), start_step, clock.total())


# For tests that kill a run at a known point (tests/test_pretrain.py, test_multihost.py): with
# this variable naming a file, the first save of a run is waited for, process 0 writes its step
# into the file, and every process then sleeps until it is killed (at most 10 minutes). Without
# it (every real run), nothing happens.
HOLD_AFTER_SAVE_ENV = "VCP_JAX_HOLD_AFTER_SAVE"


def _hold_after_save(step: int, checkpoints: checkpointing.RunCheckpoints) -> None:
    marker = os.environ.get(HOLD_AFTER_SAVE_ENV)
    if not marker:
        return
    checkpoints.wait()
    if jax.process_index() == 0:
        Path(marker).write_text(f"{step}\n")
    time.sleep(600)


# The metrics whose values must stay finite: a NaN or an infinity in either means the run has
# diverged (every later step is NaN too).
FINITE_METRICS = ("loss", "grad_norm")


def _check_finite(fetched: list[Mapping[str, Any]], steps: list[int],
                  checkpoints: checkpointing.RunCheckpoints,
                  config: ml_collections.ConfigDict) -> None:
    """Raises `Diverged` at the first of `steps` whose fetched loss or gradient norm is not
    finite."""
    for step, metrics in zip(steps, fetched, strict=True):
        bad = {k: float(np.asarray(metrics[k])) for k in FINITE_METRICS if k in metrics
               and not np.isfinite(np.asarray(metrics[k])).all()}
        if bad:
            shown = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise _diverged(step, shown, checkpoints, config)


def _diverged(step: int, what: str, checkpoints: checkpointing.RunCheckpoints,
              config: ml_collections.ConfigDict) -> Diverged:
    """The one-line report: the step, what was not finite, the checkpoint to go back to."""
    checkpoints.wait()  # saves in flight are of earlier, finite steps: let them complete
    saved = checkpoints.saved_steps()
    fix = (f"lower the learning rate (config.optimizer.learning_rate; now "
           f"{describe_learning_rate(config)}) or add config.optimizer.warmup_steps")
    if saved:
        then = (f"the last finite checkpoint is step {saved[-1]} "
                f"({checkpoints.directory / str(saved[-1])}): {fix} and rerun with "
                f"--allow_config_change=optimizer to resume from it")
    else:
        then = f"no checkpoint was saved before it: {fix} and rerun"
    return Diverged(f"training diverged at step {step} ({what}); nothing from that step on was "
                    f"saved; {then}")


def eval_line(step: int, metrics: Metrics) -> str:
    """`step 150: val_loss=1.2345, val_accuracy=0.4000` (per-class entries left out)."""
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                      if "/" not in k and isinstance(v, float))
    return f"step {step}: {shown}"


# --------------------------------------------------------------------------------------------
# A training stage, written once
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StageRun:
    """What `run_stage` hands back to its stage, for the stage's own test and report."""

    state: Any  # on the devices: the chosen checkpoint's state (see `run_stage`)
    chosen_step: int  # the lowest validation loss, or the last step when nothing ranked them
    loop: LoopResult
    ctx: StepContext
    strategy: parallel.Strategy
    eval_fn: Callable[..., Any]  # the stage's `eval_step`, compiled
    bn_statistics: dict[str, Any] | None  # `bn_calibration.recalibrate`'s record (frozen only)


def run_stage(
    config: ml_collections.ConfigDict,
    workdir: Path,
    *,
    source: backbone_lib.BackboneCheckpoint | None,
    create_state: Callable[[str | None], tuple[TrainState, StepContext]],
    train: Any,
    train_step: Callable[..., Any],
    eval_step: Callable[..., Any],
    evaluate: Callable[[Any, Callable[..., Any], parallel.Strategy], Metrics],
    provenance_data: dict[str, Any],
    desc: str,
    calibration_forward: Callable[..., Any] | None = None,
    clips_per_batch: int = 0,
    restore_best: bool = True,
) -> StageRun:
    """What every training stage does around `train_loop`, given its model, data and steps.

    The run's checkpoints in `workdir`; the state from `create_state(bn_axis_name)`, then
    resume > init_from (`source`) > scratch (`init_state`); for a frozen backbone
    (`calibration_forward` given), its BatchNorm statistics re-estimated on the training
    batches `train` first (`bn_calibration`, `config.bn_recalibration`; a resumed run keeps its
    checkpoint's, the ones its head trained with); `provenance.json`; the two compiled steps
    (`train_step(state, batch, ctx)`, `eval_step` for `evaluate(state, eval_fn, strategy)`);
    TensorBoard; the loop. With `restore_best`, the state handed back is the one of the
    checkpoint with the lowest validation loss (the last step when nothing ranked them).
    """
    strategy = parallel.make_strategy(config.parallel)
    state, ctx = create_state(strategy.axis_name)
    checkpoints = checkpointing.RunCheckpoints(workdir / checkpointing.CHECKPOINTS_DIR, config)
    resumed = checkpoints.latest_step() is not None
    state, start_step, started = init_state(state, checkpoints, source)
    reporting.console(started)
    bn_statistics = None
    if calibration_forward is not None:
        stats, bn_statistics = bn_calibration.recalibrate(
            config, nnx.merge(ctx.eval_graphdef, state.params, state.batch_stats), train,
            functools.partial(calibration_forward, ctx=ctx, rng=np.asarray(state.rng)),
            strategy, clips_per_batch=clips_per_batch,
            origin="resumed" if resumed else "random" if source is None else "init_from")
        if stats is not None:
            state = state.replace(batch_stats=stats)
    provenance.write(workdir, config, data=provenance_data, init_from=source)

    train_fn = strategy.compile(functools.partial(train_step, ctx=ctx), donate_state=True)
    eval_fn = strategy.compile(functools.partial(eval_step, ctx=ctx), donate_state=False)
    result = train_loop(
        config=config,
        state=strategy.put_state(state),
        train_fn=train_fn,
        train_iter=input_pipeline.make_iterator(train, config, start=start_step),
        evaluate=lambda s: evaluate(s, eval_fn, strategy),
        strategy=strategy,
        checkpoints=checkpoints,
        start_step=start_step,
        writer=reporting.metric_writer(workdir),
        desc=desc,
        eval_line=eval_line,
    )
    chosen = result.best_step or config.num_train_steps
    state = result.state
    if restore_best and chosen != config.num_train_steps:
        state = strategy.put_state(checkpoints.restore_state(strategy.get_state(state), chosen))
    checkpoints.close()
    return StageRun(state, chosen, result, ctx, strategy, eval_fn, bn_statistics)
