"""VCOP, video clip order prediction ([V] Xu et al., CVPR 2019), as a pretraining task.

A tuple is `num_clips = 3` clips of `clip_len = 16` frames with `interval = 8` frames between
them, sampled exactly like VCP's context clips (offsets 0, 24, 48; each clip its own random
crop), so `input_pipeline.TupleSampler` with `tuple_spec(config)` samples it. The clips are put
in one of the `3! = 6` orders and the network predicts which (docs/method.md §9):

- order labels: `ORDERS = list(itertools.permutations(range(3)))`; label `k` means position `p`
  of the shuffled tuple holds clip `ORDERS[k][p]`, as in [V] (`datasets/ucf101.py`,
  `UCF101VCOPDataset`: `random.shuffle(clip_and_order)`, then `train_vcop.py`'s
  `order_class_index(order) = list(itertools.permutations(range(n))).index(tuple(order))`);
- the shuffle is drawn on the device inside the step (`shuffle_tuples`), one key per tuple folded
  from (step, position in the global batch) as `cloze` is (`trainer.example_keys`), so jit, pmap
  and one device draw the same orders; held-out tuples use `fold_in(PRNGKey(EVAL_ORDER_SEED),
  example index)` (reproducible, [V] seeds its test shuffle with the index too);
- the network ([V] and [U] `models/vcopn.py`, `VCOPN`): the shared backbone on each clip, with
  BatchNorm statistics per clip position exactly as `models.VCPModel` (the reference calls the
  backbone once per position, `for i in range(self.tuple_len)`); for each pair `i < j` in the
  order (0,1), (0,2), (1,2): `relu(fc7(concat(f_i, f_j)))`, `fc7` 2F -> 512; the 3 pair vectors
  concatenated, dropout 0.5, `fc8` 1536 -> 6; cross-entropy on the order label.
- residual input (`model.modality='res'`): [U]'s `VCOPN(res=True)` formula `x - roll(x, 1, T)`
  by default (`modality.residual(..., 'vcop')`), applied to the shuffled clips, on the device.

Interface, for the stage that wires it (same batch layout as `pretrain.py`):

- batch: `{'clips': (B, N, T, H, W, C) uint8, ...}` (the tuple sampler's; `remote` and
  `has_remote` are ignored), plus `index` (B,) and `valid` (B,) for evaluation batches. With
  `model.residual_edge='extra_frame'`, T is `clip_len + 1` (see `modality`).
- `create_model(config, rngs=..., bn_axis_name=None) -> VCOPModel` (`config.vcop`,
  `config.model.{arch, width, dtype, bn_stats, conv_impl}`);
- `create_train_state(config, bn_axis_name=None, frozen_backbone=False) -> (TrainState,
  StepContext)` with `ctx.task` a `Task` (num_clips, num_classes, modality);
- `train_step(state, batch, ctx) -> (state, {'loss', 'accuracy', 'grad_norm'})`,
  `eval_step(state, batch, ctx) -> sums` with per-order counts, which the stage's
  `pretrain.summarize_eval` turns into per-order accuracy (`{prefix}_vcop_accuracy`,
  `{prefix}_accuracy/012`, ...);
  `calibration_forward` for `bn_calibration`; `init_head(state, head)` puts a converted
  reference head (`convert_torch.load_head`) into a fresh state;
- `VCOPModel(tuples, dropout_keys=None) -> (B, N!) logits`: in training mode dropout needs one
  key per tuple (`dropout_keys` (B,)), so the masks too are the same under jit, pmap and one
  device; in inference mode (`model.eval()`) there is no dropout.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from vcp_jax import backbone as backbone_lib
from vcp_jax import config_utils, input_pipeline, models, trainer
from vcp_jax import modality as modality_lib

ORDERS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(3)))
"""The 6 orders of a 3-clip tuple, in `itertools.permutations` order: label k is ORDERS[k]."""

EVAL_ORDER_SEED = 0  # held-out orders: fold_in(PRNGKey(0), example index)
HIDDEN = 512  # fc7's width in [V] (`nn.Linear(self.feature_size*2, 512)`)
DROPOUT = 0.5  # [V]: `nn.Dropout(p=0.5)` before fc8
_ORDER_STREAM, _DROPOUT_STREAM = 0, 1  # fold_in(example key, stream)

Dtype = models.Dtype


def orders(num_clips: int = 3) -> np.ndarray:
    """`(num_clips!, num_clips)` int32: row k is the k-th of `itertools.permutations`."""
    return np.array(list(itertools.permutations(range(num_clips))), np.int32)


def order_names(num_clips: int = 3) -> tuple[str, ...]:
    """Class names: '012', '021', '102', '120', '201', '210' for 3 clips."""
    return tuple("".join(map(str, o)) for o in orders(num_clips))


def num_classes(num_clips: int = 3) -> int:
    return math.factorial(num_clips)


# ----------------------------------------------------------------------------- config, sampling


def default_config() -> ml_collections.ConfigDict:
    """The `vcop` section of a VCOP pretraining config ([V]'s `--cl 16 --it 8 --tl 3`)."""
    config = ml_collections.ConfigDict()
    config.clip_len = 16  # frames per clip ([V] --cl)
    config.interval = 8  # frames between consecutive clips of a tuple ([V] --it)
    config.num_clips = 3  # clips per tuple ([V] --tl); num_clips! orders to tell apart
    config.eval_tuples_per_video = 1  # held-out tuples per validation video (orders by index)
    return config


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming `config.vcop.<key>` for anything not allowed (and checks
    `model.modality`)."""
    section = config_utils.get(config, "vcop")
    for key, minimum, maximum in (("clip_len", 1, None), ("interval", 0, None),
                                  ("num_clips", 2, 5)):
        value = section.get(key)
        if (isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum
                or (maximum is not None and value > maximum)):
            bound = f"between {minimum} and {maximum}" if maximum else f">= {minimum}"
            raise config_utils.ConfigError(
                f"config.vcop.{key}={value!r} must be an integer {bound}")
    config_utils.check_choice(config, "model.bn_stats", models.BN_STATS)
    modality_lib.validate(config)


def clip_offsets(section: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Start of each clip relative to the tuple start: `i * (clip_len + interval)` = 0, 24, 48
    ([V]: `clip_start = clip_start + self.clip_len + self.interval`)."""
    step = section.clip_len + section.interval
    return tuple(i * step for i in range(section.num_clips))


def tuple_spec(config: ml_collections.ConfigDict) -> input_pipeline.TupleSpec:
    """Where a VCOP tuple's clips lie: `TupleSampler(source, tuple_spec(config))` samples it
    (span `3 * 16 + 2 * 8 = 64` frames, [V]'s `tuple_total_frames`; no remote clip).

    With residual input from T + 1 frames (`model.residual_edge='extra_frame'`) each clip starts
    one frame earlier and is one frame longer; the tuple start is then drawn from frame 1 on,
    which the sampler does not do yet: the stages refuse 'extra_frame' for now
    (`backbone.resolve_init`).
    """
    section = config.vcop
    return input_pipeline.TupleSpec(
        clip_len=section.clip_len,
        offsets=clip_offsets(section),
        remote_gap=0,
        crop_size=config.data.crop_size,
        need_remote=False,
    )


# ----------------------------------------------------------------------------- the shuffle


def example_streams(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-tuple keys (B,) -> (order keys, dropout keys), independent streams of each."""
    fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    return fold(keys, _ORDER_STREAM), fold(keys, _DROPOUT_STREAM)


def draw_orders(keys: jax.Array, num_clips: int = 3) -> jax.Array:
    """One uniform order label per key: (B,) keys -> (B,) int32 in [0, num_clips!)."""
    n = num_classes(num_clips)
    return jax.vmap(lambda k: jax.random.randint(k, (), 0, n, jnp.int32))(keys)


def reorder(tuples: jax.Array, labels: jax.Array) -> jax.Array:
    """`tuples` (B, N, ...) in the orders `labels` (B,): out[b, p] = tuples[b, ORDERS[l_b][p]].

    One gather, any dtype (reorder the uint8 clips before converting them to float).
    """
    n = tuples.shape[1]
    table = jnp.asarray(orders(n))[labels]  # (B, N)
    return jax.vmap(lambda t, o: t[o])(tuples, table)


def shuffle_tuples(keys: jax.Array, tuples: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draws each tuple's order from its key and applies it: (B,) keys, (B, N, ...) tuples ->
    (shuffled tuples, (B,) int32 labels)."""
    labels = draw_orders(keys, tuples.shape[1])
    return reorder(tuples, labels), labels


# ----------------------------------------------------------------------------- the network


def dropout_masks(keys: jax.Array, size: int, rate: float) -> jax.Array:
    """(B,) keys -> (B, size) bool keep-masks, `P(keep) = 1 - rate`, one per tuple."""
    return jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, (size,)))(keys)


