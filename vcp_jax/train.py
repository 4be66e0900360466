"""VCP pretraining: train state, pure jitted steps, the loop with evaluation and checkpoints.

`train_step(state, batch) -> (state, metrics)` draws the cloze on the device (each tuple's key is
folded from the step and its position in the global batch, so every parallel strategy draws the
same options), runs the backbone on the 3 clips and updates with SGD. `eval_step` draws the
held-out tuples' options from their example indices, so VCP accuracy is reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
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

from vcp_jax import checkpointing, cloze, config_utils, input_pipeline, models, parallel
from vcp_jax import conv as conv_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCHEDULES = ("constant", "cosine")
EVAL_CLOZE_SEED = 0  # the validation cloze keys are fold_in(PRNGKey(0), example index)


# --------------------------------------------------------------------------------------------
# Config, model, optimizer
# --------------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the key and the allowed values for anything not allowed."""
    config_utils.check_choice(config, "model.arch", models.ARCHS)
    config_utils.check_choice(config, "model.dtype", DTYPES)
    config_utils.check_positive(config, "model.width")
    config_utils.check_choice(config, "model.conv_impl", conv_lib.CONV_IMPLS)
    config_utils.check_choice(config, "parallel", parallel.STRATEGIES)
    config_utils.check_choice(config, "optimizer.schedule", SCHEDULES)
    for key in ("batch_size", "num_train_steps", "checkpoint_every_steps", "eval_every_steps",
                "log_every_steps", "optimizer.learning_rate", "data.crop_size"):
        config_utils.check_positive(config, key)
    for key in ("optimizer.momentum", "optimizer.weight_decay", "optimizer.warmup_steps",
                "data.num_val_videos", "data.num_workers", "data.num_threads"):
        config_utils.check_positive(config, key, allow_zero=True)
    config_utils.check_positive(config, "keep_checkpoints")
    try:
        cloze.validate_config(config.cloze)
    except ValueError as e:
        raise config_utils.ConfigError(f"config.cloze: {e}") from None
    if config.batch_size % jax.device_count():
        raise config_utils.ConfigError(
            f"config.batch_size={config.batch_size} must be divisible by the number of devices "
            f"({jax.device_count()})"
        )


def effective_learning_rate(config: ml_collections.ConfigDict) -> float:
    """The base rate, scaled linearly with the batch when `optimizer.scale_with_batch` is set."""
    lr = config.optimizer.learning_rate
    if config.optimizer.get("scale_with_batch", False):
        lr *= config.batch_size / config.optimizer.base_batch_size
    return lr


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


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """PyTorch SGD: L2 weight decay added to the gradient before momentum (SPEC 3)."""
    return optax.chain(
        optax.add_decayed_weights(config.optimizer.weight_decay),
        optax.sgd(learning_rate_schedule(config), momentum=config.optimizer.momentum or None),
    )


def create_model(
    config: ml_collections.ConfigDict, *, rngs: nnx.Rngs, bn_axis_name: str | None = None
) -> models.VCPModel:
    """Backbone + VCP head as the config says."""
    dtype = DTYPES[config.model.dtype]
    backbone = models.create_backbone(
        config.model.arch, rngs=rngs, width=config.model.width, dtype=dtype,
        bn_axis_name=bn_axis_name, conv_impl=config.model.get("conv_impl", "auto"),
    )
    return models.VCPModel(
        backbone, num_clips=config.cloze.num_clips, num_classes=cloze.num_classes(config.cloze),
        rngs=rngs, dtype=dtype,
    )


# --------------------------------------------------------------------------------------------
# Train state and steps
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; a pytree, so it is jitted, sharded and checkpointed whole."""

    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key: the cloze keys of step s are folded from (rng, s)


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The model structure (train and eval mode) and optimizer that the steps close over."""

    train_graphdef: Any
    eval_graphdef: Any
    tx: optax.GradientTransformation
    cloze_config: ml_collections.ConfigDict
    num_classes: int
    axis_name: str | None


def create_train_state(
    config: ml_collections.ConfigDict, *, bn_axis_name: str | None = None
) -> tuple[TrainState, StepFns]:
    """A fresh state (PyTorch-style init from `config.seed`) and the step closures."""
    rngs = nnx.Rngs(params=config.seed)
    model = create_model(config, rngs=rngs, bn_axis_name=bn_axis_name)
    model.eval()
    eval_graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.train()
    train_graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = create_optimizer(config)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(config.seed + 1),
    )
    fns = StepFns(train_graphdef, eval_graphdef, tx, config.cloze, cloze.num_classes(config.cloze),
                  bn_axis_name)
    return state, fns


