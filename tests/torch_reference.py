"""The reference PyTorch networks, written for the parity tests (not part of the package).

They follow [U] `BestJuly/VCP` and [V] `xudejing/video-clip-order-prediction` (whose
`models/c3d.py`, `r3d.py` and `r21d.py` are identical) module for module, so `state_dict()` has
the reference's key names (`conv1.temporal_spatial_conv.weight`, `conv3.block1.downsamplebn.*`,
`base_network.*`, `linear.*`, `fc.*`, `fc7.*`, `fc8.*`, `num_batches_tracked`). Two changes, both
free of effect at the reference's width 64: `width` scales the channels (the reference hard-codes
64) and the pooled feature is `flatten(1)` (the reference's `view(-1, 512)`, which only works at
width 64). Inputs are NCDHW.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class C3D(nn.Module):
    """C3D with BatchNorm; `conv{1,2,3a,...}` and `bn{1,2,3a,...}` side by side, as [U]/[V]."""

    NAMES = ("1", "2", "3a", "3b", "4a", "4b", "5a", "5b")
    POOL_AFTER = {"1": (1, 2, 2), "2": (2, 2, 2), "3b": (2, 2, 2), "4b": (2, 2, 2)}

    def __init__(self, width: int = 64, with_classifier: bool = False, num_classes: int = 101):
        super().__init__()
        w = {"1": width, "2": 2 * width, "3": 4 * width, "4": 8 * width, "5": 8 * width}
        cin = 3
        for name in self.NAMES:
            cout = w[name[0]]
            setattr(self, f"conv{name}", nn.Conv3d(cin, cout, 3, padding=1))
            setattr(self, f"bn{name}", nn.BatchNorm3d(cout))
            cin = cout
        self.num_features = cin
        self.with_classifier = with_classifier
        if with_classifier:
            self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.NAMES:
            x = torch.relu(getattr(self, f"bn{name}")(getattr(self, f"conv{name}")(x)))
            if name in self.POOL_AFTER:
                x = nn.functional.max_pool3d(x, self.POOL_AFTER[name], self.POOL_AFTER[name])
        x = nn.functional.adaptive_avg_pool3d(x, 1).flatten(1)
        return self.linear(x) if self.with_classifier else x


class FullConv(nn.Module):
    """R3D's `SpatioTemporalConv`: despite its name one full 3D conv, without bias."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.temporal_spatial_conv = nn.Conv3d(cin, cout, kernel, stride, padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal_spatial_conv(x)


class FactorisedConv(nn.Module):
    """R(2+1)D's `SpatioTemporalConv`: spatial conv -> BN -> ReLU -> temporal conv, no bias."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        (kt, kh, kw), (st, sh, sw), (pt, ph, pw) = (
            nn.modules.utils._triple(v) for v in (kernel, stride, padding)
        )
        mid = math.floor(kt * kh * kw * cin * cout / (kh * kw * cin + kt * cout))
        self.spatial_conv = nn.Conv3d(cin, mid, (1, kh, kw), (1, sh, sw), (0, ph, pw), bias=False)
        self.bn = nn.BatchNorm3d(mid)
        self.temporal_conv = nn.Conv3d(mid, cout, (kt, 1, 1), (st, 1, 1), (pt, 0, 0), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal_conv(torch.relu(self.bn(self.spatial_conv(x))))


class ResBlock(nn.Module):
    """`SpatioTemporalResBlock`: conv1/bn1, conv2/bn2, and downsampleconv/downsamplebn."""

    def __init__(self, conv: type[nn.Module], cin: int, cout: int, downsample: bool = False):
        super().__init__()
        self.downsample = downsample
        if downsample:
            self.downsampleconv = conv(cin, cout, 1, stride=2)
            self.downsamplebn = nn.BatchNorm3d(cout)
        self.conv1 = conv(cin, cout, 3, stride=2 if downsample else 1, padding=1)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = conv(cout, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if self.downsample:
            x = self.downsamplebn(self.downsampleconv(x))
        return torch.relu(x + res)


class ResLayer(nn.Module):
    """`SpatioTemporalResLayer`: `block1`, then `blocks.0`, `blocks.1`, ..."""

    def __init__(self, conv, cin: int, cout: int, size: int, downsample: bool = False):
        super().__init__()
        self.block1 = ResBlock(conv, cin, cout, downsample)
        self.blocks = nn.ModuleList([ResBlock(conv, cout, cout) for _ in range(size - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        for block in self.blocks:
            x = block(x)
        return x


class ResNet3D(nn.Module):
    """`R3DNet` / `R2Plus1DNet`: conv1 + bn1, then layers `conv2` .. `conv5`, then `linear`."""

    def __init__(self, conv, layer_sizes=(1, 1, 1, 1), width: int = 64,
                 with_classifier: bool = False, num_classes: int = 101):
        super().__init__()
        w = (width, 2 * width, 4 * width, 8 * width)
        self.conv1 = conv(3, w[0], (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
        self.bn1 = nn.BatchNorm3d(w[0])
        self.conv2 = ResLayer(conv, w[0], w[0], layer_sizes[0])
        self.conv3 = ResLayer(conv, w[0], w[1], layer_sizes[1], downsample=True)
        self.conv4 = ResLayer(conv, w[1], w[2], layer_sizes[2], downsample=True)
        self.conv5 = ResLayer(conv, w[2], w[3], layer_sizes[3], downsample=True)
        self.num_features = w[3]
        self.with_classifier = with_classifier
        if with_classifier:
            self.linear = nn.Linear(w[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.conv5(self.conv4(self.conv3(self.conv2(x))))
        x = nn.functional.adaptive_avg_pool3d(x, 1).flatten(1)
        return self.linear(x) if self.with_classifier else x


def create_backbone(arch: str, width: int = 64, **kwargs) -> nn.Module:
    """The reference backbone `arch` as [U]'s train scripts build it (`layer_sizes=(1,1,1,1)`)."""
    if arch == "c3d":
        return C3D(width, **kwargs)
    conv = {"r3d": FullConv, "r21d": FactorisedConv}[arch]
    return ResNet3D(conv, width=width, **kwargs)


