"""ResNet-style CNN for 16×16 digits: BatchNorm everywhere, residual blocks, projection skips.

Built for Method 2 (BN-scale channel pruning and whole-residual-block pruning): every 3×3 Conv
is followed by a BatchNorm, and blocks without a projection can be removed entirely.
"""

from __future__ import annotations

import torch
from torch import nn

from onnxzip.models.train import TrainConfig

STAGE_WIDTHS = (32, 64, 128)
BLOCKS_PER_STAGE = 2
NUM_CLASSES = 10

TRAIN_CONFIG = TrainConfig(epochs=6, learning_rate=3e-3, weight_decay=5e-4, max_shift=1)
# Sparsity training (method 2, step 1): L1 on every BN scale drives unneeded channels' γ to ~0,
# so pruning them by |γ| loses little (reference model "cnn-sparse").
SPARSE_TRAIN_CONFIG = TrainConfig(epochs=8, learning_rate=3e-3, weight_decay=5e-4, max_shift=1, bn_l1=1e-2)


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Conv3×3-BN-ReLU-Conv3×3-BN plus skip, ReLU after the add (He et al. 2016).

    The skip is a 1×1 Conv+BN projection when the shape changes, the identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(in_channels, out_channels, 3, stride)
        self.conv2 = _conv_bn(out_channels, out_channels, 3, 1)
        self.relu = nn.ReLU()
        self.shortcut = (
            _conv_bn(in_channels, out_channels, 1, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv2(self.relu(self.conv1(x)))
        return self.relu(residual + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Stem Conv3×3(1→32)+BN+ReLU, 3 stages × 2 BasicBlocks, global average pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(1, STAGE_WIDTHS[0], 3, 1), nn.ReLU())
        blocks = []
        in_channels = STAGE_WIDTHS[0]
        for stage, width in enumerate(STAGE_WIDTHS):
            for index in range(BLOCKS_PER_STAGE):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(in_channels, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.blocks(self.stem(x)))))


def build() -> DigitsResNet:
    """A freshly initialized (untrained) CNN; seed torch first for reproducible weights."""
    return DigitsResNet()
