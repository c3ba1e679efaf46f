"""Load and run, in whatever onnxruntime is installed (CI: the newest release, in its own
virtual environment), every model listed in a file of paths that onnxzip wrote.

Usage: python tools/check_newest_runtime.py WRITTEN_LIST
Prints one line per failing model and a summary; exits 1 when any model fails.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnxzip.core.inputs import generate_inputs  # noqa: E402  (numpy + onnx only)


def check(path: Path) -> str | None:
    model = onnx.load(str(path), load_external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    try:
        feeds = generate_inputs(model, batch=2, dims={}, seed=0)
    except Exception:  # noqa: BLE001 - models with unknown symbolic dims: loading is the check
        return None
    outputs = session.run(None, feeds)
    if not all(np.all(np.isfinite(o)) for o in outputs if np.issubdtype(np.asarray(o).dtype, np.floating)):
        return "non-finite outputs"
    return None


def main() -> int:
    listed = Path(sys.argv[1]).read_text().split()
    paths = sorted({Path(p) for p in listed if Path(p).is_file()})
    print(f"onnxruntime {ort.__version__}: checking {len(paths)} models written by onnxzip")
    passed = failed = 0
    for path in paths:
        try:
            problem = check(path)
        except Exception as exc:  # noqa: BLE001 - report every failure, keep going
            problem = str(exc).splitlines()[0]
        if problem:
            failed += 1
            print(f"FAIL {path}: {problem}")
        else:
            passed += 1
    print(f"newest onnxruntime: {passed} models loaded and ran, {failed} did not")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
