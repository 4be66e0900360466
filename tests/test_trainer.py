"""The stage skeleton and its loop, in seconds: a tiny model, a fake step and a fake evaluation.

`trainer.run_stage` runs here exactly as pretraining, fine-tuning, linear evaluation and the probe
run it (the real strategy on the 8 simulated devices, real checkpoints, the real init order),
with a two-layer model and a loss on constant batches instead of a video network: the cadence of
evaluations and saves, the best checkpoint, resumption and resume > init_from > scratch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tests.tiny_configs import tiny_loop_config
from vcp_jax import backbone as backbone_lib
from vcp_jax import checkpointing, trainer


class TinyBackbone(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(4, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.dense(x))


class TinyModel(nnx.Module):
    """A backbone under the name every model gives it, and a head."""

    def __init__(self, seed: int):
        rngs = nnx.Rngs(params=seed)
        self.backbone = TinyBackbone(rngs)
        self.head = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.backbone(x))


def train_step(state: trainer.TrainState, batch: dict[str, jax.Array], ctx: trainer.StepContext
               ) -> tuple[trainer.TrainState, dict[str, jax.Array]]:
    """A real SGD step of the tiny model towards 0 (each step's batch differs)."""

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, None]:
        return jnp.mean((model(batch["x"]) - 1.0) ** 2), None

    state, loss, _, grad_norm = trainer.update_with_norm(state, ctx, loss_fn)
    return state, trainer.reduce_metrics({"loss": loss, "grad_norm": grad_norm}, ctx)


def eval_step(state: trainer.TrainState, batch: dict[str, jax.Array], ctx: trainer.StepContext
              ) -> dict[str, jax.Array]:
    del state, batch, ctx
    return {}


def batches() -> grain.MapDataset:
    """Element k is the (global) batch of step k + 1, as `input_pipeline.train_stream` gives."""
    return grain.MapDataset.range(1000).map(
        lambda k: {"x": np.full((8, 4), np.sin(k), np.float32) + np.arange(4, dtype=np.float32)})


def config(steps: int = 7, **overrides: Any) -> ml_collections.ConfigDict:
    # Every save kept, so the tests see each one on disk, unless a test asks for fewer.
    overrides.setdefault("keep_checkpoints", 10)
    return tiny_loop_config(steps, log_every=2, eval_every=3, checkpoint_every=2, **overrides)


class FakeEvaluation:
    """`evaluate(state, eval_fn, strategy)`: a validation loss chosen per step, and a record of
    the steps it was asked at."""

    def __init__(self, losses: dict[int, float] | None = None):
        self.losses = losses or {}
        self.steps: list[int] = []

    def __call__(self, state: Any, eval_fn: Any, strategy: Any) -> dict[str, float]:
        step = int(np.asarray(strategy.fetch(state.step)))
        self.steps.append(step)
        return {"val_loss": self.losses.get(step, 1.0), "val_step": float(step)}


def run(workdir: Path, c, evaluation: FakeEvaluation | None = None,
        source: backbone_lib.BackboneCheckpoint | None = None, **kwargs: Any) -> trainer.StageRun:
    return trainer.run_stage(
        c, workdir, source=source,
        create_state=lambda axis: trainer.create_train_state(TinyModel(c.seed), c,
                                                             axis_name=axis),
        train=batches(), train_step=train_step, eval_step=eval_step,
        evaluate=evaluation or FakeEvaluation(), provenance_data={}, desc="test", **kwargs)


def params_of(state: Any) -> dict[str, np.ndarray]:
    return backbone_lib.flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(state.params)))


def test_evaluations_and_saves_follow_their_cadence_and_the_last_step(tmp_path: Path) -> None:
    evaluation = FakeEvaluation()
    result = run(tmp_path, config(), evaluation)
    assert evaluation.steps == [3, 6, 7]
    assert checkpointing.find_own_steps(tmp_path) == [2, 4, 6, 7]
    # Only a saved evaluation ranks a checkpoint (step 3's was not saved), and a tie keeps the
    # earlier one: step 6.
    assert result.loop.start_step == 0 and result.chosen_step == 6
    assert result.loop.val_metrics["val_step"] == 7.0  # the last evaluation's
    timing = result.loop.timing
    assert timing["train_steps"] == 6  # the first step (compilation) is timed alone
    assert timing["first_step_seconds"] > 0 and timing["total_seconds"] >= timing["eval_seconds"]
    assert (tmp_path / "provenance.json").is_file() and (tmp_path / "tensorboard").is_dir()


