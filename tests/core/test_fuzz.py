"""A slice of the fuzz suite (tools/fuzz.py): mutated models never crash onnxzip."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import load_fuzz

fuzz = load_fuzz()


def test_cases_are_reproducible_and_cover_every_mutation_class():
    bases = fuzz.base_models(reference=False)
    first = fuzz.make_case(0, 17, bases)
    again = fuzz.make_case(0, 17, bases)
    assert first.data == again.data and first.mutations == again.mutations
    seen = {name for index in range(300) for name in fuzz.make_case(0, index, bases).mutations}
    assert seen == set(fuzz.MUTATIONS)


def test_harness_flags_exit_3_extra_stderr_and_leftover_outputs(tmp_path, monkeypatch):
    from onnxzip import cli

    def broken_inspect(args):  # an internal error
        raise ValueError("boom")

    def leaky_compress(args):  # writes the output, then fails with two lines on stderr
        Path(args.output).write_bytes(b"half")
        print("first line", file=sys.stderr)
        raise cli.ConfigError("second line")

    monkeypatch.setitem(cli.COMMANDS, "inspect", broken_inspect)
    monkeypatch.setitem(cli.COMMANDS, "compress", leaky_compress)
    result = fuzz.run_case(fuzz.mlp(), tmp_path)
    assert result["codes"] == {"inspect": 3, "compress": 2}
    text = " | ".join(result["defects"])
    assert "inspect: exit 3" in text and "2 stderr lines" in text and "left files behind" in text


def test_sound_model_compresses_and_the_written_model_runs(tmp_path):
    result = fuzz.run_case(fuzz.convnet(), tmp_path)
    assert result["codes"] == {"inspect": 0, "compress": 0} and result["defects"] == []


@pytest.mark.parametrize("seed", [0])
def test_fuzz_slice_finds_no_defects(seed):
    # 200 cases over the hand-built graphs plus a few over the reference cnn/transformer.
    summary = fuzz.run_fuzz(200, seed, jobs=2, reference_share=0.03, progress=False)
    assert summary.cases == 200
    assert not summary.defects, summary.text(seed)
    for command in fuzz.COMMANDS:  # not vacuous: sound mutants still run, broken ones are refused
        assert summary.codes[command][0] > 0 and summary.codes[command][2] > 80
    assert np.sum(list(summary.by_mutation.values())) >= 200


def test_data_cases_are_reproducible_and_cover_every_data_mutation_and_command():
    first, again = fuzz.make_data_case(0, 5), fuzz.make_data_case(0, 5)
    assert (first.data, first.argv, first.mutations) == (again.data, again.argv, again.mutations)
    cases = [fuzz.make_data_case(0, index) for index in range(400)]
    assert {name for case in cases for name in case.mutations} == set(fuzz.DATA_MUTATIONS)
    assert {case.command for case in cases} == set(fuzz.DATA_COMMANDS)
    assert {case.base for case in cases} == set(fuzz.DATA_MODELS)


def test_data_harness_flags_a_crash_on_data(tmp_path, monkeypatch):
    from onnxzip.core import inputs

    def crash(*args, **kwargs):  # a data check that raises a plain exception
        raise ValueError("boom")

    monkeypatch.setattr(inputs, "feeds_from_arrays", crash)
    case = next(c for c in (fuzz.make_data_case(0, i) for i in range(100)) if c.command == "validate")
    result = fuzz.run_data_case(case, tmp_path)
    assert result["codes"] == {"validate": 3} and "validate: exit 3" in result["defects"][0]


def test_pipe_closed_early_exits_0(tmp_path):
    (tmp_path / "m.onnx").write_bytes(fuzz.mlp())
    for keep in (0, 10):  # the reader gone before the first write, or after 10 bytes
        code, texts = fuzz._pipe_closed_early(["inspect", str(tmp_path / "m.onnx")], tmp_path, keep)
        assert code == 0 and texts["stderr"] == "" and len(texts["stdout"]) == keep


def test_data_fuzz_slice_finds_no_defects():
    # 60 seeded data cases (about 20 s on two idle cores): the commands on sound and broken data.
    summary = fuzz.run_fuzz(60, 0, jobs=2, progress=False, kind="data")
    assert summary.cases == 60
    assert not summary.defects, summary.text(0)
    codes = [code for counter in summary.codes.values() for code in counter.elements()]
    assert codes.count(0) >= 5 and codes.count(2) >= 25  # sound data runs, broken data is refused
