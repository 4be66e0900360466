"""Networks for VCP: the C3D, R3D and R(2+1)D backbones, the VCP head and a fine-tuning classifier.

Flax NNX modules on NTHWC video, a clip being `(B, T, H, W, C)` = `(B, 16, 112, 112, 3)`. They
follow the PyTorch reference code ([U] `BestJuly/VCP`, [V] `xudejing/video-clip-order-prediction`,
which use NCTHW) layer for layer, so parameter counts, feature-map shapes and the initial weight
distribution match the reference (docs/method.md §2):

=========  ====================  ==========================================================
backbone   learnable parameters  stage maps, T x H (16x112x112 input)
=========  ====================  ==========================================================
C3D        27,661,440            16x56 -> 8x28 -> 4x14 -> 2x7 -> 2x7
R3D        14,361,792            16x56 -> 16x56 -> 8x28 -> 4x14 -> 2x7
R(2+1)D    14,365,303            16x56 -> 16x56 -> 8x28 -> 4x14 -> 2x7
=========  ====================  ==========================================================

Every backbone ends in global average pooling to an `8 * width` feature (512 at the paper's
`width=64`); `width=4..16` gives tiny models for CPU tests and demos. Convs use explicit symmetric
padding (PyTorch semantics), BatchNorm is PyTorch's (momentum 0.1, i.e. Flax's 0.9, epsilon 1e-5,
running variance updated with the unbiased batch variance), and modules start in training mode:
switch with NNX's `model.train()` / `model.eval()`.

BatchNorm in the VCP model follows [U] by default (`bn_stats='per_clip'`): [U] calls the backbone
once per clip position, so each position's clips are normalised with their own batch statistics
and the running statistics are updated once per position; `VCPModel` reproduces that on one
batched backbone call with per-position statistic groups (`BatchNorm.batch_groups`).
`bn_stats='pooled'` pools all clips of the batch instead (a deviation; see docs/fidelity.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vcp_jax import config_utils
from vcp_jax import conv as conv_lib

ARCHS = ("c3d", "r3d", "r21d")
BN_STATS = ("per_clip", "pooled")  # VCPModel's BatchNorm statistics: [U]'s, or one pool
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.model.dtype

Dtype = Any
Triple = tuple[int, int, int]


def validate_config(config: Any) -> None:
    """The model keys every stage reads (`config.model`: arch, width, dtype, conv_impl); a
    `ConfigError` names the key and what is allowed. Arch and width may still be None before
    `backbone.resolve_init` fills them in from `init_from`."""
    if config.model.get("arch") is not None:
        config_utils.check_choice(config, "model.arch", ARCHS)
    if config.model.get("width") is not None:
        config_utils.check_positive(config, "model.width")
    config_utils.check_choice(config, "model.dtype", DTYPES)
    config_utils.check_choice(config, "model.conv_impl", conv_lib.CONV_IMPLS)


def to_input(frames: jax.Array) -> jax.Array:
    """uint8 frames to [0, 1] on the device (the host ships 4x fewer bytes than float32): what
    every backbone is fed, in every stage."""
    return frames.astype(jnp.float32) / 255.0

# ----------------------------------------------------------------------------- PyTorch-style init
#
# Inits run once per parameter shape, so their XLA compile time dominates model construction on
# CPU (seconds per shape for threefry on a rank-5 shape). Hence each init is one jitted call that
# draws a 2-D array, compiled without XLA's backend optimisations when called eagerly (6x faster
# to compile; a 3x3x3x512x512 kernel then takes 0.6 s to draw on CPU instead of 0.15 s). Inside
# an outer trace (nnx.jit, nnx.eval_shape) the plain function is inlined instead.

_variance_scaling = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _kernel_2d(key: jax.Array, shape: tuple[int, ...], dtype: Dtype) -> jax.Array:
    return _variance_scaling(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)


def _uniform(key: jax.Array, shape: tuple[int, ...], dtype: Dtype, bound: float) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)


_FAST_COMPILE = {"xla_backend_optimization_level": 0}
_kernel_2d_jit = jax.jit(_kernel_2d, static_argnums=(1, 2), compiler_options=_FAST_COMPILE)
_uniform_jit = jax.jit(_uniform, static_argnums=(1, 2), compiler_options=_FAST_COMPILE)


def torch_kernel_init(
    key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32
) -> jax.Array:
    """PyTorch's default conv/linear weight init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).

    That is `variance_scaling(1/3, 'fan_in', 'uniform')` on a kernel `(..., in, out)`, drawn as a
    `(fan_in, out)` matrix and reshaped (same distribution).
    """
    fn = _kernel_2d if isinstance(key, jax.core.Tracer) else _kernel_2d_jit
    return fn(key, tuple(shape), jnp.dtype(dtype))


def torch_bias_init(fan_in: int) -> Callable[..., jax.Array]:
    """PyTorch's default bias init for a layer with `fan_in` inputs: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        fn = _uniform if isinstance(key, jax.core.Tracer) else _uniform_jit
        return fn(key, tuple(shape), jnp.dtype(dtype), bound)

    return init


