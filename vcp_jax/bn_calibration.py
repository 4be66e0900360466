"""BatchNorm statistics re-estimated on training clips before a frozen evaluation (AdaBN-style).

A frozen backbone normalises with its running statistics. A random backbone's were never
estimated (mean 0, var 1), so its pooled features are tiny (rms ~0.03) and nearly parallel for
different videos (cosine ~0.99): the VCP probe, linear evaluation and retrieval of a random
backbone would then measure the missing BatchNorm calibration, not the representation.
`estimate_batch_stats` re-estimates them with no-gradient, training-mode forward passes over a
stream of batches; parameters are untouched.

What is estimated: the *population* statistics, the cumulative average over the batches of each
batch's mean and unbiased variance (PyTorch's `momentum=None`; fvcore's precise BN), not the
momentum EMA that training keeps (that would weigh the last few batches most). Each layer sees
the activations of training mode (the layers below normalised with their batch statistics), as
in PyTorch and AdaBN.

Choices:
- One statistic group over all the clips of a batch (`BatchNorm.batch_groups = 1`), also for the
  VCP model whose training uses one group per clip position: the statistics are then those of
  every clip the evaluation feeds the backbone (context clips and options alike).
- The BatchNorms' `axis_name` is set to the strategy's (pmap: the statistics of the global
  batch; jit on a mesh: the batch is one global array), whatever the model was built with, so a
  model built without an axis name (retrieval's embedder) is calibrated under pmap too.
- The pass is compiled once by the strategy and run on every batch (same shapes); the running
  average is carried on the devices and fetched once at the end.

`recalibrate` is what the frozen stages call: it applies `config.bn_recalibration` ('auto':
only a random backbone; 'always'; 'never') and `config.bn_recalibration_clips`, prints one
console line and returns the record the stage writes to its metrics (`bn_statistics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vcp_jax import config_utils, input_pipeline, models, parallel, reporting

MODES = ("auto", "always", "never")
# Where a frozen stage's backbone comes from: random init, `init_from`, or the run's own
# checkpoint (a resumed run: its statistics are those its head trained with, never re-estimated).
ORIGINS = ("random", "init_from", "resumed")

# forward(model, batch, batch_number) runs the model (in training mode) on a placed batch; its
# output is ignored, what counts are the BatchNorm statistics it leaves in the model.
Forward = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], Any]


def validate_config(config: ml_collections.ConfigDict) -> None:
    """`bn_recalibration` and `bn_recalibration_clips`; a `ConfigError` names the key."""
    config_utils.check_choice(config, "bn_recalibration", MODES)
    clips = config_utils.check_positive(config, "bn_recalibration_clips")
    if not isinstance(clips, int) or isinstance(clips, bool):
        raise config_utils.ConfigError(
            f"config.bn_recalibration_clips={clips!r} must be a whole number of clips")


def _calibration_module(model: nnx.Module, axis_name: str | None) -> tuple[nnx.Module, int]:
    """A copy of `model` in training mode whose BatchNorms each leave one batch's statistics
    (momentum 0: running <- batch mean and unbiased variance), one group, `axis_name`."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)  # new module objects: `model` keeps its attributes
    copy.train()
    count = 0
    for _, module in nnx.iter_modules(copy):
        if isinstance(module, models.BatchNorm):
            module.momentum = 0.0
            module.batch_groups = 1
            module.axis_name = axis_name
            count += 1
    return copy, count


