"""What a deployment engineer measures of an ONNX file, in onnxruntime on the CPU.

* batch-1 latency at one intra-op thread: the original and the candidate alternate in one process
  (load on the shared cores hits both alike), the least median of three rounds of fresh sessions.
  Each run is timed as the CPU time of the calling thread (one intra-op thread runs every kernel
  on it: on an idle core that is the wall time; on a shared one, the time other processes hold
  the core is left out);
* batch-N latency the same way, where every input's first axis is symbolic;
* session load time: median of ``InferenceSession`` constructions, the original's and the
  candidate's alternating;
* peak resident memory of a session: the peak resident size of a child process that imports
  onnxruntime, loads the session and runs it once, minus that of a baseline child that stops
  before the session; the session floor is the same measure of a model whose one node per input
  passes it through (what any session costs however small its model). The peak is ``VmHWM`` of
  ``/proc/self/status`` where there is one: ``ru_maxrss`` survives ``exec`` on Linux, so a child spawned by this (large) process would report
  at least this process's size; ``ru_maxrss`` elsewhere.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

Feeds = dict[str, np.ndarray]

# The child measured for peak memory (kB); with no model it is the baseline (imports and data only).
_MEMORY_CHILD = """
import resource, sys
import numpy as np
import onnxruntime as ort
feeds = dict(np.load(sys.argv[2]))
if sys.argv[1]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"]).run(None, feeds)
try:
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    print(int(status.split()[0]))
except (OSError, IndexError):
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@dataclass
class Deployment:
    """Measures of one file; latencies are paired with the original's, measured alongside."""

    latency_b1_ms: float | None = None
    original_latency_b1_ms: float | None = None
    latency_bn_ms: float | None = None
    original_latency_bn_ms: float | None = None
    batch_n: int | None = None
    load_s: float | None = None
    original_load_s: float | None = None
    peak_memory_mb: float | None = None
    floor_memory_mb: float | None = None
    error: str | None = None