def _triple(v: int | Sequence[int]) -> Triple:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(v)
    assert len(t) == 3, v
    return t  # type: ignore[return-value]


def _at_least_f32(dtype: Dtype) -> Dtype:
    """float32 for bfloat16 / float16 / float32, float64 for float64 (x64 tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def count_params(module: nnx.Module) -> int:
    """Number of learnable weights (`nnx.Param`) in `module`; BatchNorm running stats excluded.

    Works on abstract modules from `nnx.eval_shape` too (nothing is allocated).
    """
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    return sum(math.prod(x.shape) for x in leaves)


# ----------------------------------------------------------------------------- building blocks


def conv3d(
    in_features: int,
    out_features: int,
    kernel: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    *,
    use_bias: bool,
    dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A PyTorch-style `nn.Conv3d`: symmetric zero padding, PyTorch's default init."""
    kernel, stride, padding = _triple(kernel), _triple(stride), _triple(padding)
    fan_in = in_features * math.prod(kernel)
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=kernel,
        strides=stride,
        padding=tuple((p, p) for p in padding),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(fan_in),
        rngs=rngs,
    )


class BatchNorm(nnx.Module):
    """PyTorch's `nn.BatchNorm3d` on channels-last input, with optional statistic groups.

    Training mode (`use_running_average=False`, NNX's `model.train()`): the batch `(R, ..., C)`
    is split into `batch_groups` groups of rows, row `r` in group `r % batch_groups` (so with
    `G` groups the batch is read as `(R / G, G, ..., C)`); each group is normalised with its own
    mean and biased variance over its rows and all non-channel axes, and the running statistics
    are updated once per group, in group order:
    `mean <- m * mean + (1 - m) * mean_g`, `var <- m * var + (1 - m) * var_g * n / (n - 1)`,
    the unbiased variance as PyTorch uses it (`n`: the group's element count per channel).

    One group is plain batch normalisation. `G = N` on a `(B * N, ...)` batch of tuples that
    were flattened from `(B, N, ...)` gives each clip position its own statistics: exactly what
    [U]'s VCP model computes by calling the backbone once per position (docs/method.md §2).

    `axis_name` (pmap, shard_map): the per-group mean, then the mean squared deviation from it,
    are averaged over the axis, so the statistics are those of the global batch and `n` counts
    every device's rows.
    Under `jax.jit` on a mesh the batch is one global array and nothing is needed.

    Inference mode (`model.eval()`): the running statistics, whatever `batch_groups` is.
    Statistics and normalisation are computed in float32 (float64 for float64 input, under
    `jax.enable_x64`), the result is cast to `dtype`.
    Variables have `nnx.BatchNorm`'s names and shapes: `scale`, `bias` (`nnx.Param`, `(C,)`),
    `mean`, `var` (`nnx.BatchStat`, `(C,)`).
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        dtype: Dtype = jnp.float32,
        axis_name: str | None = None,
        batch_groups: int = 1,
        use_running_average: bool = False,
    ):
        if batch_groups < 1:
            raise ValueError(f"batch_groups must be a positive int, got {batch_groups!r}")
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_features = num_features
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.axis_name = axis_name
        self.batch_groups = batch_groups
        self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        """`(R, ..., C)` -> `(R, ..., C)` in `dtype`; R divisible by `batch_groups` in training."""
        compute = _at_least_f32(x.dtype)
        scale = self.scale[...].astype(compute)
        bias = self.bias[...].astype(compute)
        x32 = x.astype(compute)
        if self.use_running_average:
            mul = scale * jax.lax.rsqrt(self.var[...].astype(compute) + self.epsilon)
            return ((x32 - self.mean[...].astype(compute)) * mul + bias).astype(self.dtype)

        groups = self.batch_groups
        rows = x.shape[0]
        if rows % groups:
            raise ValueError(f"BatchNorm: {rows} rows do not split into {groups} groups")
        xg = x32.reshape(rows // groups, groups, *x.shape[1:])  # (R/G, G, ..., C)
        axes = (0, *range(2, xg.ndim - 1))
        # Two passes (the mean, then the mean squared deviation from it), as PyTorch: the one-
        # pass E[x^2] - E[x]^2 cancels catastrophically when a group's variance is small next
        # to its mean, which made training steps depend on the reduction order (1 vs 2 hosts).
        count = math.prod(xg.shape[i] for i in axes)
        mean = xg.mean(axes)  # (G, C)
        if self.axis_name is not None:
            mean = jax.lax.pmean(mean, self.axis_name)
        bshape = (1, groups) + (1,) * (xg.ndim - 3) + (x.shape[-1],)
        var = jnp.square(xg - mean.reshape(bshape)).mean(axes)  # biased, (G, C)
        if self.axis_name is not None:
            var = jax.lax.pmean(var, self.axis_name)
            count *= jax.lax.axis_size(self.axis_name)
        if count < 2:
            # PyTorch refuses too: the unbiased variance of one value is undefined.
            raise ValueError(f"BatchNorm needs more than 1 value per channel, got {count}")

        running_mean, running_var = self.mean[...], self.var[...]
        m = self.momentum
        unbiased = count / (count - 1)
        for g in range(groups):  # in clip order, as the reference's sequential backbone calls
            running_mean = m * running_mean + (1 - m) * mean[g]
            running_var = m * running_var + (1 - m) * var[g] * unbiased
        # Stored in the variables' own dtype (float32), whatever the compute dtype.
        self.mean[...] = jax.lax.stop_gradient(running_mean).astype(self.mean[...].dtype)
        self.var[...] = jax.lax.stop_gradient(running_var).astype(self.var[...].dtype)

        mul = scale * jax.lax.rsqrt(var + self.epsilon)  # (G, C)
        y = (xg - mean.reshape(bshape)) * mul.reshape(bshape) + bias
        return y.reshape(x.shape).astype(self.dtype)


def batch_norm(
    num_features: int, *, dtype: Dtype, axis_name: str | None, rngs: nnx.Rngs
) -> BatchNorm:
    """`nn.BatchNorm3d` defaults: momentum 0.1 (Flax 0.9), eps 1e-5, scale 1, bias 0, train mode.

    One statistic group; `set_bn_groups` changes it (the VCP model does).
    """
    del rngs  # deterministic init
    return BatchNorm(num_features, momentum=0.9, epsilon=1e-5, dtype=dtype, axis_name=axis_name)


def linear(in_features: int, out_features: int, *, dtype: Dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A PyTorch-style `nn.Linear` (kernel and bias U(+-1/sqrt(in_features)))."""
    return nnx.Linear(
        in_features,
        out_features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(in_features),
        rngs=rngs,
    )