class VCPN(nn.Module):
    """[U]'s VCP model: the backbone called once per clip position, features concatenated, `fc`.

    `modality='res'` feeds each clip's residual frames, [U]'s `VCPN.diff` (after the cloze, which
    [U]'s `preprocess` applies before the forward pass).
    """

    def __init__(self, base_network: nn.Module, tuple_len: int = 3, class_num: int = 5,
                 modality: str = "rgb"):
        super().__init__()
        self.base_network = base_network
        self.tuple_len = tuple_len
        self.fc = nn.Linear(base_network.num_features * tuple_len, class_num)
        self.res = modality != "rgb"  # [U]: `if modality == 'rgb': self.res = False`

    def diff(self, x: torch.Tensor) -> torch.Tensor:
        """[U]'s residual frames, verbatim: previous frame minus current, mapped to [0, 1]."""
        shift_x = torch.roll(x, 1, 2)
        return ((shift_x - x) + 1) / 2

    def forward(self, tuples: torch.Tensor) -> torch.Tensor:
        """`(B, N, C, T, H, W)` -> `(B, class_num)`."""
        clips = [tuples[:, i] for i in range(self.tuple_len)]
        if self.res:
            clips = [self.diff(c) for c in clips]
        feats = [self.base_network(c) for c in clips]
        return self.fc(torch.cat(feats, dim=1))


class VCOPN(nn.Module):
    """[V]'s clip order model: pairwise `fc7` + ReLU, concatenated, dropout, `fc8`.

    `res=True` is [U]'s `VCOPN(res=True)`: each clip's `clip - torch.roll(clip, 1, 2)`.
    """

    def __init__(self, base_network: nn.Module, tuple_len: int = 3, res: bool = False):
        super().__init__()
        self.base_network = base_network
        self.tuple_len = tuple_len
        self.fc7 = nn.Linear(base_network.num_features * 2, 512)
        self.fc8 = nn.Linear(512 * tuple_len * (tuple_len - 1) // 2, math.factorial(tuple_len))
        self.dropout = nn.Dropout(p=0.5)
        self.res = res

    def forward(self, tuples: torch.Tensor) -> torch.Tensor:
        f = []
        for i in range(self.tuple_len):
            clip = tuples[:, i]
            if self.res:
                shift_clip = torch.roll(clip, 1, 2)
                clip = clip - shift_clip
            f.append(self.base_network(clip))
        pairs = [torch.cat([f[i], f[j]], dim=1)
                 for i in range(self.tuple_len) for j in range(i + 1, self.tuple_len)]
        h = torch.cat([torch.relu(self.fc7(p)) for p in pairs], dim=1)
        return self.fc8(self.dropout(h))


def randomize_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random weights and random BatchNorm statistics, in place.

    Fresh BatchNorm layers (mean 0, var 1, scale 1, bias 0) would hide a swapped mean and
    variance or scale and bias, so every one is drawn, each from a different range.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                module.num_batches_tracked.fill_(7)
            elif isinstance(module, nn.Conv3d | nn.Linear):
                bound = 1.0 / math.sqrt(module.weight[0].numel())  # PyTorch's init range
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
    return model
