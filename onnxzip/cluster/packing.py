"""Bit packing of cluster indices: several b-bit indices per byte (b in 1, 2, 4, 8).

Layout (little-endian within the byte): index i goes to byte i // (8/b) at bit offset
(i mod (8/b))·b, so the first index of a byte sits in its least significant bits. The last byte
is padded with zero indices. The ONNX decode graph reproduces :func:`unpack_indices` exactly:
``BitShift(RIGHT)`` of every byte by the offsets [0, b, 2b, ...], ``BitwiseAnd`` with 2**b − 1,
flatten, slice the first ``count``.
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