def global_avg_pool(x: jax.Array) -> jax.Array:
    """`(B, T, H, W, C)` -> `(B, C)`, averaged in float32 (or wider: float64 under x64)."""
    return jnp.mean(x.astype(_at_least_f32(x.dtype)), axis=(1, 2, 3))


class _Backbone(nnx.Module):
    """Shared interface: `stages(x)` gives the 5 stage maps; the last one is the conv5 map."""

    num_features: int
    dtype: Dtype

    def stages(self, x: jax.Array) -> list[jax.Array]:
        raise NotImplementedError

    def feature_map(self, x: jax.Array) -> jax.Array:
        """`(B, T, H, W, 3)` clip -> conv5 map `(B, T/8, H/16, W/16, 8*width)`, before pooling."""
        return self.stages(x)[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        """`(B, T, H, W, 3)` clip -> `(B, num_features)` pooled feature, float32."""
        return global_avg_pool(self.feature_map(x))


# ----------------------------------------------------------------------------- C3D


class ConvBNReLU(nnx.Module):
    """3x3x3 conv (pad 1, with bias) -> BatchNorm -> ReLU, the C3D unit."""

    def __init__(
        self, cin: int, cout: int, *, dtype: Dtype, bn_axis_name: str | None, rngs: nnx.Rngs
    ):
        self.conv = conv3d(cin, cout, 3, 1, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.bn = batch_norm(cout, dtype=dtype, axis_name=bn_axis_name, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x)))


