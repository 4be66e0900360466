"""Data parallelism over every device of every host: `jax.jit` on a 1-D mesh, or `jax.pmap`.

Both strategies expose the same small interface to the training loop: place the train state,
place a host's batch, compile a step, and bring the state back for checkpointing. With the same
global batch they compute the same loss as one device (BatchNorm statistics are global in both:
the jit strategy sees the whole sharded batch, the pmap strategy averages them over `AXIS_NAME`).
Evaluations run over batches padded with `valid=False` examples: `accumulate` sums a step's
outputs (every example counted once on any number of devices and hosts), `gather` collects
per-example outputs.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vcp_jax import config_utils

AXIS_NAME = "batch"  # the pmap axis; BatchNorm and gradients are averaged over it
STRATEGIES = ("jit", "pmap")

Batch = Mapping[str, Any]


class Strategy(Protocol):
    axis_name: str | None
    num_devices: int

    def put_state(self, state: Any) -> Any: ...
    def get_state(self, state: Any) -> Any: ...
    def put_batch(self, batch: dict[str, np.ndarray]) -> Any: ...
    def compile(self, step: Callable[..., Any], *, donate_state: bool) -> Callable[..., Any]: ...
    def fetch(self, tree: Any) -> Any: ...
    def gather(self, tree: Any) -> Any: ...


class JitStrategy:
    """`jax.jit` over a 1-D mesh of all devices: the batch is sharded, the state replicated."""

    axis_name = None

    def __init__(self, devices: list[jax.Device] | None = None):
        devices = devices or jax.devices()
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self.num_devices = len(devices)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))

    def put_state(self, state: Any) -> Any:
        return jax.device_put(state, self.replicated)

    def get_state(self, state: Any) -> Any:
        return state

    def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
        # Each host holds its own slice of the global batch.
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch
        )

    def compile(self, step: Callable[..., Any], *, donate_state: bool) -> Callable[..., Any]:
        return jax.jit(
            step,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=self.replicated,
            donate_argnums=(0,) if donate_state else (),
        )

    def fetch(self, tree: Any) -> Any:
        """Replicated outputs (metrics, sums) as numpy arrays."""
        return jax.tree.map(np.asarray, tree)

    def gather(self, tree: Any) -> Any:
        """Batch-sharded outputs as whole global batches on every host, in global order."""
        if jax.process_count() == 1:
            return jax.tree.map(np.asarray, tree)
        return multihost_utils.process_allgather(tree, tiled=True)


class PmapStrategy:
    """The classic `jax.pmap` data parallelism of the Flax examples (state has a device axis)."""

    axis_name = AXIS_NAME

    def __init__(self) -> None:
        self.local_devices = jax.local_devices()
        self.num_devices = jax.device_count()

    def put_state(self, state: Any) -> Any:
        # A host-side broadcast; the first pmapped call places one copy on each local device.
        n = len(self.local_devices)
        return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state)

    def get_state(self, state: Any) -> Any:
        # One device's copy, as host numpy arrays: on several hosts each holds the same values,
        # and Orbax must not be handed host-local device arrays as if they were global ones.
        return jax.tree.map(lambda x: np.asarray(x[0]), state)

    def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
        n = len(self.local_devices)

        def split(x: np.ndarray) -> np.ndarray:
            if x.shape[0] % n:
                raise ValueError(f"host batch {x.shape[0]} is not divisible by {n} local devices")
            return x.reshape(n, x.shape[0] // n, *x.shape[1:])

        return jax.tree.map(split, batch)

    def compile(self, step: Callable[..., Any], *, donate_state: bool) -> Callable[..., Any]:
        return jax.pmap(step, axis_name=AXIS_NAME, donate_argnums=(0,) if donate_state else ())

    def fetch(self, tree: Any) -> Any:
        # Outputs are identical on every device (reduced over the axis): take the first.
        return jax.tree.map(lambda x: np.asarray(x[0]), tree)

    def gather(self, tree: Any) -> Any:
        """Per-device outputs `(local devices, b, ...)` as whole global batches on every host.

        A host's devices hold consecutive slices of its part of the global batch, and hosts hold
        consecutive parts, so concatenating in (host, device) order restores the global order.
        """
        local = jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), tree)
        if jax.process_count() == 1:
            return local
        return multihost_utils.process_allgather(local, tiled=True)


def prefetch_to_device(
    iterator: Iterator[dict[str, np.ndarray]], strategy: Strategy, size: int = 2
) -> Iterator[Any]:
    """Yields the batches of `iterator` placed on the devices, `size` batches ahead.

    Transfers are asynchronous: while the step of batch k runs, batches k+1 .. k+size are already
    on their way to the devices (the Flax examples' `prefetch_to_device`, for jit and pmap alike).
    """
    queue: collections.deque[Any] = collections.deque()

    def enqueue(n: int) -> None:
        for _ in range(n):
            try:
                queue.append(strategy.put_batch(next(iterator)))
            except StopIteration:
                return

    enqueue(max(size, 1))
    while queue:
        yield queue.popleft()
        enqueue(1)


def validate_config(config: Any) -> None:
    """`config.parallel` and a global `config.batch_size` that splits over every device."""
    config_utils.check_choice(config, "parallel", STRATEGIES)
    config_utils.check_positive(config, "batch_size")
    if config.batch_size % jax.device_count():
        raise config_utils.ConfigError(
            f"config.batch_size={config.batch_size} must be divisible by the number of devices "
            f"({jax.device_count()})")


def make_strategy(name: str) -> JitStrategy | PmapStrategy:
    if name == "jit":
        return JitStrategy()
    if name == "pmap":
        return PmapStrategy()
    raise ValueError(f"config.parallel={name!r} is not allowed; choose one of {STRATEGIES}")


def accumulate(
    state: Any,
    batches: Iterator[Batch],
    eval_fn: Callable[..., Any],
    strategy: Strategy,
) -> dict[str, np.ndarray] | None:
    """Sums of `eval_fn`'s outputs over every batch (None for no batch).

    `eval_fn` returns sums over the valid examples of a global batch (padding masked), so each
    example counts once on any number of devices and hosts.
    """
    totals = None
    for batch in batches:
        sums = strategy.fetch(eval_fn(state, strategy.put_batch(batch)))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    return totals


def gather(
    state: Any,
    batches: Iterator[Batch],
    eval_fn: Callable[..., Any],
    strategy: Strategy,
) -> dict[str, np.ndarray]:
    """Per-example outputs of `eval_fn` over every batch, from every host, padding removed.

    `eval_fn` returns arrays with a leading batch axis and must include `valid`; the result holds
    the valid rows of every global batch, on every host, in global order.
    """
    parts: list[dict[str, np.ndarray]] = []
    for batch in batches:
        out = strategy.gather(eval_fn(state, strategy.put_batch(batch)))
        valid = out.pop("valid").astype(bool)
        parts.append({k: v[valid] for k, v in out.items()})
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
