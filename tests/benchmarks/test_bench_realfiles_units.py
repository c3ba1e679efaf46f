"""The pure helpers of benchmarks/bench_realfiles.py on synthetic records (no corpus, no network)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS / "peers"))

import bench_realfiles as bench  # noqa: E402
from _common import calib_rows  # noqa: E402
from _deploy import Deployment  # noqa: E402


def run(method: str, ratio: float | None, kept: bool | None, family: str = "onnxzip", **deploy) -> bench.Run:
    return bench.Run("captcha_crnn", family, method, ratio=ratio, quality_kept=kept,
                     deploy=Deployment(**deploy) if deploy else None)


def test_best_within_tolerance_takes_the_largest_ratio_that_keeps_the_tolerance():
    runs = [run("bits=4", 7.6, True), run("bits=3", 10.1, True), run("avg_bits=2.5", 12.8, False),
            run("avg_bits=3+ft", None, None)]
    assert bench.best_within_tolerance(runs).method == "bits=3"


def test_best_within_tolerance_is_none_when_nothing_keeps_it():
    assert bench.best_within_tolerance([run("bits=3", 10.0, False), run("bits=4", None, None)]) is None
    assert bench.best_within_tolerance([]) is None


def test_ratios_are_original_over_candidate():
    assert bench.size_ratio(19_351_359, 2_543_000) == pytest.approx(7.6096, rel=1e-4)
    assert bench.times_better(2.0, 0.5) == 4.0
    assert bench.times_better(1.0, 2.0) == 0.5
    assert bench.times_better(None, 1.0) is None and bench.times_better(1.0, 0.0) is None


def test_speedups_pair_latency_with_its_own_original_and_memory_with_the_originals_run():
    original = run("original", 1.0, True, family="original", load_s=0.02, peak_memory_mb=40.0)
    candidate = run("bits=4", 7.6, True, latency_b1_ms=1.0, original_latency_b1_ms=3.0, load_s=0.08,
                    original_load_s=0.04, peak_memory_mb=20.0)
    ratios = bench.speedups(candidate, original)
    assert ratios == {"latency_b1_x": 3.0, "latency_bn_x": None, "load_x": 0.5, "memory_x": 2.0}
    broken = run("bits=4", 7.6, None, error="RuntimeError: cannot load")
    assert set(bench.speedups(broken, original).values()) == {None}


def test_last_line_reads_through_progress_bars():
    stderr = "cluster  10%|#\rcluster 100%|####\nonnxzip: error: invalid dimensions for input_3\n\n"
    assert bench.last_line(stderr) == "onnxzip: error: invalid dimensions for input_3"
    assert bench.last_line("  \n") is None
    error = ("onnxzip: internal error: InvalidArgument: Got invalid dimensions for input: input_3\n"
             " index: 0 Got: 32 Expected: 1\n Please fix either the inputs/outputs or the model.\n")
    assert bench.last_line("progress 5%\r" + error) == (
        "onnxzip: internal error: InvalidArgument: Got invalid dimensions for input: input_3 "
        "index: 0 Got: 32 Expected: 1 Please fix either the inputs/outputs or the model.")


def test_summary_lists_best_per_family_and_one_line_per_failure():
    original = run("original", 1.0, True, family="original", load_s=0.01, peak_memory_mb=10.0)
    original.score = {"score": 85.5}
    failed = run("avg_bits=3+ft", None, None)
    failed.exit_code, failed.seconds, failed.reason = 3, 12.0, "onnxzip: internal error: IndexError"
    result = bench.FileResult("captcha_crnn", original, [
        run("bits=4", 7.6, True, latency_b1_ms=1.0, original_latency_b1_ms=1.0, peak_memory_mb=10.0),
        failed, run("quantize_static", 3.9, False, family="ort static QDQ")])
    lines = bench.summary_table([result])
    row = next(line for line in lines if line.startswith("captcha_crnn "))
    assert "7.60x bits=4 (lat 1.00x, mem 1.00x)" in row and "none kept" in row
    assert "captcha_crnn onnxzip avg_bits=3+ft: exit 3, 12 s: onnxzip: internal error: IndexError" in lines


def test_run_command_kills_the_whole_group_on_timeout():
    start = time.perf_counter()
    outcome = bench.run_command(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.5)
    assert outcome.exit_code is None and outcome.reason == "timed out after 0.5 s"
    assert time.perf_counter() - start < 5


def test_calib_rows_are_single_samples_of_every_input(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.arange(12, dtype=np.float32).reshape(3, 4), state=np.zeros((3, 2, 5)))
    rows = list(calib_rows(path))
    assert len(rows) == 3 and rows[2]["x"].tolist() == [[8, 9, 10, 11]] and rows[0]["state"].shape == (1, 2, 5)
    assert len(list(calib_rows(path, limit=2))) == 2


def test_an_absent_corpus_is_one_line_and_exit_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ONNXZIP_SHARED", str(tmp_path))
    assert bench.main(["--models", "dtln_stage1", "--skip-peers"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "scorer" in out[0] and "ONNXZIP_SHARED" in out[0]


def test_unknown_modes_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "bits=9"])


def test_speed_targets_name_the_run_that_meets_them_or_say_why_not():
    original = run("original", 1.0, True, family="original", peak_memory_mb=30.0)

    def measured(method, ratio, kept, speed, memory, family="onnxzip"):
        return run(method, ratio, kept, family=family, latency_b1_ms=10.0 / speed, original_latency_b1_ms=10.0,
                   peak_memory_mb=30.0 / memory)

    fast = bench.FileResult("captcha_crnn", original, [
        measured("svd+int8", 12.7, True, 2.64, 3.7), measured("avg_bits=2", 20.0, False, 3.0, 4.0),
        measured("quantize_static", 3.5, True, 1.49, 2.0, family="ort static QDQ")])
    slow = bench.FileResult("nsnet2_16k", original, [
        measured("svd+rec", 20.4, True, 1.41, 0.69), measured("bits=4", 7.5, True, 1.6, 0.9),
        measured("quantize_static", 1.27, True, 1.12, 1.1, family="ort static QDQ")])
    lines = bench.speed_targets([fast, slow])
    captcha = next(line for line in lines if line.startswith("captcha_crnn:"))
    nsnet = next(line for line in lines if line.startswith("nsnet2_16k:"))
    assert "met by svd+int8 (12.70x, 2.64x faster)" in captcha and "memory met" in captcha
    assert "vs static int8 (3.50x, 1.49x faster) met by svd+int8" in captcha
    assert "not met: the fastest kept file, bits=4, is 1.60x faster at 7.50x" in nsnet
    assert "at >= 8x the fastest is svd+rec (1.41x faster)" in nsnet and "memory not met" in nsnet
    assert "vs static int8 (1.27x, 1.12x faster) met by svd+rec" in nsnet
    assert lines[-1].startswith("1 of 2 files")


def test_ratio_targets_judge_each_file_against_10x_and_the_best_peer_and_give_the_geomean():
    original = run("original", 1.0, True, family="original")
    first = bench.FileResult("captcha_crnn", original, [
        run("avg_bits=3+gptq", 13.2, True), run("avg_bits=2.5+gptq", 16.0, False),
        run("quantize_static", 3.5, True, family="ort static QDQ")])
    second = bench.FileResult("dtln_stage2", original, [
        run("avg_bits=3.25+gptq", 9.0, True), run("nncf int8", 4.0, True, family="nncf")])
    third = bench.FileResult("open_nsfw", original, [run("bits=4", 7.8, False)])
    lines = bench.ratio_targets([first, second, third])
    assert "captcha_crnn: 13.20x avg_bits=3+gptq: met; 3.77x the best peer (ort static QDQ quantize_static 3.50x): met" in lines
    assert "dtln_stage2: 9.00x avg_bits=3.25+gptq: not met; 2.25x the best peer (nncf nncf int8 4.00x): not met" in lines
    assert "open_nsfw: no kept onnxzip file" in lines
    assert lines[-1] == "geometric mean over 2 of 3 files with a kept file: 10.90x (not met)"


def test_ft_modes_exist_for_the_gptq_modes():
    assert bench.MODES["bits=3+gptq+ft"] == ["--cluster", "bits=3,method=gptq", "--finetune", "epochs=3"]
    assert bench.MODES["avg_bits=3+gptq+ft"][-2:] == ["--finetune", "epochs=3"]


def test_finetune_summary_reads_the_epoch_kept_and_its_held_out_loss(tmp_path):
    report = tmp_path / "r.json"
    history = [{"epoch": 0, "val_loss": 0.2}, {"epoch": 1, "loss": 0.3, "seconds": 2.0, "val_loss": 0.25},
               {"epoch": 1, "loss": 0.2, "seconds": 2.5, "val_loss": 0.1}, {"epoch": 2, "seconds": 2.0, "val_loss": 0.15}]
    report.write_text(bench.json.dumps({"passes": [{"pass_name": "cluster"}, {
        "pass_name": "finetune", "details": {"trained_fraction": 0.987, "best_epoch": 1, "history": history},
        "changes": [{"decision": "trained"}, {"decision": "skipped"}],
        "notes": ["held back 7 of 36 training samples (seed 0) to select the epoch",
                  "epoch 1 made the held-out score worse: undone and retried at half the learning rate (0.5× the schedule)"]}]}))
    summary = bench.finetune_summary(report)
    assert summary["trained_percent"] == pytest.approx(98.7) and summary["frozen_tensors"] == 1
    assert summary["input_val_loss"] == 0.2 and summary["best_val_loss"] == 0.1  # the retried epoch 1
    assert summary["epoch_seconds"] == [2.0, 2.5, 2.0] and summary["held_back"].startswith("held back 7")
    line = bench.finetune_line(summary)
    assert "98.7% of the float parameters; epoch 1 kept (held-out loss 0.2 -> 0.1, -50%)" in line


def test_finetune_rows_give_before_after_and_the_gap_when_out_of_tolerance():
    original = run("original", 1.0, True, family="original")

    def scored(method, drop, kept, stoi=0.0, finetune=None):
        r = bench.Run("nsnet2_16k", "onnxzip", method, ratio=10.0, quality_kept=kept,
                      score={"score": 9.62 - drop, "drop": drop, "stoi_drop": stoi}, finetune=finetune)
        return r

    summary = {"trained_percent": 99.2, "frozen_tensors": 0, "kept": [], "best_epoch": 3, "input_val_loss": 0.04,
               "best_val_loss": 0.03, "held_back": "held back 6 of 32 training samples (seed 0) to select the epoch"}
    result = bench.FileResult("nsnet2_16k", original, [
        scored("bits=3+gptq", 1.8, False, 0.02), scored("bits=3+gptq+ft", 1.2, False, 0.012, summary),
        scored("bits=4+gptq", 0.2, False), scored("bits=4+gptq+ft", 0.3, True, 0.0, {**summary, "best_epoch": 0})])
    lines = bench.finetune_rows([result])
    b3 = next(i for i, line in enumerate(lines) if "bits=3+gptq+ft" in line)
    assert "99.2%" in lines[b3] and "7.82 (drop 1.8, stoi_drop 0.02)" in lines[b3] and "epoch 3" in lines[b3]
    assert "not kept: drop 1.2 > 0.5 (+0.7), stoi_drop 0.012 > 0.01 (+0.002)" in lines[b3]
    assert "why: the held-out distillation loss fell 25% (0.04 -> 0.03); the task drop went 1.8 -> 1.2 (33% of it " \
           "closed)" in lines[b3 + 1]
    b4 = next(i for i, line in enumerate(lines) if "bits=4+gptq+ft" in line)
    assert "input" in lines[b4] and lines[b4].endswith("kept")
    assert "WORSE than its input: drop 0.2 -> 0.3" in lines[b4 + 1]
    assert bench.finetune_rows([bench.FileResult("nsnet2_16k", original, result.runs[:1])]) == []


def test_memory_target_says_when_the_session_floor_puts_it_out_of_reach():
    def file(original_mb, floor_mb):
        original = run("original", 1.0, True, family="original", peak_memory_mb=original_mb, floor_memory_mb=floor_mb)
        kept = run("bits=4", 8.0, True, latency_b1_ms=10.0, original_latency_b1_ms=10.0, peak_memory_mb=original_mb)
        return bench.FileResult("dtln_stage1", original, [kept])

    small = next(line for line in bench.speed_targets([file(13.0, 9.3)]) if line.startswith("dtln_stage1:"))
    large = next(line for line in bench.speed_targets([file(40.0, 9.3)]) if line.startswith("dtln_stage1:"))
    assert "out of reach" in small and "needs <= 8.7 MB" in small and "9.3 MB" in small
    assert "out of reach" not in large and "needs <= 26.7 MB" in large


def test_session_floor_is_below_a_model_with_weights(tmp_path):
    import onnx
    from _deploy import baseline_maxrss_kb, peak_memory_mb, save_rows, session_floor_mb
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((1024, 4096), np.float32), "w")  # 16 MB
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])], [weight])
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(model))
    rows = save_rows({"x": np.ones((1, 1024), np.float32)}, tmp_path / "rows.npz")
    baseline = baseline_maxrss_kb(rows)
    floor = session_floor_mb(model, rows, baseline, tmp_path)
    assert 0.0 < floor < peak_memory_mb(model, rows, baseline) - 16.0


def test_any_mode_plus_sn_adds_short_names_and_vector_modes_exist():
    assert bench.mode_flags("avg_bits=3+gptq+v2") == ["--cluster", "avg_bits=3,method=gptq,vector=2"]
    assert bench.mode_flags("avg_bits=3+gptq+v2+cs+sn") == [
        "--cluster", "avg_bits=3,method=gptq,vector=2,channel_scale=true", "--cleanup", "short_names=true"]
    assert bench.mode_flags("avg_bits=3+sn+sn") is None and bench.mode_flags("nonsense+sn") is None
    assert bench.mode_flags("avg_bits=2.5+gptq+v2+da+sn") == [
        "--cluster", "avg_bits=2.5,method=gptq,vector=2,damp=auto", "--cleanup", "short_names=true"]
    assert bench.mode_flags("codebooks+sn") is None  # loops take no suffix
    assert bench.mode_flags("avg_bits=3+gptq+v2+da+sn+hs") == [
        "--cluster", "avg_bits=3,method=gptq,vector=2,damp=auto", "--cleanup", "short_names=true,half_small=true"]
    assert bench.mode_flags("prune_lat=0.5+rec+da") is None  # no clustering to damp
    assert bench.mode_flags("avg_bits=3+gptq+hs+hs") is None
