"""Transformer-encoder classifier reading a digit as a sequence of 8 rows of 8 pixels.

Attention is written with explicit Linear and matmul ops (not ``nn.MultiheadAttention``) so the
ONNX export is a clean chain of MatMul/Add/Softmax — the targets of the SVD and clustering passes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from onnxzip.models.train import TrainConfig

SEQUENCE_LENGTH = 8
FEATURES = 8
D_MODEL = 128
HEADS = 4
FFN_WIDTH = 512
LAYERS = 4
NUM_CLASSES = 10
DROPOUT = 0.1

TRAIN_CONFIG = TrainConfig(epochs=25, learning_rate=2e-3, weight_decay=1e-2)


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention: softmax(Q Kᵀ / √d_head) V per head.

    Heads are split and merged with reshapes to constant shapes (``-1`` for the batch), so the
    export has no Shape/Gather/Concat chains around each Reshape; the sequence length is fixed.
    """

    def __init__(self, d_model: int, heads: int, sequence_length: int) -> None:
        super().__init__()
        self.heads = heads
        self.sequence_length = sequence_length
        self.head_dim = d_model // heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, seq, d_model) -> (batch, heads, seq, head_dim)
        return x.reshape(-1, self.sequence_length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self._split_heads(self.query(x))
        key = self._split_heads(self.key(x))
        value = self._split_heads(self.value(x))
        scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(self.head_dim)
        context = torch.matmul(torch.softmax(scores, dim=-1), value)
        merged = context.transpose(1, 2).reshape(
            -1, self.sequence_length, self.heads * self.head_dim
        )
        return self.out(merged)


class EncoderLayer(nn.Module):
    """Pre-norm encoder layer: x + Attn(LN(x)), then x + FFN(LN(x)), FFN = Linear-ReLU-Linear."""

    def __init__(
        self, d_model: int, heads: int, ffn_width: int, dropout: float, sequence_length: int
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, heads, sequence_length)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_width), nn.ReLU(), nn.Linear(ffn_width, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class DigitsTransformer(nn.Module):
    """Linear(8→128) + learned positions, 4 encoder layers, final LayerNorm, mean pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, D_MODEL)
        self.position = nn.Parameter(torch.zeros(1, SEQUENCE_LENGTH, D_MODEL))
        nn.init.normal_(self.position, std=0.02)
        self.layers = nn.Sequential(
            *(
                EncoderLayer(D_MODEL, HEADS, FFN_WIDTH, DROPOUT, SEQUENCE_LENGTH)
                for _ in range(LAYERS)
            )
        )
        self.norm = nn.LayerNorm(D_MODEL)
        self.classifier = nn.Linear(D_MODEL, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.layers(self.embed(x) + self.position)
        return self.classifier(self.norm(hidden).mean(dim=1))


def build() -> DigitsTransformer:
    """A freshly initialized (untrained) transformer; seed torch first for reproducible weights."""
    return DigitsTransformer()