def estimate_batch_stats(
    model: nnx.Module,
    batches: Iterable[Mapping[str, np.ndarray]],
    forward: Forward,
    strategy: parallel.Strategy,
) -> nnx.State:
    """`model`'s BatchNorm statistics re-estimated on `batches`: `nnx.state(model, nnx.BatchStat)`
    with every `models.BatchNorm`'s mean and var the cumulative average over the batches of the
    batch's mean and unbiased variance (host numpy arrays).

    `batches` are host batches as the stage's training stream yields them (this host's slice of
    each global batch; no padding: every example counts); `forward(model, batch, i)` runs the
    model on the placed batch `i` (0, 1, ...) with the stage's input conversion. Nothing is
    differentiated and `model` itself is not modified. A model without BatchNorm gets its
    (empty) statistics back unchanged; no batch is a `ValueError`.
    """
    calib, num_bn = _calibration_module(model, strategy.axis_name)
    graphdef, stats, rest = nnx.split(calib, nnx.BatchStat, ...)
    host_stats = jax.tree.map(np.asarray, stats)
    if num_bn == 0:
        return host_stats

    def step(carry: dict[str, Any], batch: Mapping[str, jax.Array]) -> dict[str, Any]:
        m = nnx.merge(graphdef, carry["initial"], carry["rest"])  # training mode, momentum 0
        forward(m, batch, carry["count"])
        batch_stats = nnx.state(m, nnx.BatchStat)  # this batch's mean and unbiased variance
        # PyTorch's momentum=None: running <- (1 - 1/n) running + (1/n) batch, n = 1, 2, ...
        factor = 1.0 / (carry["count"] + 1).astype(jnp.float32)
        average = jax.tree.map(lambda a, b: (1.0 - factor) * a + factor * b,
                               carry["average"], batch_stats)
        return {**carry, "average": average, "count": carry["count"] + 1}

    # Zeros, not the model's statistics, as the placeholders that momentum 0 multiplies by 0:
    # a checkpoint's non-finite statistics would otherwise turn the estimate into NaN.
    zeros = jax.tree.map(np.zeros_like, host_stats)
    carry = {"initial": zeros, "rest": rest, "average": jax.tree.map(np.copy, zeros),
             "count": np.zeros((), np.int32)}
    # Not donated: the placed parameters may be the caller's own arrays (jit on one device).
    compiled = strategy.compile(step, donate_state=False)
    placed = strategy.put_state(carry)
    for batch in batches:
        placed = compiled(placed, strategy.put_batch(dict(batch)))
    result = strategy.fetch({"average": placed["average"], "count": placed["count"]})
    if int(result["count"]) == 0:
        raise ValueError("no batch to estimate the BatchNorm statistics on")
    return result["average"]


def num_batches(clips: int, clips_per_batch: int) -> int:
    """Global batches of `clips_per_batch` clips that hold at least `clips` clips."""
    return max(1, math.ceil(clips / clips_per_batch))


def recalibrate(
    config: ml_collections.ConfigDict,
    model: nnx.Module,
    stream: Any,
    forward: Forward,
    strategy: parallel.Strategy,
    *,
    clips_per_batch: int,
    origin: str,
) -> tuple[nnx.State | None, dict[str, Any]]:
    """What a frozen stage does with its backbone's statistics: (new statistics or None, record).

    `config.bn_recalibration`: 'auto' re-estimates them for a random backbone (`origin`
    'random') and keeps a checkpoint's (`origin` 'init_from'); 'always' re-estimates them for
    both; 'never' keeps them (a random backbone's are the initial mean 0, var 1, the reference
    code's protocol). A resumed run (`origin` 'resumed') always keeps its checkpoint's: its head
    trained with them. Re-estimation runs `estimate_batch_stats` on the first
    `ceil(bn_recalibration_clips / clips_per_batch)` global batches of `stream` (the stage's
    training batches, a `grain.MapDataset`), each with `clips_per_batch` clips the backbone sees.

    The record, written to the stage's metrics as `bn_statistics`: `mode`, `recalibrated`,
    `statistics` ('re-estimated', 'from checkpoint' or 'initial (never estimated)'), `backbone`
    (the origin) and, when re-estimated, `clips` and `batches`. One console line says the same.
    """
    validate_config(config)
    if origin not in ORIGINS:
        raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}")
    mode = config.bn_recalibration
    described = {"random": "random backbone", "init_from": "init_from backbone",
                 "resumed": "resumed run"}[origin]
    record: dict[str, Any] = {"mode": mode, "recalibrated": False, "backbone": origin}
    if origin == "resumed" or mode == "never" or (mode == "auto" and origin == "init_from"):
        if origin == "random":
            record["statistics"] = "initial (never estimated)"
            reporting.console(f"BatchNorm statistics: initial, never estimated (mean 0, var 1; "
                              f"bn_recalibration={mode!r})")
        else:
            record["statistics"] = "from checkpoint"
            reporting.console(f"BatchNorm statistics: from the checkpoint ({described}; "
                              f"bn_recalibration={mode!r})")
        return None, record
    n = num_batches(config.bn_recalibration_clips, clips_per_batch)
    iterator = input_pipeline.make_iterator(stream[:n], config, prefetch_processes=False)
    stats = estimate_batch_stats(model, iterator, forward, strategy)
    record.update(recalibrated=True, statistics="re-estimated", clips=n * clips_per_batch,
                  batches=n)
    reporting.console(f"BatchNorm statistics re-estimated on {n * clips_per_batch} training "
                      f"clips ({described}; bn_recalibration={mode!r})")
    return stats, record