def session(path: str | Path) -> ort.InferenceSession:
    """A CPU session at one intra-op thread, as latency is compared."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def first_rows(npz: str | Path, count: int) -> Feeds:
    """The first ``count`` samples of every input (samples on axis 0, as the corpus stores them)."""
    with np.load(npz) as data:
        return {name: data[name][:count] for name in data.files}


def batch_is_dynamic(path: str | Path) -> bool:
    """Whether every input declares a symbolic (or unknown) first axis."""
    inputs = session(path).get_inputs()
    return all(item.shape and not isinstance(item.shape[0], int) for item in inputs)


def paired_latency(original: str | Path, candidate: str | Path, feeds: Feeds, repeats: int,
                   rounds: int = 3, warmup: int = 3) -> tuple[float, float]:
    """Seconds per run (CPU time of this thread) of the original and the candidate, alternating
    run by run.

    In each of ``rounds`` rounds both get fresh sessions, ``warmup`` runs, then ``repeats /
    rounds`` timed runs each; a model's time is the least of its per-round medians (on shared
    cores a whole round of one session can run 3x slower, a median within a round is not enough).
    """
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        sessions = [session(original), session(candidate)]
        for _ in range(warmup):
            for item in sessions:
                item.run(None, feeds)
        times: list[list[float]] = [[], []]
        for _ in range(max(1, repeats // rounds)):
            for index, item in enumerate(sessions):
                start = time.thread_time()
                item.run(None, feeds)
                times[index].append(time.thread_time() - start)
        best = [min(value, statistics.median(samples)) for value, samples in zip(best, times)]
    return best[0], best[1]


def load_seconds(*paths: str | Path, tries: int = 5) -> list[float]:
    """Median seconds to construct a session (reading, optimizing, allocating initializers) of
    each path, the paths alternating try by try."""
    samples: list[list[float]] = [[] for _ in paths]
    for _ in range(tries):
        for index, path in enumerate(paths):
            start = time.perf_counter()
            session(path)
            samples[index].append(time.perf_counter() - start)
    return [statistics.median(values) for values in samples]


def _child_maxrss_kb(model: str, rows: Path, timeout: float) -> int:
    done = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, model, str(rows)], capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit {done.returncode}")
    return int(done.stdout.strip().splitlines()[-1])


def peak_memory_mb(path: str | Path, rows: Path, baseline_kb: int, timeout: float = 300) -> float:
    """Peak resident MB that loading ``path`` and running it once on ``rows`` adds to a process."""
    return max(_child_maxrss_kb(str(path), rows, timeout) - baseline_kb, 0) / 1024


def baseline_maxrss_kb(rows: Path, timeout: float = 300) -> int:
    """Peak resident kB of a child that imports onnxruntime and loads ``rows``, and nothing more."""
    return _child_maxrss_kb("", rows, timeout)


def session_floor_mb(original: str | Path, rows: Path, baseline_kb: int, work: Path,
                     timeout: float = 300) -> float:
    """Peak resident MB of a session whose model only passes ``original``'s inputs through
    (Identity nodes): no file, however compressed, loads in less."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(original), load_external_data=False).graph
    initializers = {item.name for item in graph.initializer}
    inputs = [item for item in graph.input if item.name not in initializers]
    nodes = [helper.make_node("Identity", [item.name], [f"floor_out_{index}"]) for index, item in enumerate(inputs)]
    outputs = [helper.make_value_info(f"floor_out_{index}", item.type) for index, item in enumerate(inputs)]
    model = helper.make_model(helper.make_graph(nodes, "session_floor", list(inputs), outputs),
                              opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path = work / "session_floor.onnx"
    onnx.save(model, str(path))
    return peak_memory_mb(path, rows, baseline_kb, timeout)


def save_rows(feeds: Feeds, path: Path) -> Path:
    np.savez(path, **feeds)
    return path


@dataclass
class Bench:
    """How one corpus file's outputs are measured: its original, its rows, repeats and batch."""

    original: Path
    calib: Path
    work: Path
    repeats: int = 50
    batch_n: int = 8

    def __post_init__(self) -> None:
        self.row = first_rows(self.calib, 1)
        self.rows_file = save_rows(self.row, self.work / "row0.npz")
        self.baseline_kb = baseline_maxrss_kb(self.rows_file)
        dynamic = batch_is_dynamic(self.original)
        self.batch = first_rows(self.calib, self.batch_n) if dynamic else None
        try:
            self.floor_mb: float | None = session_floor_mb(self.original, self.rows_file, self.baseline_kb, self.work)
        except Exception:  # noqa: BLE001 - the floor only explains a target; the runs go on without it
            self.floor_mb = None

    def own(self, path: Path) -> Deployment:
        """Load time and peak memory of ``path`` alone (what the original is measured by)."""
        return self._measured(path, paired=False)

    def measure(self, candidate: Path) -> Deployment:
        """All the measures of ``candidate``, latencies paired with the original's."""
        return self._measured(candidate, paired=True)

    def _measured(self, candidate: Path, paired: bool) -> Deployment:
        result = Deployment()
        try:
            if paired:
                self._latencies(candidate, result)
                result.original_load_s, result.load_s = load_seconds(self.original, candidate)
            else:
                (result.load_s,) = load_seconds(candidate)
                result.floor_memory_mb = self.floor_mb
            result.peak_memory_mb = peak_memory_mb(candidate, self.rows_file, self.baseline_kb)
        except Exception as exc:  # noqa: BLE001 - a file onnxruntime cannot run is a measured result
            lines = str(exc).strip().splitlines()
            result.error = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
        return result

    def _latencies(self, candidate: Path, result: Deployment) -> None:
        result.original_latency_b1_ms, result.latency_b1_ms = (
            1e3 * value for value in paired_latency(self.original, candidate, self.row, self.repeats))
        if self.batch is not None:
            result.batch_n = len(next(iter(self.batch.values())))
            result.original_latency_bn_ms, result.latency_bn_ms = (
                1e3 * value for value in paired_latency(self.original, candidate, self.batch,
                                                        max(9, self.repeats // 2)))

