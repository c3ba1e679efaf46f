"""onnxruntime's own int8 quantizers, as a user would call them on a real file.

    python ort_peer.py {dynamic|static} INPUT.onnx OUTPUT.onnx CALIB.npz

``dynamic``: ``quantize_dynamic`` (int8 weights, activations quantized at run time).
``static``: ``quantize_static``, QDQ format, per-channel int8 weights, activations calibrated
(MinMax) on every row of CALIB.npz fed one sample at a time; the file is first converted to
opset 13 when it declares less (per-axis DequantizeLinear) and pre-processed with
``quant_pre_process(skip_symbolic_shape=True)`` (symbolic shape inference fails on most real
files); when ``quantize_static`` raises, it is retried with ``QDQDisableWeightAdjustForInt32Bias``.

Prints one JSON line (the variant that worked, notes); on failure the last stderr line says why
and the exit code is 1.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx
from _common import at_least_opset, calib_rows, one_line, try_variants
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process


class RowReader(CalibrationDataReader):
    """The calibration rows, one sample per call (fixed-batch-1 files accept nothing else)."""

    def __init__(self, npz: str) -> None:
        self.rows = calib_rows(npz)

    def get_next(self) -> dict | None:
        return next(self.rows, None)


def prepared_input(source: Path, scratch: Path) -> tuple[Path, list[str]]:
    """The file static quantization starts from: at least opset 13, pre-processed when that works."""
    notes: list[str] = []
    model, note = at_least_opset(onnx.load(str(source)))
    converted = scratch / "opset.onnx"
    onnx.save(model, str(converted))
    if note:
        notes.append(note)
    processed = scratch / "pre.onnx"
    try:
        quant_pre_process(str(converted), str(processed), skip_symbolic_shape=True)
        return processed, notes
    except Exception as exc:  # noqa: BLE001 - a failed pre-process is a note, the raw file is used
        notes.append(f"quant_pre_process failed ({one_line(exc)}); quantized without it")
        return converted, notes


def main(argv: list[str]) -> int:
    method, source, output, calib = argv
    source_path, output_path = Path(source), Path(output)
    first = next(calib_rows(calib))
    if method == "dynamic":
        variants = [("quantize_dynamic int8", lambda out: quantize_dynamic(str(source_path), str(out),
                                                                           weight_type=QuantType.QInt8))]
        return try_variants(variants, output_path, first)
    with tempfile.TemporaryDirectory() as scratch:
        prepared, notes = prepared_input(source_path, Path(scratch))

        def static(extra: dict) -> object:
            def build(out: Path) -> list[str]:
                quantize_static(str(prepared), str(out), RowReader(calib), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, extra_options=extra)
                return notes
            return build

        variants = [("qdq per-channel int8", static({})),
                    ("qdq per-channel int8, QDQDisableWeightAdjustForInt32Bias",
                     static({"QDQDisableWeightAdjustForInt32Bias": True}))]
        return try_variants(variants, output_path, first)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
