"""NNCF 3.x on a real ONNX file, as a user would call it (runs in the peer venv: plain onnxruntime).

    python nncf_peer.py {quantize|int8|int4} INPUT.onnx OUTPUT.onnx CALIB.npz

``quantize``: ``nncf.quantize`` (int8 post-training quantization) calibrated on the rows of
CALIB.npz, one sample per row; retried with Conv in the ignored scope when the file it writes
does not load (NNCF writes Conv weight scales as ``[C,1,1]``, which onnxruntime rejects).
``int8`` / ``int4``: ``nncf.compress_weights`` weight-only INT8_ASYM / INT4_SYM (data-free
defaults); when that fails, retried with Conv ignored (the same ``[C,1,1]`` scales) and
``group_size_fallback_mode=ADJUST`` (where channels do not divide the group size). Files below
opset 13 are converted first (NNCF refuses per-channel schemes there).

Prints one JSON line (the variant that worked, notes); on failure the last stderr line says why
and the exit code is 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nncf
import onnx
from _common import at_least_opset, calib_rows, try_variants
from nncf.quantization.advanced_parameters import AdvancedCompressionParameters


def main(argv: list[str]) -> int:
    method, source, output, calib = argv
    note = at_least_opset(onnx.load(source))[1]
    notes = [note] if note else []
    rows = list(calib_rows(calib))

    def model() -> onnx.ModelProto:
        """A fresh copy for each variant: a failed try may have changed the one it was given."""
        return at_least_opset(onnx.load(source))[0]

    def save(built: onnx.ModelProto, out: Path) -> list[str]:
        onnx.save(built, str(out))
        return notes

    no_conv = nncf.IgnoredScope(types=["Conv"], validate=False)
    if method == "quantize":
        dataset = nncf.Dataset(rows)
        variants = [
            ("nncf.quantize", lambda out: save(nncf.quantize(model(), dataset), out)),
            ("nncf.quantize, Conv ignored", lambda out: save(nncf.quantize(model(), dataset, ignored_scope=no_conv), out)),
        ]
    else:
        mode = nncf.CompressWeightsMode.INT8_ASYM if method == "int8" else nncf.CompressWeightsMode.INT4_SYM
        adjust = AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST)
        variants = [(f"compress_weights {mode.name}", lambda out: save(nncf.compress_weights(model(), mode=mode), out)),
                    (f"compress_weights {mode.name}, Conv ignored, group size ADJUST", lambda out: save(
                        nncf.compress_weights(model(), mode=mode, ignored_scope=no_conv, advanced_parameters=adjust), out))]
    return try_variants(variants, Path(output), rows[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
