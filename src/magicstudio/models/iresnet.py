"""ArcFace IResNet backbones, parameter-for-parameter compatible with insightface ``arcface_torch``.

The module tree (and therefore every ``state_dict`` key) matches the published ``backbone.pth`` files:
``conv1``, ``bn1``, ``prelu``, ``layer{1..4}.{i}.{bn1,conv1,bn2,prelu,conv2,bn3,downsample.0,downsample.1}``,
``bn2``, ``fc``, ``features``. This is the face-recognition network R of MagiCapture's identity loss (Eq. 7).

Input: ``[B, 3, 112, 112]`` RGB scaled as ``(x / 255 - 0.5) / 0.5``, i.e. in ``[-1, 1]``. Output: the raw (not
normalised) embedding ``[B, num_features]``. ``width`` scales every stage (64 in the published models) so tests can
build a tiny network with the same structure.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# Blocks per stage of the published backbones, by insightface's short name.
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}

FC_SCALE = 7 * 7  # spatial size after four stride-2 stages on a 112x112 input


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """The arcface_torch IResNet: stem, four stride-2 stages, BN2d, dropout, fc, BatchNorm1d ``features``."""

    def __init__(
        self,
        layers: Sequence[int],
        width: int = 64,
        num_features: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"IResNet needs four stages of >= 1 block, got {list(layers)}")
        self.layers_config = tuple(int(n) for n in layers)
        self.width = width
        self.num_features = num_features
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-05)
        self.prelu = nn.PReLU(width)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1])
        self.layer3 = self._make_layer(width * 4, layers[2])
        self.layer4 = self._make_layer(width * 8, layers[3])
        self.bn2 = nn.BatchNorm2d(width * 8, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(width * 8 * FC_SCALE, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(conv1x1(self.inplanes, planes, 2), nn.BatchNorm2d(planes, eps=1e-05))
        stage = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        stage += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


def iresnet(arch: str, **kwargs) -> IResNet:
    """Build a published backbone by name (``"r18"``, ``"r34"``, ``"r50"``, ``"r100"``, ``"r200"``)."""
    if arch not in IRESNET_LAYERS:
        raise ValueError(f"unknown IResNet arch {arch!r}; known: {', '.join(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[arch], **kwargs)


def iresnet18(**kwargs) -> IResNet:
    return iresnet("r18", **kwargs)


def iresnet34(**kwargs) -> IResNet:
    return iresnet("r34", **kwargs)


def iresnet50(**kwargs) -> IResNet:
    return iresnet("r50", **kwargs)


def iresnet100(**kwargs) -> IResNet:
    return iresnet("r100", **kwargs)


def iresnet200(**kwargs) -> IResNet:
    return iresnet("r200", **kwargs)