def test_the_lowest_validation_loss_is_the_checkpoint_handed_back(tmp_path: Path) -> None:
    c = config(steps=9, checkpoint_every_steps=3, keep_checkpoints=1)
    evaluation = FakeEvaluation({3: 0.5, 6: 0.2, 9: 0.9})
    result = run(tmp_path / "best", c, evaluation)
    assert result.loop.best_step == result.chosen_step == 6
    assert checkpointing.find_own_steps(tmp_path / "best") == [6, 9]  # the last and the best
    restored = checkpointing.RunCheckpoints(tmp_path / "best" / "checkpoints", c).restore_state(
        result.strategy.get_state(result.state), 6)
    got = params_of(result.strategy.get_state(result.state))
    for key, value in params_of(restored).items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert int(np.asarray(result.strategy.get_state(result.state).step)) == 6
    # Without `restore_best` (pretraining) the last state is handed back.
    last = run(tmp_path / "last", c, FakeEvaluation({3: 0.5, 6: 0.2, 9: 0.9}),
               restore_best=False)
    assert last.chosen_step == 6 and int(np.asarray(last.strategy.get_state(last.state).step)) == 9


def test_a_resumed_run_ends_where_a_straight_one_does(tmp_path: Path) -> None:
    straight = run(tmp_path / "straight", config(steps=6))
    run(tmp_path / "resumed", config(steps=4))
    with checkpointing.allow_config_changes(["num_train_steps"]):
        resumed = run(tmp_path / "resumed", config(steps=6))
    assert resumed.loop.start_step == 4
    want = params_of(straight.strategy.get_state(straight.loop.state))  # the last step's
    got = params_of(resumed.strategy.get_state(resumed.loop.state))
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def _saved_backbone(tmp_path: Path, c) -> backbone_lib.BackboneCheckpoint:
    """A backbone of 7s (parameters and statistics) as `init_from` reads it."""
    model = TinyModel(seed=3)
    sevens = jax.tree.map(lambda x: np.full(np.shape(x), 7.0, np.float32),
                          nnx.to_pure_dict(nnx.state(model.backbone, nnx.Param)))
    stats = jax.tree.map(lambda x: np.full(np.shape(x), 7.0, np.float32),
                         nnx.to_pure_dict(nnx.state(model.backbone, nnx.BatchStat)))
    backbone_lib.save_backbone(tmp_path / "pretrained", params=sevens, batch_stats=stats,
                               config=c)
    return backbone_lib.load_backbone(tmp_path / "pretrained")


def test_resume_wins_over_init_from_which_wins_over_scratch(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    c = config(steps=2)
    source = _saved_backbone(tmp_path, c)

    def start(workdir: Path, source: backbone_lib.BackboneCheckpoint | None):
        state, _ = trainer.create_train_state(TinyModel(c.seed), c)
        checkpoints = checkpointing.RunCheckpoints(workdir / "checkpoints", c)
        started = trainer.init_state(state, checkpoints, source)
        checkpoints.close()
        return started

    fresh = params_of(trainer.create_train_state(TinyModel(c.seed), c)[0])
    state, step, said = start(tmp_path / "scratch", None)
    assert (step, said) == (0, "starting from random initialisation")
    assert all(np.array_equal(params_of(state)[k], v) for k, v in fresh.items())

    state, step, said = start(tmp_path / "init", source)
    assert step == 0 and said.startswith("loaded the r3d width 4 backbone (28 parameters")
    loaded = params_of(state)
    assert all((loaded[k] == 7).all() for k in loaded if k.startswith("backbone/"))
    assert all(np.array_equal(loaded[k], v) for k, v in fresh.items() if k.startswith("head/"))

    run(tmp_path / "resume", c)  # the run's own checkpoints: resumed, init_from ignored
    state, step, said = start(tmp_path / "resume", source)
    assert step == 2 and said.startswith("resumed from the checkpoint of step 2")
    assert not (params_of(state)["backbone/dense/kernel"] == 7).any()
    capsys.readouterr()
