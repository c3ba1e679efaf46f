"""Command line: ``onnxzip inspect | compress | validate | finetune | report | demo``.

Exit codes: 0 ok (also when the reader of stdout goes away, ``onnxzip inspect m.onnx | head``),
1 a quality gate failed (nothing written), 2 bad input, option or usage (one sentence on stderr,
no traceback), 3 an internal error, 130 interrupted (Ctrl-C; nothing written).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from onnxzip import __version__
from onnxzip.errors import ConfigError, OnnxzipError, QualityGateError, UnsupportedModelError
from onnxzip.core.io import write_json

log = logging.getLogger("onnxzip")


FINETUNE_FLAGS = ("epochs", "lr", "sparsity", "batch_size", "loss", "match")  # also in --options
EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _Parser(argparse.ArgumentParser):
    """A usage error is one sentence on stderr and exit 2, like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"onnxzip: error: {message} ('{self.prog} --help' lists the options).\n")


class _OrderedPassFlag(argparse.Action):
    """Collect pass flags in command-line order: the order passes run in."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        steps = list(getattr(namespace, "pass_flags", None) or [])
        steps.append((self.dest, values or ""))
        namespace.pass_flags = steps


def _dims(values: list[str] | None) -> dict[str, int]:
    dims = {}
    for item in values or []:
        name, sep, size = item.partition("=")
        if not sep or not size.strip().lstrip("-").isdigit() or int(size) <= 0:
            raise ConfigError(f"--dim expects NAME=N with a positive N, got {item!r}.")
        dims[name.strip()] = int(size)
    return dims


def _input_shapes(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    from onnxzip.core.shapes import parse_input_shape

    return dict(parse_input_shape(item) for item in values or [])


def _add_shape_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dim", action="append", metavar="NAME=N", help="size of a symbolic dimension (repeatable)")
    parser.add_argument("--input-shape", action="append", metavar="NAME=d0,d1,...",
                        help="whole shape of one input, any dimension named or not (repeatable; "
                             "default: sizes onnxruntime accepts are found automatically)")


def _add_sample_axis_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-axis", action="append", metavar="INPUT=AXIS",
                        help="which axis of INPUT's data holds the samples, or 'none' for data that is the same "
                             "for every sample (repeatable; default: the axis the model declares symbolic, see "
                             "the README's data layout rule)")


def _sample_axes(values: list[str] | None) -> dict[str, int | None]:
    from onnxzip.core.inputs import parse_sample_axes

    return parse_sample_axes(",".join(values or []))


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="PATH", help="inputs: .npz (arrays by input name, plus labels/references), "
                        "a folder of WAVs (clean/ + noisy/) or images (default: generated from the signature)")
    _add_shape_flags(parser)
    _add_sample_axis_flag(parser)
    parser.add_argument("--batch", type=int, default=None, help="batch size of generated inputs (default 2)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="onnxruntime device (default auto)")
    parser.add_argument("--metric", action="append", metavar="COND",
                        help="quality condition measured for the original and the candidate, e.g. "
                             "accuracy:max_drop=0.01, snr:min=30, pesq:max_drop=0.2 on --data, "
                             "user:scorer.py:fn:min=0.9 (your function of predictions and targets) or "
                             "task:scorer.py:fn:max_drop=0.5 (your function of a model file; no --data needed) (repeatable)")
    gate = parser.add_argument_group("fidelity gate")
    gate.add_argument("--min-cosine", type=float, default=None, help="minimum cosine similarity per output (default 0.99)")
    gate.add_argument("--max-rel-l2", type=float, default=None, help="maximum relative L2 error per output (default 0.5 while --min-cosine is "
                      "on: catches an output the compression scaled, which cosine does not see)")
    gate.add_argument("--max-abs", type=float, default=None, help="maximum absolute error per output")
    gate.add_argument("--min-argmax-agreement", type=float, default=None, help="minimum share of equal argmax for class-score outputs (default 0.95)")


def _gate_overrides(args: argparse.Namespace) -> dict[str, float]:
    keys = ("min_cosine", "max_rel_l2", "max_abs", "min_argmax_agreement")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _add_global(parser: argparse.ArgumentParser, default: Any) -> None:
    # Accepted before and after the command name; the sub-parser's SUPPRESS default keeps a
    # flag given before the command from being reset.
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars or info messages")
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="log what each step does")
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks for errors")


def build_parser() -> argparse.ArgumentParser:
    import onnxzip.train.reconstruct  # noqa: F401 - registers the reconstruct step
    import onnxzip.train.step  # noqa: F401 - registers the finetune step
    from onnxzip.passes import PASSES
    from onnxzip.recipe import RECIPE_KEYS
    from onnxzip.core.schema import describe_config, option_rows

    parser = _Parser(
        prog="onnxzip",
        description="Compress ONNX models (SVD factorization, pruning, codebook clustering) and check them in onnxruntime.",
    )
    parser.add_argument("--version", action="version", version=f"onnxzip {__version__}")
    _add_global(parser, False)
    shared = _Parser(add_help=False)
    _add_global(shared, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    inspect = commands.add_parser("inspect", parents=[shared], help="show opsets, ops, parameters, FLOPs and weights of a model")
    inspect.add_argument("model", help="ONNX file")
    inspect.add_argument("--top", type=int, default=10, help="how many of the largest weights to list (default 10)")
    inspect.add_argument("--json", metavar="FILE", help="also write the inspection as JSON")
    _add_shape_flags(inspect)

    compress = commands.add_parser(
        "compress",
        parents=[shared],
        help="run a compression pipeline, validate, write the result",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="pass flags run in the order given; each takes KEY=VALUE[,KEY=VALUE...]:\n\n"
        + "\n\n".join(
            f"--{name}: {cls.summary}\n  " + describe_config(cls.config_class).replace("\n", "\n  ")
            for name, cls in sorted(PASSES.items())
        ),
    )
    compress.add_argument("input", help="ONNX file to compress (never modified)")
    compress.add_argument("-o", "--output", required=True, help="where to write the compressed model")
    compress.add_argument("--recipe", metavar="FILE", help="YAML or JSON recipe (keys: " + ", ".join(RECIPE_KEYS)
                          + "), or a built-in loop recipe: method1, method2, codebooks, speed")
    compress.add_argument("--plan", metavar="FILE.json", help="replay a saved plan instead of planning")
    compress.add_argument("--save-plan", metavar="FILE.json", help="write the plan that was applied")
    compress.add_argument("--report", metavar="FILE.json", help="write the full report as JSON")
    compress.add_argument("--force", action="store_true", help="write the model even if the fidelity gate or a --metric "
                          "condition fails")
    compress.add_argument("--external-data", action="store_true", help="store tensors in a .data file beside the model")
    compress.add_argument("--val", metavar="PATH", help="held-out data: a loop's gate, the --metric search of "
                          "cluster bits=search and each finetune step's validation are measured on it (default: --data)")
    compress.add_argument("--work-dir", metavar="DIR", help="loop recipes: checkpoint every finished try here; the same "
                          "command resumes from it (default OUTPUT.work)")
    compress.add_argument("--plot", metavar="DIR", help="write PNG plots of the report (trajectory, per-layer decisions, γ histograms)")
    _add_common(compress)
    passes = compress.add_argument_group("passes")
    for name, cls in sorted(PASSES.items()):
        passes.add_argument(f"--{name}", dest=name, action=_OrderedPassFlag, nargs="?", const="",
                            metavar="OPTIONS", help=cls.summary)

    validate = commands.add_parser("validate", parents=[shared], help="compare a candidate model with the original in onnxruntime")
    validate.add_argument("original", help="reference ONNX file")
    validate.add_argument("candidate", help="ONNX file to check")
    validate.add_argument("--report", metavar="FILE.json", help="write the validation report as JSON")
    _add_common(validate)

    finetune = commands.add_parser(
        "finetune", parents=[shared], help="fine-tune a model's weights in onnxruntime-training",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="all options (--options KEY=VALUE[,KEY=VALUE...]):\n  "
        + describe_config(_finetune_config()).replace("\n", "\n  "),
    )
    finetune.add_argument("input", help="ONNX file to fine-tune (never modified)")
    finetune.add_argument("-o", "--output", required=True, help="where to write the fine-tuned model")
    finetune.add_argument("--data", required=True, metavar="TRAIN.npz",
                          help="training inputs by input name, optional 'labels' (class indices) or 'references'")
    _add_sample_axis_flag(finetune)
    finetune.add_argument("--val", metavar="VAL.npz", help="validation data evaluated each epoch (best epoch kept)")
    finetune.add_argument("--teacher", metavar="ORIGINAL.onnx", help="model to distill from: needed when the data has "
                          "neither labels nor references, and for --match")
    rows = {name: (default, text) for name, _, default, text in option_rows(_finetune_config())}
    for key in FINETUNE_FLAGS:  # the most used options of the step as flags, described by its schema
        default, text = rows[key]
        repeat = key == "match"
        finetune.add_argument(f"--{key.replace('_', '-')}", action="append" if repeat else "store",
                              metavar="TENSOR" if repeat else key.upper(),
                              help=f"{text} ({'repeatable' if repeat else f'default {default}'})")
    finetune.add_argument("--options", metavar="KEY=VALUE,...", help="any other option listed below")
    finetune.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="training device (default auto)")
    finetune.add_argument("--report", metavar="FILE.json", help="write the loss/metric curve and the frozen weights as JSON")
    report = commands.add_parser("report", parents=[shared], help="print a saved compress report and plot it")
    report.add_argument("report", help="report JSON written by compress --report")
    report.add_argument("--plot", metavar="DIR", help="write PNG plots (trajectory, per-layer decisions, γ histograms)")

    demo = commands.add_parser("demo", parents=[shared], help="compress the built-in reference CNN and show the result")
    demo.add_argument("--model", default="cnn", help="reference model to use (default cnn)")
    demo.add_argument("--output-dir", default="onnxzip-demo", help="where to write the models (default ./onnxzip-demo)")
    demo.add_argument("--recipe", default=None,
                      help="loop recipe for the CNN (e.g. method2: the full sweeps, several minutes); "
                           "default: method 2 with a short budget")
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("onnxzip")
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Importing onnxruntime(-training) gives the root logger a handler of its own (timestamped);
    # without this every warning would be printed twice.
    root.propagate = False



def cmd_inspect(args: argparse.Namespace) -> int:
    from onnxzip.inspection import inspect_model

    info = inspect_model(args.model, dims=_dims(args.dim), input_shapes=_input_shapes(args.input_shape), top=args.top)
    print(info.text())
    if args.json:
        write_json(args.json, info.to_dict())
    return 0


def _print_result(result: Any, quiet: bool) -> None:
    if result.report.trajectory:
        _print_trajectory(result.report.trajectory)
        print()
    print(result.report.table())
    for note in result.report.notes:  # how inputs were sized, an unchecked or a growing result
        if note.startswith("inputs generated"):  # warnings were logged to stderr already
            print(f"note: {note}")
    if not quiet:
        for report in result.report.passes:
            changed = [c for c in report.changes if not c.skipped]
            skipped = [c for c in report.changes if c.skipped]
            print(f"\npass {report.pass_name}: {len(changed)} layers changed, {len(skipped)} skipped ({report.seconds:.1f} s)")
            for note in report.notes:
                print(f"  note: {note}")


def cmd_compress(args: argparse.Namespace) -> int:
    from onnxzip.api import compress
    from onnxzip.core.io import same_file
    from onnxzip.passes import get_pass
    from onnxzip.recipe import PassStep, Recipe
    from onnxzip.core.schema import parse_flag_value

    if Path(args.input).exists() and Path(args.output).exists() and same_file(args.input, args.output):
        raise ConfigError("The output path is the input file; onnxzip never overwrites its input.")
    flags = getattr(args, "pass_flags", None) or []
    recipe = Recipe.from_file(args.recipe) if args.recipe else Recipe.default()
    if flags:
        steps = []
        for name, text in flags:
            cls = get_pass(name)
            steps.append(PassStep(cls.name, parse_flag_value(text, shorthand=cls.shorthand, owner=f"--{cls.name}")))
        recipe.passes = [*recipe.passes, *steps] if args.recipe else steps
        recipe.build_passes()
    recipe.gate = dataclasses.replace(recipe.gate, **_gate_overrides(args))
    if args.batch:
        recipe.batch = args.batch
    if args.metric:
        recipe.metrics = [*recipe.metrics, *args.metric]
    work_dir = args.work_dir or (f"{args.output}.work" if recipe.loop is not None else None)
    try:
        result = compress(
            args.input, recipe, data=args.data, plan=args.plan, device=args.device,
            dims=_dims(args.dim), input_shapes=_input_shapes(args.input_shape),
            sample_axes=_sample_axes(args.sample_axis), allow_gate_failure=args.force, progress=not args.quiet, val=args.val, work_dir=work_dir,
        )
    except QualityGateError as exc:
        generated = False
        if exc.report is not None:
            _print_result(exc.report, args.quiet)
            if args.report:
                write_json(args.report, exc.report.report.to_dict())
            generated = exc.report.validation is not None and exc.report.validation.generated
        hint = ("the inputs were generated (random, not real data): pass --data with real inputs, "
                "relax the limits, or use --force" if generated
                else "relax the limits, pass --data with real inputs, or use --force")
        raise QualityGateError(f"{exc} Nothing was written; {hint}.") from exc
    result.save(args.output, external_data=True if args.external_data else None)
    _print_result(result, args.quiet)
    if args.report:
        write_json(args.report, result.report.to_dict())
    if args.save_plan:
        result.plan.save(args.save_plan)
    if args.plot and not _write_plots(result.report.to_dict(), args.plot):
        print("warning: nothing to plot (no loop trajectory and no per-layer decisions)", file=sys.stderr)
    if work_dir:
        print(f"checkpoints of every try: {work_dir} (rerun the same command to resume)")
    if not result.passed:
        print(f"warning: the quality gate failed ({'; '.join(result.failures())}); written anyway (--force)", file=sys.stderr)
    print(f"\nwrote {args.output}")
    return 0



def cmd_validate(args: argparse.Namespace) -> int:
    from onnxzip.api import validate
    from onnxzip.evaluators.fidelity import FidelityGate

    report = validate(
        args.original, args.candidate, args.data, metrics=args.metric, dims=_dims(args.dim),
        input_shapes=_input_shapes(args.input_shape), batch=args.batch or 2,
        device=args.device or "auto", gate=FidelityGate(**_gate_overrides(args)), progress=not args.quiet,
        sample_axes=_sample_axes(args.sample_axis),
    )
    print(report.table())
    if args.report:
        write_json(args.report, report.to_dict())
    return 0 if report.passed else 1


def _finetune_config() -> type:
    from onnxzip.train import FinetuneConfig

    return FinetuneConfig


def cmd_finetune(args: argparse.Namespace) -> int:
    from onnxzip.core.io import same_file, save_model
    from onnxzip.core.report import render_table
    from onnxzip.core.schema import parse_flag_value
    from onnxzip.train import finetune

    if Path(args.input).exists() and Path(args.output).exists() and same_file(args.input, args.output):
        raise ConfigError("The output path is the input file; onnxzip never overwrites its input.")
    options: dict[str, Any] = parse_flag_value(args.options, shorthand=None, owner="--options")
    for key in FINETUNE_FLAGS:
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    result = finetune(args.input, args.data, val=args.val, teacher=args.teacher, config=options,
                      device=args.device, progress=not args.quiet, sample_axes=_sample_axes(args.sample_axis))
    if not result.trained:
        if args.report:
            write_json(args.report, result.to_dict())
        raise UnsupportedModelError(f"{result.why_nothing_trains()} No output written.")
    save_model(result.model, args.output)
    if result.history:
        keys = list(result.history[0])
        print(render_table(keys, [[f"{row.get(k, float('nan')):.4g}" for k in keys] for row in result.history]))
    print(f"\ntrained {len(result.trained)} weights ({result.trained_fraction:.0%} of the float parameters) on "
          f"{result.device} (loss {' + '.join(result.losses)}; best epoch {result.best_epoch}); frozen {len(result.frozen)}")
    if not args.quiet:
        for name, reason in result.frozen.items():
            print(f"  frozen {name}: {reason}")
        for note in result.notes:
            print(f"  note: {note}")
    if result.gammas:
        print(f"{result.gammas_below_threshold} of {result.gammas} normalization γ below the pruning threshold")
    if args.report:
        write_json(args.report, result.to_dict())
    print(f"\nwrote {args.output}")
    return 0


def _write_plots(report: dict[str, Any], out_dir: str) -> int:
    from onnxzip.plots import plot_report

    written = plot_report(report, out_dir)
    for path in written:
        print(f"wrote {path}")
    return len(written)


def _print_trajectory(trajectory: list[dict[str, Any]]) -> None:
    from onnxzip.core.report import trajectory_table

    print(trajectory_table(trajectory))


def cmd_report(args: argparse.Namespace) -> int:
    import json

    from onnxzip.errors import DataError

    try:
        report = json.loads(Path(args.report).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read report {args.report}: {exc}.") from exc
    if not isinstance(report, dict) or "before" not in report or "after" not in report:
        raise DataError(f"{args.report} is not a report written by onnxzip compress --report.")
    if report.get("trajectory"):
        _print_trajectory(report["trajectory"])
    else:
        before, after = report["before"], report["after"]
        print(f"size {before['bytes']} → {after['bytes']} bytes, params {before['params']} → {after['params']}")
    if args.plot and not _write_plots(report, args.plot):
        raise DataError(f"{args.report} has nothing to plot: no loop trajectory and no per-layer decisions.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from onnxzip.demo import run_demo

    return run_demo(args.model, Path(args.output_dir), quiet=args.quiet, recipe=args.recipe)


def options_reference() -> str:
    """The README's option reference in Markdown, made from the parser, the pass schemas and the
    recipe keys (``python tools/readme_options.py --write`` puts it into README.md; a test checks
    that it is up to date)."""
    from onnxzip.passes import PASSES
    from onnxzip.recipe import RECIPE_KEYS
    from onnxzip.core.schema import option_rows

    def cell(text: Any) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    def table(sub: argparse.ArgumentParser, skip: set[str]) -> str:
        rows = []
        for action in sub._actions:
            if action.dest in skip or action.dest in PASSES:
                continue
            flag = sub._get_formatter()._format_action_invocation(action)
            rows.append(f"| `{cell(flag)}` | {cell(action.help or '')} |")
        return "| option | what it does |\n| --- | --- |\n" + "\n".join(rows)

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    everywhere = {"help", "quiet", "verbose", "debug"}
    parts = ["**Global options** (`-q`, `-v`, `--debug` also after the command name)\n\n" + table(parser, {"help", "command"})]
    for name, sub in commands.choices.items():
        summary = next(a.help for a in commands._choices_actions if a.dest == name)
        parts.append(f"**onnxzip {name}** — {cell(summary)}\n\n" + table(sub, everywhere | {"pass_flags"}))
    for name, cls in sorted(PASSES.items()):
        rows = [f"| `{key}` | {cell(tp)} | {cell(default)} | {cell(text)} |" for key, tp, default, text in option_rows(cls.config_class)]
        parts.append(f"**--{name}** — {cell(cls.summary)}\n\n" + (
            "| key | type | default | what it does |\n| --- | --- | --- | --- |\n" + "\n".join(rows) if rows else "(no options)"))
    rows = [f"| `{key}` | {cell(text)} |" for key, text in RECIPE_KEYS.items()]
    parts.append("**Recipe keys** (YAML/JSON)\n\n| key | what it holds |\n| --- | --- |\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


COMMANDS = {"inspect": cmd_inspect, "compress": cmd_compress, "validate": cmd_validate,
            "finetune": cmd_finetune, "report": cmd_report, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("onnxzip: interrupted; the output was not written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_OK


def _drop_stdout() -> None:
    """The reader of stdout went away (``| head``): send the rest to /dev/null, so that the
    interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file (captured in-process)
        pass


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.error(f"give a command: {', '.join(COMMANDS)}")
    _configure_logging(args)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return code
    except (KeyboardInterrupt, BrokenPipeError):
        raise
    except OnnxzipError as exc:
        if args.debug:
            raise
        print(f"onnxzip: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - last resort: one line, not a traceback
        if args.debug:
            raise
        print(f"onnxzip: internal error: {type(exc).__name__}: {exc} (run with --debug for details)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
