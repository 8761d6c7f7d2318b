"""Pixel-wise encoders F_Q: image (B,C,H,W) -> embeddings Q (B,P,H,W) at full resolution.

`conv3x3` is the paper's per-pixel perceptron; `resnet18` and `unet` are the Table 4 swaps,
randomly initialised like the rest of the model (the method uses no pretrained weights). C is 3
(RGB) or 4 (Potsdam's RGB + IR). Each ends in BatchNorm2d(P), `final_bn`; `features(x)` runs
everything before it (for the BatchNorm fold, kernels/seat_bn_fold.py). The ResNet-18 and UNet trunks also serve as backbones of the
semantic-wise generator (san_fast.model.variants).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PixelPerceptron(nn.Module):
    """Conv3x3(C->P/2)+BN+GELU, then the pixel-to-pixel Conv1x1(P/2->P)+BN."""

    def __init__(self, dim: int, in_channels: int = 3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, dim // 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(dim // 2),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, 1, bias=False),
            nn.BatchNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def final_bn(self) -> nn.BatchNorm2d:
        return self.net[-1]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, y at full resolution): final_bn's input, and what forward would normalise and return."""
        y = self.net[:-1](x)
        return y, y


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dilation: int):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride, dilation)
        self.conv2 = _conv_bn(cout, cout, 1, dilation)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class ResNet18Trunk(nn.Module):
    """ResNet-18 at output stride 8 (dilated last stages, as in segmentation backbones):
    (B,C,H,W) -> (B,512,H/8,W/8)."""

    out_channels, stride = 512, 8

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride, dilation in ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4)):
            layers += [BasicBlock(cin, cout, stride, dilation), BasicBlock(cout, cout, 1, dilation)]
            cin = cout
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))


class UNetTrunk(nn.Module):
    """A four-level UNet (double 3x3 convs, max-pool down, transposed-conv up, skips):
    (B,C,H,W) -> (B,base,H,W); H and W must be multiples of 2**(levels-1)."""

    stride = 1

    def __init__(self, in_channels: int = 3, base: int = 32, levels: int = 4):
        super().__init__()
        widths = [base * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(self._double(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.merge.append(self._double(2 * w, w))
            cin = w
        self.out_channels = cin
        self.levels = levels

    @staticmethod
    def _double(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(_conv_bn(cin, cout), nn.GELU(), _conv_bn(cout, cout), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (self.levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"unet needs H and W divisible by {factor}, got {tuple(x.shape[-2:])}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return x


class ResNet18Encoder(nn.Module):
    """The ResNet-18 trunk projected to P channels and upsampled back to the input size."""

    def __init__(self, dim: int, in_channels: int = 3):
        super().__init__()
        self.trunk = ResNet18Trunk(in_channels)
        self.head = nn.Sequential(nn.Conv2d(self.trunk.out_channels, dim, 1, bias=False),
                                  nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.trunk(x))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

    @property
    def final_bn(self) -> nn.BatchNorm2d:
        return self.head[-1]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, y upsampled): BatchNorm's statistics come from y at 1/8 resolution; its
        per-channel affine commutes with bilinear upsampling (weights summing to one), so it
        can be applied to the upsampled tensor instead."""
        y = self.head[0](self.trunk(x))
        return y, F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class UNetEncoder(nn.Module):
    """The UNet trunk projected to P channels at full resolution."""

    def __init__(self, dim: int, in_channels: int = 3, base: int = 32, levels: int = 4):
        super().__init__()
        self.trunk = UNetTrunk(in_channels, base, levels)
        self.head = nn.Sequential(nn.Conv2d(self.trunk.out_channels, dim, 1, bias=False),
                                  nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    @property
    def final_bn(self) -> nn.BatchNorm2d:
        return self.head[-1]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.head[0](self.trunk(x))
        return y, y


def build_encoder(name: str, dim: int, in_channels: int = 3) -> nn.Module:
    if name == "conv3x3":
        return PixelPerceptron(dim, in_channels)
    if name == "resnet18":
        return ResNet18Encoder(dim, in_channels)
    if name == "unet":
        return UNetEncoder(dim, in_channels)
    raise ValueError(f"encoder {name!r}: expected conv3x3, resnet18 or unet")
