"""Cost of running the first onnxruntime probe of an input model in a child process.

``onnxzip compress --cluster bits=4`` on the reference models through the Python API, with the
child-process probe (the default) and with it replaced by a no-op, alternating runs; prints each
median and the ratio, plus the probe's own wall time.

Usage: ``python benchmarks/bench_probe.py [--repeats 3]``
"""
from __future__ import annotations

import argparse
import statistics
import time

import onnx

import onnxzip.api
from onnxzip.core.inputs import generate_inputs
from onnxzip.models.zoo import get_reference_model
from onnxzip.core.sanity import probe_feeds, probe_in_child


def timed_compress(path: str) -> float:
    start = time.perf_counter()
    onnxzip.api.compress(path, cluster={"bits": 4}, allow_gate_failure=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    real_probe = onnxzip.api.probe_in_child
    for name in ("cnn", "transformer"):
        path = str(get_reference_model(name).onnx_path)
        model = onnx.load(path)
        probe = [probe_in_child(model, probe_feeds(model, generate_inputs(model, batch=2))) for _ in range(args.repeats)]
        timed_compress(path)  # warm caches
        with_probe, without = [], []
        for _ in range(args.repeats):
            onnxzip.api.probe_in_child = real_probe
            with_probe.append(timed_compress(path))
            onnxzip.api.probe_in_child = lambda *a, **k: 0.0
            without.append(timed_compress(path))
        onnxzip.api.probe_in_child = real_probe
        a, b = statistics.median(with_probe), statistics.median(without)
        print(f"{name}: compress --cluster bits=4 with probe {a:.2f} s, without {b:.2f} s "
              f"(ratio {a / b:.2f}, +{a - b:.2f} s); probe alone {statistics.median(probe):.2f} s")


if __name__ == "__main__":
    main()
