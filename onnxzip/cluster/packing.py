"""Bit packing of cluster indices: several b-bit indices per byte (b in 1, 2, 4, 8).

Layout (little-endian within the byte): index i goes to byte i // (8/b) at bit offset
(i mod (8/b))·b, so the first index of a byte sits in its least significant bits. The last byte
is padded with zero indices. The ONNX decode graph of the cluster pass reproduces
:func:`unpack_indices` exactly with a ``Gather`` from a [256, 8/b] table whose row v holds the
indices packed in byte value v, then a Reshape (and a Slice of the first ``count`` when padded).
"""
from __future__ import annotations

import numpy as np

from onnxzip.errors import ConfigError, DataError

PACK_BITS = (1, 2, 4, 8)


def _per_byte(bits: int) -> int:
    if bits not in PACK_BITS:
        raise ConfigError(f"index bit width must be one of {PACK_BITS}, got {bits}.")
    return 8 // bits


def _offsets(bits: int) -> np.ndarray:
    return np.arange(0, 8, bits, dtype=np.uint8)


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer indices < 2**bits into ceil(count·bits/8) bytes (uint8, 1-D)."""
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


def storage_bits(k: int) -> int:
    """Bits per stored index for a codebook of ``k`` entries: the smallest of :data:`PACK_BITS`
    with 2**bits ≥ k (K = 13 is stored in 4 bits, K = 17 in 8)."""
    for bits in PACK_BITS:
        if k <= 1 << bits:
            return bits
    raise ConfigError(f"a codebook of {k} entries needs more than {PACK_BITS[-1]} bits per index; "
                      f"use k ≤ {1 << PACK_BITS[-1]}.")