def cloze_per_sample(
    keys: jax.Array, batch: dict[str, jax.Array], config: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array]:
    """`make_cloze` with one key per tuple, so a tuple's option does not depend on its batch."""

    def one(key: jax.Array, clips: jax.Array, remote: jax.Array, has_remote: jax.Array):
        tuples, labels = cloze.make_cloze(key, clips[None], remote[None], has_remote[None], config)
        return tuples[0], labels[0]

    return jax.vmap(one)(keys, batch["clips"], batch["remote"], batch["has_remote"])


def _to_input(tuples: jax.Array) -> jax.Array:
    """uint8 frames to [0, 1] on the device (the host ships 4x fewer bytes than float32)."""
    return tuples.astype(jnp.float32) / 255.0


def _positions(batch_size: int, axis_name: str | None) -> jax.Array:
    """Each tuple's position in the global batch (pmap: offset by the device's index)."""
    local = jnp.arange(batch_size)
    if axis_name is None:
        return local
    return jax.lax.axis_index(axis_name) * batch_size + local


def train_step(
    state: TrainState, batch: dict[str, jax.Array], fns: StepFns
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a batch of tuples: cloze on device, forward, backward, update."""
    step_key = jax.random.fold_in(state.rng, state.step)
    positions = _positions(batch["clips"].shape[0], fns.axis_name)
    keys = jax.vmap(lambda p: jax.random.fold_in(step_key, p))(positions)
    tuples, labels = cloze_per_sample(keys, batch, fns.cloze_config)
    inputs = _to_input(tuples)

    def loss_fn(params: nnx.State) -> tuple[jax.Array, tuple[jax.Array, nnx.State]]:
        model = nnx.merge(fns.train_graphdef, params, state.batch_stats, copy=True)
        logits = model(inputs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, nnx.state(model, nnx.BatchStat))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    if fns.axis_name is not None:
        grads = jax.lax.pmean(grads, fns.axis_name)
        loss, accuracy = jax.lax.pmean((loss, accuracy), fns.axis_name)
    updates, opt_state = fns.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, {"loss": loss, "accuracy": accuracy}


def eval_step(
    state: TrainState, batch: dict[str, jax.Array], fns: StepFns
) -> dict[str, jax.Array]:
    """Sums over the valid tuples of a batch: loss, correct, per-option correct and count."""
    base = jax.random.PRNGKey(EVAL_CLOZE_SEED)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(batch["index"])
    tuples, labels = cloze_per_sample(keys, batch, fns.cloze_config)
    model = nnx.merge(fns.eval_graphdef, state.params, state.batch_stats, copy=True)
    logits = model(_to_input(tuples))
    valid = batch["valid"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * valid
    onehot = jax.nn.one_hot(labels, fns.num_classes) * valid[:, None]
    sums = {
        "loss": jnp.sum(loss * valid),
        "correct": jnp.sum(correct),
        "count": jnp.sum(valid),
        "has_remote": jnp.sum(batch["has_remote"].astype(jnp.float32) * valid),
        "option_correct": jnp.sum(onehot * correct[:, None], axis=0),
        "option_count": jnp.sum(onehot, axis=0),
    }
    if fns.axis_name is not None:
        sums = jax.lax.psum(sums, fns.axis_name)
    return sums


# --------------------------------------------------------------------------------------------
# Evaluation and the loop
# --------------------------------------------------------------------------------------------


def summarize_eval(sums: dict[str, np.ndarray], class_names: tuple[str, ...]) -> dict[str, float]:
    """Mean loss, VCP accuracy, per-option accuracy and the option histogram of the held-out set."""
    count = max(float(sums["count"]), 1.0)
    metrics = {
        "val_loss": float(sums["loss"]) / count,
        "val_vcp_accuracy": float(sums["correct"]) / count,
        "val_tuples": int(sums["count"]),
        "val_has_remote_fraction": float(sums["has_remote"]) / count,
    }
    for name, correct, total in zip(
        class_names, sums["option_correct"], sums["option_count"], strict=True
    ):
        total = float(total)
        metrics[f"val_accuracy/{name}"] = float(correct) / total if total else float("nan")
        metrics[f"val_option_fraction/{name}"] = total / count
    return metrics


def evaluate(
    state: Any,
    data: input_pipeline.PretrainData,
    eval_fn: Callable[..., Any],
    strategy: parallel.Strategy,
    config: ml_collections.ConfigDict,
) -> dict[str, float]:
    """VCP loss and accuracy on every held-out tuple (deterministic)."""
    totals: dict[str, np.ndarray] | None = None
    for batch in input_pipeline.make_iterator(data.val, config, prefetch_processes=False):
        sums = strategy.fetch(eval_fn(state, strategy.put_batch(batch)))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if totals is None:
        return {}
    return summarize_eval(totals, cloze.class_names(config.cloze))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Pretrains with VCP; resumes from the last checkpoint in `workdir`; returns final metrics."""
    if config.get("distributed", False):
        jax.distributed.initialize()
    validate_config(config)
    workdir = Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0

    input_pipeline.ensure_dataset(config.data)
    data = input_pipeline.pretrain_data(
        config, process_index=jax.process_index(), process_count=jax.process_count()
    )
    if is_main:
        print(f"pretraining on {data.num_train_videos} videos, validating on "
              f"{data.num_val_videos} ({data.num_too_short} too short for a tuple, skipped)")

    strategy = parallel.make_strategy(config.parallel)
    state, fns = create_train_state(config, bn_axis_name=strategy.axis_name)
    train_fn = strategy.compile(functools.partial(train_step, fns=fns), donate_state=True)
    eval_fn = strategy.compile(functools.partial(eval_step, fns=fns), donate_state=False)

    train_iter = input_pipeline.make_iterator(data.train, config)
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints", config)
    state, start_step = ckpt.restore_latest(state, train_iter)
    if start_step:
        if is_main:
            print(f"resumed from the checkpoint of step {start_step} in {ckpt.directory}")
    state = strategy.put_state(state)

    writer = checkpointing.metric_writer(workdir) if is_main else None
    bar = tqdm.tqdm(total=config.num_train_steps, initial=start_step, unit="step",
                    desc="VCP pretraining", disable=not is_main, dynamic_ncols=True)
    lr_schedule = learning_rate_schedule(config)  # for logging; the optimizer holds its own
    val_metrics: dict[str, float] = {}
    recent: list[dict[str, np.ndarray]] = []
    step_start = time.perf_counter()
    for step in range(start_step + 1, config.num_train_steps + 1):
        batch = strategy.put_batch(next(train_iter))
        state, metrics = train_fn(state, batch)
        recent.append(metrics)
        bar.update()
        if step % config.log_every_steps == 0 or step == config.num_train_steps:
            fetched = [strategy.fetch(m) for m in recent]
            summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
            summary["steps_per_second"] = len(recent) / (time.perf_counter() - step_start)
            summary["learning_rate"] = float(lr_schedule(step - 1))
            bar.set_postfix(loss=f"{summary['loss']:.3f}", acc=f"{summary['accuracy']:.3f}")
            checkpointing.write_scalars(writer, step, summary, prefix="train/")
            recent, step_start = [], time.perf_counter()
        is_last = step == config.num_train_steps
        if step % config.eval_every_steps == 0 or is_last:
            val_metrics = evaluate(state, data, eval_fn, strategy, config)
            checkpointing.write_scalars(writer, step, val_metrics)
            bar.write(f"step {step}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in val_metrics.items() if "/" not in k))
        if step % config.checkpoint_every_steps == 0 or is_last:
            ckpt.save(step, strategy.get_state(state), train_iter,
                      metrics=val_metrics if step % config.eval_every_steps == 0 or is_last
                      else None)
    bar.close()
    ckpt.wait()
    if not val_metrics:  # resumed at the end: evaluate the final state once more
        val_metrics = evaluate(state, data, eval_fn, strategy, config)
    final = {
        "step": config.num_train_steps,
        **val_metrics,
        "best_checkpoint_step": ckpt.best_step(),
        "num_train_videos": data.num_train_videos,
        "num_val_videos": data.num_val_videos,
        "num_too_short": data.num_too_short,
        "chance_accuracy": 1.0 / fns.num_classes,
    }
    if is_main:
        (workdir / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        per_option = ", ".join(
            f"{k.split('/', 1)[1]} {v:.2f}" for k, v in val_metrics.items()
            if k.startswith("val_accuracy/")
        )
        print(f"held-out VCP accuracy {final.get('val_vcp_accuracy', float('nan')):.3f} "
              f"(chance {final['chance_accuracy']:.3f}); per option: {per_option}\n"
              f"metrics: {workdir / 'metrics.json'}")
        if writer is not None:
            writer.close()
    ckpt.close()
    return final