class C3D(_Backbone):
    """C3D with BatchNorm ([V] `c3d.py`), without pool5 and fc6/fc7.

    conv1 -> pool(1,2,2) -> conv2 -> pool(2,2,2) -> conv3a/b -> pool -> conv4a/b -> pool ->
    conv5a/b -> global average pool. Widths `width * (1, 2, 4, 8, 8)`.
    """

    def __init__(
        self,
        *,
        width: int = 64,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        bn_axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        if param_dtype != jnp.float32:
            raise ValueError("parameters and BatchNorm stats are always float32")
        w = (width, 2 * width, 4 * width, 8 * width, 8 * width)
        kw = dict(dtype=dtype, bn_axis_name=bn_axis_name, rngs=rngs)
        self.conv1 = ConvBNReLU(3, w[0], **kw)
        self.conv2 = ConvBNReLU(w[0], w[1], **kw)
        self.conv3a = ConvBNReLU(w[1], w[2], **kw)
        self.conv3b = ConvBNReLU(w[2], w[2], **kw)
        self.conv4a = ConvBNReLU(w[2], w[3], **kw)
        self.conv4b = ConvBNReLU(w[3], w[3], **kw)
        self.conv5a = ConvBNReLU(w[3], w[4], **kw)
        self.conv5b = ConvBNReLU(w[4], w[4], **kw)
        self.num_features = w[4]
        self.dtype = dtype

    def stages(self, x: jax.Array) -> list[jax.Array]:
        """`(B, 16, 112, 112, 3)` -> (T x H) 16x56, 8x28, 4x14, 2x7, 2x7, each after its pool."""
        x = jnp.asarray(x, self.dtype)
        s1 = nnx.max_pool(self.conv1(x), (1, 2, 2), (1, 2, 2))
        s2 = nnx.max_pool(self.conv2(s1), (2, 2, 2), (2, 2, 2))
        s3 = nnx.max_pool(self.conv3b(self.conv3a(s2)), (2, 2, 2), (2, 2, 2))
        s4 = nnx.max_pool(self.conv4b(self.conv4a(s3)), (2, 2, 2), (2, 2, 2))
        s5 = self.conv5b(self.conv5a(s4))
        return [s1, s2, s3, s4, s5]


# ----------------------------------------------------------------------------- R3D / R(2+1)D


ConvFactory = Callable[..., nnx.Module]


def _full_conv(
    cin: int,
    cout: int,
    kernel: Triple,
    stride: Triple,
    padding: Triple,
    *,
    dtype: Dtype,
    bn_axis_name: str | None,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """R3D's conv: one full kt x k x k conv, no bias."""
    del bn_axis_name
    return conv3d(cin, cout, kernel, stride, padding, use_bias=False, dtype=dtype, rngs=rngs)


class SpatioTemporalConv(nnx.Module):
    """R(2+1)D's factorised conv: spatial (1,k,k) conv -> BN -> ReLU -> temporal (kt,1,1) conv.

    Mid width `M = floor(kt*k*k*Cin*Cout / (k*k*Cin + kt*Cout))` keeps the parameter count close
    to the full conv's; the stride (s_t, s, s) splits into (1, s, s) spatial and (s_t, 1, 1)
    temporal. Convs have no bias. Used for conv1 and the 1x1x1 shortcut convs too.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: Triple,
        stride: Triple,
        padding: Triple,
        *,
        dtype: Dtype,
        bn_axis_name: str | None,
        rngs: nnx.Rngs,
    ):
        kt, kh, kw = kernel
        st, sh, sw = stride
        pt, ph, pw = padding
        mid = (kt * kh * kw * cin * cout) // (kh * kw * cin + kt * cout)
        self.spatial = conv3d(
            cin, mid, (1, kh, kw), (1, sh, sw), (0, ph, pw), use_bias=False, dtype=dtype, rngs=rngs
        )
        self.bn = batch_norm(mid, dtype=dtype, axis_name=bn_axis_name, rngs=rngs)
        self.temporal = conv3d(
            mid, cout, (kt, 1, 1), (st, 1, 1), (pt, 0, 0), use_bias=False, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.temporal(nnx.relu(self.bn(self.spatial(x))))


class ResBlock(nnx.Module):
    """Basic residual block: conv-BN-ReLU-conv-BN, plus shortcut, then ReLU.

    With `downsample`, the first conv has stride 2 in T, H and W and the shortcut is a 1x1x1
    stride-2 conv + BN projection; otherwise the shortcut is the identity.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        *,
        downsample: bool,
        conv: ConvFactory,
        dtype: Dtype,
        bn_axis_name: str | None,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, bn_axis_name=bn_axis_name, rngs=rngs)
        s = 2 if downsample else 1
        self.conv1 = conv(cin, cout, (3, 3, 3), (s, s, s), (1, 1, 1), **kw)
        self.bn1 = batch_norm(cout, dtype=dtype, axis_name=bn_axis_name, rngs=rngs)
        self.conv2 = conv(cout, cout, (3, 3, 3), (1, 1, 1), (1, 1, 1), **kw)
        self.bn2 = batch_norm(cout, dtype=dtype, axis_name=bn_axis_name, rngs=rngs)
        if downsample:
            self.downsample_conv = conv(cin, cout, (1, 1, 1), (2, 2, 2), (0, 0, 0), **kw)
            self.downsample_bn = batch_norm(cout, dtype=dtype, axis_name=bn_axis_name, rngs=rngs)
        else:
            self.downsample_conv = None
            self.downsample_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        res = nnx.relu(self.bn1(self.conv1(x)))
        res = self.bn2(self.conv2(res))
        if self.downsample_conv is not None:
            x = self.downsample_bn(self.downsample_conv(x))
        return nnx.relu(x + res)


class _ResNet3D(_Backbone):
    """[V]'s `R3DNet`: conv1 3x7x7 stride (1,2,2) + BN + ReLU (no max-pool), then 4 stages of
    `layer_sizes` basic blocks, widths `width * (1, 2, 4, 8)`, stages 3-5 downsampling by 2.

    A subclass names its convolution (`conv`, a `ConvFactory`): R3D and R(2+1)D differ in
    nothing else."""

    conv: ConvFactory

    def __init__(
        self,
        *,
        width: int = 64,
        layer_sizes: Sequence[int] = (1, 1, 1, 1),
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        bn_axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        conv = type(self).conv
        if param_dtype != jnp.float32:
            raise ValueError("parameters and BatchNorm stats are always float32")
        if len(layer_sizes) != 4 or min(layer_sizes) < 1:
            raise ValueError(f"layer_sizes must be 4 positive ints, got {layer_sizes!r}")
        kw = dict(dtype=dtype, bn_axis_name=bn_axis_name, rngs=rngs)
        w = (width, 2 * width, 4 * width, 8 * width)
        self.conv1 = conv(3, w[0], (3, 7, 7), (1, 2, 2), (1, 3, 3), **kw)
        self.bn1 = batch_norm(w[0], dtype=dtype, axis_name=bn_axis_name, rngs=rngs)
        layers = []
        cin = w[0]
        for i, (cout, n) in enumerate(zip(w, layer_sizes, strict=True)):
            blocks = [ResBlock(cin, cout, downsample=i > 0, conv=conv, **kw)]
            blocks += [
                ResBlock(cout, cout, downsample=False, conv=conv, **kw) for _ in range(n - 1)
            ]
            layers.append(nnx.List(blocks))
            cin = cout
        # layers[0..3] are the reference's conv2..conv5.
        self.layers = nnx.List(layers)
        self.num_features = w[3]
        self.dtype = dtype

    def stages(self, x: jax.Array) -> list[jax.Array]:
        """`(B, 16, 112, 112, 3)` -> maps (T x H) 16x56 (conv1), 16x56, 8x28, 4x14, 2x7 (conv5)."""
        x = jnp.asarray(x, self.dtype)
        x = nnx.relu(self.bn1(self.conv1(x)))
        out = [x]
        for blocks in self.layers:
            for block in blocks:
                x = block(x)
            out.append(x)
        return out


class R3D(_ResNet3D):
    """R3D ("ResNet-10-3D" at `layer_sizes=(1, 1, 1, 1)`): full 3D convs without bias."""

    conv = staticmethod(_full_conv)


class R2Plus1D(_ResNet3D):
    """R(2+1)D: R3D's topology with every conv factorised (`SpatioTemporalConv`)."""

    conv = SpatioTemporalConv


_BACKBONES: dict[str, type[_Backbone]] = {"c3d": C3D, "r3d": R3D, "r21d": R2Plus1D}


def create_backbone(
    arch: str,
    *,
    rngs: nnx.Rngs,
    width: int = 64,
    dtype: Dtype = jnp.float32,
    bn_axis_name: str | None = None,
    conv_impl: str = "auto",
) -> nnx.Module:
    """The backbone named `arch` (one of `ARCHS`): `(B, T, H, W, 3)` -> `(B, 8 * width)`.

    `conv_impl` picks how 3D convolutions run (`vcp_jax.conv`): 'native' XLA, 'conv2d' (fast
    on CPU), or 'auto' (conv2d on CPU, native on GPU/TPU). Parameters and results are the same.
    """
    if arch not in _BACKBONES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    backbone = _BACKBONES[arch](width=width, dtype=dtype, bn_axis_name=bn_axis_name, rngs=rngs)
    set_conv_impl(backbone, conv_impl)
    return backbone


def set_bn_groups(module: nnx.Module, groups: int) -> None:
    """Makes every `BatchNorm` in `module` compute its training statistics in `groups` groups of
    rows (row `r` in group `r % groups`; see `BatchNorm`)."""
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"BatchNorm groups must be a positive int, got {groups!r}")
    for _, submodule in nnx.iter_modules(module):
        if isinstance(submodule, BatchNorm):
            submodule.batch_groups = groups


def set_conv_impl(module: nnx.Module, conv_impl: str) -> None:
    """Makes every `nnx.Conv` in `module` run with `conv_impl` (see `create_backbone`)."""
    conv_fn = conv_lib.resolve(conv_impl)
    for _, submodule in nnx.iter_modules(module):
        if isinstance(submodule, nnx.Conv):
            submodule.conv_general_dilated = conv_fn


# ----------------------------------------------------------------------------- heads


class VCPHead(nnx.Module):
    """[U]'s VCP head: clip features concatenated in clip order -> one Dense to the options.

    No hidden layer, no dropout: `(B, N, F)` -> `(B, num_classes)`.
    """

    def __init__(
        self,
        num_features: int,
        num_clips: int = 3,
        num_classes: int = 5,
        *,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_clips = num_clips
        self.fc = linear(num_clips * num_features, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, clip_features: jax.Array) -> jax.Array:
        b, n, f = clip_features.shape
        assert n == self.num_clips, (n, self.num_clips)
        logits = self.fc(clip_features.reshape(b, n * f))
        return logits.astype(_at_least_f32(logits.dtype))


class VCPModel(nnx.Module):
    """Backbone + VCP head: a tuple of `num_clips` clips -> logits over the blank's options.

    The backbone runs once on all `B * N` clips, flattened tuple-major from `(B, N, ...)` (one
    large batch for the accelerator), then the head. BatchNorm statistics in training mode
    (`bn_stats`, one of `BN_STATS`):

    - 'per_clip' (default, [U]): clip position n's statistics are over the B clips at position n
      only, and each BatchNorm's running statistics are updated N times a step, in clip order.
      Identical to [U], which calls the backbone once per position.
    - 'pooled': one set of statistics over all B * N clips and one running update a step. Not
      the reference: the blank (the option) is normalised together with its context clips.

    The model owns its backbone's BatchNorm configuration: building it sets the backbone's
    statistic groups (N or 1); a `Classifier` built on the same backbone sets them back to 1.
    """

    def __init__(
        self,
        backbone: nnx.Module,
        num_clips: int = 3,
        num_classes: int = 5,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        bn_stats: str = "per_clip",
    ):
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        self.backbone = backbone
        self.num_clips = num_clips
        self.bn_stats = bn_stats
        set_bn_groups(backbone, num_clips if bn_stats == "per_clip" else 1)
        self.head = VCPHead(backbone.num_features, num_clips, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, tuples: jax.Array) -> jax.Array:
        """`(B, N, T, H, W, C)` tuples -> `(B, num_classes)` float32 logits."""
        b, n = tuples.shape[:2]
        assert n == self.num_clips, (tuples.shape, self.num_clips)
        # Row b * N + n is clip n of tuple b: BatchNorm group n is clip position n.
        feats = self.backbone(tuples.reshape(b * n, *tuples.shape[2:]))  # (B*N, F)
        return self.head(feats.reshape(b, n, -1))


class Classifier(nnx.Module):
    """Backbone + Dense(features -> num_classes), for fine-tuning on action recognition.

    One clip per video, so BatchNorm is the standard one-group kind (as [U]'s classifier).
    """

    def __init__(
        self,
        backbone: nnx.Module,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
    ):
        set_bn_groups(backbone, 1)
        self.backbone = backbone
        self.fc = linear(backbone.num_features, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, clips: jax.Array) -> jax.Array:
        """`(B, T, H, W, C)` clips -> `(B, num_classes)` float32 logits."""
        logits = self.fc(self.backbone(clips))
        return logits.astype(_at_least_f32(logits.dtype))
