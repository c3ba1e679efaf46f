"""Bit packing of cluster indices: any width b from 1 to 8 bits per index, stored densely.

Widths 1, 2, 4 and 8 (:data:`PACK_BITS`) divide a byte: index i goes to byte i // (8/b) at bit
offset (i mod (8/b))·b, so the first index of a byte sits in its least significant bits; the
last byte is padded with zero indices. The ONNX decode of the cluster pass reproduces
:func:`unpack_indices` exactly with a ``Gather`` from a [256, 8/b] table whose row v holds the
indices packed in byte value v, then a Reshape (and a Slice of the first ``count`` when padded).

Any other width is a sum of those (:func:`plane_widths`: 3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2,
7 = 4 + 2 + 1): the index splits into planes, plane j holding bits [s_j, s_j + p_j) of every
index, each packed as above, and the decode sums ``plane_j · 2**s_j``. The planes total exactly
b bits per index (plus at most one padding byte per plane), so a K-entry codebook costs
⌈log₂K⌉ bits per index (:func:`storage_bits`).
"""
from __future__ import annotations

import numpy as np

from onnxzip.errors import ConfigError, DataError

PACK_BITS = (1, 2, 4, 8)
INDEX_BITS = tuple(range(1, 9))


def _per_byte(bits: int) -> int:
    if bits not in PACK_BITS:
        raise ConfigError(f"index bit width must be one of {PACK_BITS}, got {bits}.")
    return 8 // bits


def _offsets(bits: int) -> np.ndarray:
    return np.arange(0, 8, bits, dtype=np.uint8)


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer indices < 2**bits (bits in :data:`PACK_BITS`) into ceil(count·bits/8) bytes
    (uint8, 1-D)."""
    per_byte = _per_byte(bits)
    flat = np.asarray(indices).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise DataError(f"indices must lie in [0, {1 << bits}) to pack them in {bits} bits.")
    padded = np.zeros(-(-flat.size // per_byte) * per_byte, dtype=np.uint8)
    padded[:flat.size] = flat
    shifted = padded.reshape(-1, per_byte) << _offsets(bits)
    return np.bitwise_or.reduce(shifted, axis=1).astype(np.uint8)


def unpack_indices(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: the first ``count`` indices, uint8, 1-D."""
    per_byte = _per_byte(bits)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if not 0 <= count <= packed.size * per_byte:
        raise DataError(f"{packed.size} bytes hold at most {packed.size * per_byte} "
                        f"{bits}-bit indices, asked for {count}.")
    mask = np.uint8((1 << bits) - 1)
    return ((packed[:, None] >> _offsets(bits)) & mask).reshape(-1)[:count]


def plane_widths(bits: int) -> list[tuple[int, int]]:
    """(plane width, bit shift) of each plane of a ``bits``-wide index, widest (high bits)
    first: 7 → [(4, 3), (2, 1), (1, 0)], 4 → [(4, 0)]."""
    if bits not in INDEX_BITS:
        raise ConfigError(f"index bit width must be from 1 to 8, got {bits}.")
    planes, shift = [], bits
    for width in PACK_BITS[::-1]:
        if width <= shift and (bits & width or bits == width):
            shift -= width
            planes.append((width, shift))
    return planes


def pack_planes(indices: np.ndarray, bits: int) -> list[tuple[int, int, np.ndarray]]:
    """Indices < 2**bits (any width 1-8) as planes ``(width, shift, packed bytes)``:
    index = Σ unpack(plane)·2**shift."""
    flat = np.asarray(indices).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise DataError(f"indices must lie in [0, {1 << bits}) to pack them in {bits} bits.")
    flat = flat.astype(np.uint8)
    return [
        (width, shift, pack_indices((flat >> shift) & ((1 << width) - 1), width))
        for width, shift in plane_widths(bits)
    ]


def unpack_planes(planes: list[tuple[int, int, np.ndarray]], count: int) -> np.ndarray:
    """Inverse of :func:`pack_planes`: the first ``count`` indices, uint8, 1-D."""
    total = np.zeros(count, dtype=np.uint8)
    for width, shift, packed in planes:
        total |= unpack_indices(packed, width, count) << np.uint8(shift)
    return total


def packed_bytes(count: int, bits: int) -> int:
    """Bytes the planes of ``count`` indices of width ``bits`` take (padding included)."""
    return sum(-(-count * width // 8) for width, _shift in plane_widths(bits))


def storage_bits(k: int) -> int:
    """Bits per stored index for a codebook of ``k`` entries: ⌈log₂ k⌉ (at least 1), so K = 13
    is stored in 4 bits, K = 17 in 5."""
    if not 1 <= k <= 1 << INDEX_BITS[-1]:
        raise ConfigError(f"a codebook of {k} entries needs more than {INDEX_BITS[-1]} bits per "
                          f"index; use k ≤ {1 << INDEX_BITS[-1]}.")
    return max(1, int(k - 1).bit_length())