class VCOPHead(nnx.Module):
    """[V]'s pairwise head: `(B, N, F)` clip features -> `(B, N!)` order logits.

    For each pair i < j (lexicographic): `relu(fc7(concat(f_i, f_j)))`; the pair vectors are
    concatenated in that order, dropped out (training mode, rate 0.5) and mapped by `fc8`.
    """

    def __init__(
        self,
        num_features: int,
        num_clips: int = 3,
        *,
        hidden: int = HIDDEN,
        dropout_rate: float = DROPOUT,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
        self.num_clips = num_clips
        self.pairs = tuple(itertools.combinations(range(num_clips), 2))
        self.fc7 = models.linear(2 * num_features, hidden, dtype=dtype, rngs=rngs)
        self.fc8 = models.linear(hidden * len(self.pairs), num_classes(num_clips), dtype=dtype,
                                 rngs=rngs)
        self.dropout_rate = dropout_rate
        self.deterministic = False  # NNX's model.train() / model.eval() set it

    def __call__(self, clip_features: jax.Array, dropout_keys: jax.Array | None = None
                 ) -> jax.Array:
        b, n, _ = clip_features.shape
        assert n == self.num_clips, (clip_features.shape, self.num_clips)
        first = np.array([i for i, _ in self.pairs])
        second = np.array([j for _, j in self.pairs])
        pairs = jnp.concatenate([clip_features[:, first], clip_features[:, second]], -1)
        h = nnx.relu(self.fc7(pairs)).reshape(b, -1)  # (B, P * hidden), pairs in order
        if not self.deterministic and self.dropout_rate > 0:
            if dropout_keys is None:
                raise ValueError("VCOPHead in training mode needs dropout_keys, one per tuple "
                                 "(or model.eval())")
            keep = dropout_masks(dropout_keys, h.shape[-1], self.dropout_rate)
            h = jnp.where(keep, h * (1.0 / (1.0 - self.dropout_rate)), 0).astype(h.dtype)
        logits = self.fc8(h)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # as VCPHead


class VCOPModel(nnx.Module):
    """Backbone + VCOP head: `(B, N, T, H, W, C)` shuffled tuples -> `(B, N!)` logits.

    The backbone runs once on the `B * N` clips flattened tuple-major, with BatchNorm statistics
    per clip position (`bn_stats='per_clip'`, [V]/[U]: one backbone call per position) through
    `models.set_bn_groups`, the mechanism of `models.VCPModel`; 'pooled' is one group.
    Parameters: `backbone/...`, `head/fc7/{kernel,bias}`, `head/fc8/{kernel,bias}` (the
    reference's `base_network.*`, `fc7.*`, `fc8.*`).
    """

    def __init__(
        self,
        backbone: nnx.Module,
        num_clips: int = 3,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        bn_stats: str = "per_clip",
        hidden: int = HIDDEN,
        dropout_rate: float = DROPOUT,
    ):
        if bn_stats not in models.BN_STATS:
            raise ValueError(f"bn_stats must be one of {models.BN_STATS}, got {bn_stats!r}")
        self.backbone = backbone
        self.num_clips = num_clips
        self.bn_stats = bn_stats
        models.set_bn_groups(backbone, num_clips if bn_stats == "per_clip" else 1)
        self.head = VCOPHead(backbone.num_features, num_clips, hidden=hidden,
                             dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)

    def features(self, tuples: jax.Array) -> jax.Array:
        """`(B, N, T, H, W, C)` -> `(B, N, F)` clip features (row b * N + n: BN group n)."""
        b, n = tuples.shape[:2]
        assert n == self.num_clips, (tuples.shape, self.num_clips)
        return self.backbone(tuples.reshape(b * n, *tuples.shape[2:])).reshape(b, n, -1)

    def __call__(self, tuples: jax.Array, dropout_keys: jax.Array | None = None) -> jax.Array:
        return self.head(self.features(tuples), dropout_keys)


# ----------------------------------------------------------------------------- state and steps


@dataclasses.dataclass(frozen=True)
class Task:
    """VCOP's static settings, closed over by the steps (`StepContext.task`)."""

    num_clips: int
    num_classes: int
    modality: modality_lib.InputModality


def create_model(
    config: ml_collections.ConfigDict, *, rngs: nnx.Rngs, bn_axis_name: str | None = None
) -> VCOPModel:
    """Backbone + VCOP head as the config says (`config.model`, `config.vcop.num_clips`)."""
    dtype = models.DTYPES[config.model.dtype]
    backbone = models.create_backbone(
        config.model.arch, rngs=rngs, width=config.model.width, dtype=dtype,
        bn_axis_name=bn_axis_name, conv_impl=config.model.conv_impl,
    )
    return VCOPModel(backbone, config.vcop.num_clips, rngs=rngs, dtype=dtype,
                     bn_stats=config.model.bn_stats)


def create_task(config: ml_collections.ConfigDict) -> Task:
    n = config.vcop.num_clips
    return Task(n, num_classes(n), modality_lib.from_config(config, pretext="vcop"))


def create_train_state(
    config: ml_collections.ConfigDict,
    *,
    bn_axis_name: str | None = None,
    frozen_backbone: bool = False,
) -> tuple[trainer.TrainState, trainer.StepContext]:
    """A fresh state (PyTorch-style init from `config.seed`) and the step context.

    A frozen backbone (a VCOP probe) makes the whole model run in inference mode, so the head
    trains without dropout.
    """
    validate_config(config)
    model = create_model(config, rngs=nnx.Rngs(params=config.seed), bn_axis_name=bn_axis_name)
    return trainer.create_train_state(
        model, config, axis_name=bn_axis_name, task=create_task(config),
        frozen=trainer.path_has(backbone_lib.BACKBONE) if frozen_backbone else None,
    )


def loss_and_logits(model: nnx.Module, inputs: jax.Array, labels: jax.Array,
                    dropout_keys: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of the order labels, and the logits (the training loss)."""
    logits = model(inputs, dropout_keys)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


def prepare(batch: dict[str, jax.Array], keys: jax.Array, task: Task
            ) -> tuple[jax.Array, jax.Array]:
    """The step's input: shuffled tuples as the backbone reads them (float, modality applied)
    and their order labels, from one key per tuple."""
    tuples, labels = shuffle_tuples(keys, batch["clips"])
    return task.modality(models.to_input(tuples)), labels


def train_step(
    state: trainer.TrainState, batch: dict[str, jax.Array], ctx: trainer.StepContext
) -> tuple[trainer.TrainState, dict[str, jax.Array]]:
    """One SGD step: orders and dropout masks drawn on the device, forward, backward, update."""
    keys = trainer.example_keys(state.rng, state.step, batch["clips"].shape[0], ctx.axis_name)
    order_keys, dropout_keys = example_streams(keys)
    inputs, labels = prepare(batch, order_keys, ctx.task)

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        return loss_and_logits(model, inputs, labels, dropout_keys)

    state, loss, logits, grad_norm = trainer.update_with_norm(state, ctx, loss_fn)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm}
    return state, trainer.reduce_metrics(metrics, ctx)


def eval_keys(index: jax.Array) -> jax.Array:
    """Held-out tuples' order keys from their example indices (B,)."""
    base = jax.random.PRNGKey(EVAL_ORDER_SEED)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(index)


def eval_step(
    state: trainer.TrainState, batch: dict[str, jax.Array], ctx: trainer.StepContext
) -> dict[str, jax.Array]:
    """Sums over the valid tuples of a batch: loss, correct, per-order counts, confusion."""
    inputs, labels = prepare(batch, eval_keys(batch["index"]), ctx.task)
    logits = trainer.eval_model(state, ctx)(inputs)
    return order_sums(logits, labels, batch["valid"], ctx.task.num_classes, ctx)


def order_sums(logits: jax.Array, labels: jax.Array, valid: jax.Array, n_classes: int,
               ctx: trainer.StepContext | None = None) -> dict[str, jax.Array]:
    """Per-batch sums for `pretrain.summarize_eval` (psum'd over the pmap axis of `ctx`)."""
    valid = valid.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    predicted = jnp.argmax(logits, -1)
    correct = (predicted == labels).astype(jnp.float32) * valid
    truth = jax.nn.one_hot(labels, n_classes) * valid[:, None]
    sums = {
        "loss": jnp.sum(loss * valid),
        "correct": jnp.sum(correct),
        "count": jnp.sum(valid),
        "order_correct": jnp.sum(truth * correct[:, None], axis=0),
        "order_count": jnp.sum(truth, axis=0),
        "confusion": truth.T @ jax.nn.one_hot(predicted, n_classes),  # [true, predicted]
    }
    return sums if ctx is None else trainer.sum_metrics(sums, ctx)


def calibration_forward(
    model: nnx.Module, batch: dict[str, jax.Array], index: jax.Array, *,
    ctx: trainer.StepContext, rng: jax.Array,
) -> jax.Array:
    """The backbone on the clips of batch `index` as `train_step` draws them at step `index`
    (same orders and modality), for `bn_calibration`: `(B * N, F)`."""
    keys = trainer.example_keys(rng, index, batch["clips"].shape[0], ctx.axis_name)
    inputs, _ = prepare(batch, example_streams(keys)[0], ctx.task)
    return model.backbone(inputs.reshape(-1, *inputs.shape[2:]))


def init_head(state: trainer.TrainState, head: dict, *, source: str = "init_from"
              ) -> trainer.TrainState:
    """`state` with its VCOP head (`head/fc7`, `head/fc8`) taken from `head`, the nested dict
    `convert_torch.load_head` returns (a converted [V] / [U] VCOP model continues pretraining
    with its own head). Every key and shape must fit; an error names the key."""
    pure = nnx.to_pure_dict(state.params)
    flat_target = backbone_lib.flatten(pure["head"])
    flat_loaded = backbone_lib.flatten(head)
    if set(flat_target) != set(flat_loaded):
        raise config_utils.ConfigError(
            f"{source}: the head {sorted(flat_loaded)} does not fit this VCOP head "
            f"{sorted(flat_target)}")
    for key, value in flat_target.items():
        if value.shape != flat_loaded[key].shape:
            raise config_utils.ConfigError(
                f"{source}: head {key!r} has shape {flat_loaded[key].shape}, this VCOP head "
                f"expects {value.shape} (config.vcop.num_clips, model.width)")
    pure["head"] = jax.tree.map(lambda t, v: np.asarray(v, np.asarray(t).dtype), pure["head"],
                                head)
    params = jax.tree.map(lambda x: x, state.params)
    nnx.replace_by_pure_dict(params, pure)
    return state.replace(params=params)
