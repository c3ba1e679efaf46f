"""The corpus's own task scorer as an onnxzip ``task:`` metric, for the loops of
``bench_realfiles.py --loops``: ``kept(model_path)`` is 1.0 when the candidate keeps the file's
task tolerance (``realfiles.py score``, run against the original on the file's evaluation data),
else 0.0; the loop's condition is ``task:realfiles_task.py:kept:min=1``.

The file and its data come from ``ONNXZIP_BENCH_FILE`` / ``ONNXZIP_BENCH_DATA``, which the
benchmark sets for each run; the scorer from ``ONNXZIP_REALFILES``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def kept(model_path: str) -> float:
    """1.0 when ``model_path`` keeps the corpus file's task tolerance, else 0.0."""
    name, data, scorer = (os.environ[key] for key in ("ONNXZIP_BENCH_FILE", "ONNXZIP_BENCH_DATA", "ONNXZIP_REALFILES"))
    done = subprocess.run([sys.executable, scorer, "score", name, str(model_path), "--data", data],
                          capture_output=True, text=True, check=True)
    return 1.0 if json.loads(done.stdout.strip().splitlines()[-1])["quality_kept"] else 0.0
