"""`benchmarks/roofline.py` at tiny sizes: its counts agree with each other and with the model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import roofline


def _valid_taps(n: int, k: int, s: int, p: int) -> int:
    """(output position, kernel tap) pairs of one axis whose input index lands inside [0, n)."""
    out = (n + 2 * p - k) // s + 1
    return sum(1 for o in range(out) for t in range(k) if 0 <= o * s - p + t < n)


def _conv_flops(layer: roofline.Layer) -> int:
    """2 x N x Cin x Cout x the valid taps (XLA does not count taps on the zero padding)."""
    c = layer.conv
    n, *thw, _ = layer.shape
    taps = math.prod(_valid_taps(d, k, s, p) for d, k, s, p in
                     zip(thw, c["kernel"], c["stride"], c["padding"], strict=True))
    return 2 * n * c["cin"] * c["cout"] * taps


@pytest.fixture(scope="module")
def r3d_layers() -> list[roofline.Layer]:
    layers = roofline.build_layers("r3d", width=4, crop=16, clip_len=8, batch=2)
    roofline.measure(layers, "float32", workers=1)
    return layers


def test_conv_flops_and_bytes_are_the_analytic_counts(r3d_layers: list[roofline.Layer]) -> None:
    convs = {layer.name: layer for layer in r3d_layers if layer.kind == "conv"}
    # Without padding: all taps, 2 * N * Cout * Cin * k^3 * output voxels.
    down = convs["conv3.downsample"]
    n, *out_thw, cout = down.out
    assert down.costs["fwd"][0] == 2 * n * cout * down.conv["cin"] * math.prod(out_thw)
    for layer in convs.values():
        flops = _conv_flops(layer)
        assert layer.costs["fwd"][0] == flops, layer.name
        # The weight gradient and the input gradient do the same multiply-adds.
        assert layer.costs["wgrad"][0] == pytest.approx(flops, rel=1e-6), layer.name
        if layer.conv["first"]:
            assert "dgrad" not in layer.costs  # the clips get no gradient
        else:
            assert layer.costs["dgrad"][0] == pytest.approx(flops, rel=1e-6), layer.name
        # Bytes of the forward: input + kernel + output, once each (float32).
        assert layer.costs["fwd"][1] == pytest.approx(layer.min_bytes["fwd"], rel=1e-6)
        assert layer.min_bytes["fwd"] == 4 * (math.prod(layer.shape) + math.prod(layer.out)
                                              + math.prod(layer.conv["kernel"])
                                              * layer.conv["cin"] * layer.conv["cout"])


def test_bound_is_max_of_compute_and_memory_and_flips_with_bandwidth(
        r3d_layers: list[roofline.Layer]) -> None:
    layer = next(x for x in r3d_layers if x.name == "conv2.conv1")
    flops, nbytes = layer.costs["fwd"][0], layer.min_bytes["fwd"]
    intensity = flops / nbytes
    peak = 1e12
    # The ridge point is peak / bandwidth FLOP per byte: below the layer's intensity it is
    # compute-bound, above it memory-bound.
    fast = roofline.layer_bound(layer, peak, bandwidth=4 * peak / intensity)
    slow = roofline.layer_bound(layer, peak, bandwidth=peak / intensity / 4)
    assert fast["bound"] == "compute" and slow["bound"] == "memory"
    t, by = roofline.kernel_time(flops, nbytes, peak, bandwidth=peak / intensity / 4)
    assert by == "memory" and t == pytest.approx(4 * flops / peak)
    t, by = roofline.kernel_time(flops, nbytes, peak, bandwidth=4 * peak / intensity)
    assert by == "compute" and t == pytest.approx(flops / peak)
    # BatchNorm is memory-bound on any GPU; its analytic minimum is 3 + 5 passes over the map.
    bn = next(x for x in r3d_layers if x.kind == "bn_relu")
    assert roofline.layer_bound(bn, 989e12, 3.35e12)["bound"] == "memory"
    assert sum(bn.min_bytes.values()) == 8 * 4 * math.prod(bn.shape)


def test_projection_adds_up(r3d_layers: list[roofline.Layer]) -> None:
    device = roofline.DEVICES["h100"]
    p = roofline.project(r3d_layers, device, "bfloat16", batch=2)
    rows = [roofline.layer_bound(x, device["bfloat16"], device["hbm"]) for x in r3d_layers]
    assert p["step_ms"] == pytest.approx(1e3 * sum(r["seconds"] for r in rows))
    assert p["step_ms"] >= p["compute_only_ms"]
    assert 0 < p["mfu"] <= 1 and 0 <= p["memory_bound_share"] <= 1
    assert p["mfu"] == pytest.approx(p["compute_only_ms"] / p["step_ms"])
    assert p["tuples_s"] == pytest.approx(2 / (p["step_ms"] / 1e3))
    assert p["cores_sample_tuple"] == pytest.approx(p["tuples_s"] / roofline.TUPLES_PER_CORE)
    # More bandwidth never slows the bound; XLA:CPU's fusion never beats the minimum.
    faster = roofline.project(r3d_layers, {**device, "hbm": 10 * device["hbm"]}, "bfloat16", 2)
    assert faster["step_ms"] <= p["step_ms"]
    assert p["xla_fused_step_ms"] >= p["step_ms"] * 0.999


def test_main_tiny_all_archs_match_the_models(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "roofline.json"
    assert roofline.main(["--tiny", "--dtype", "float32", "--device", "h100", "--layers",
                          "--markdown", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PROJECTION" in text and "| r21d | float32 | H100 SXM |" in text
    result = json.loads(out.read_text())
    for arch in ("c3d", "r3d", "r21d"):
        check = result["archs"][arch]["float32"]["check"]
        # The layer list is the model: same parameters, and the same FLOPs as XLA counts for the
        # whole VCPModel's loss and gradient (within its few extra elementwise ops).
        assert check["layer_params"] == check["model_params"], arch
        assert check["layer_flops"] == pytest.approx(check["model_flops"], rel=0.01), arch
