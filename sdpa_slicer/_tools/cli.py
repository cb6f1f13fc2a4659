"""The ``sdpa-slicer`` command (also ``python -m sdpa_slicer``): slice, inspect, demo, examples."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import platform
import sys
import tempfile
import textwrap
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn, Optional, Sequence, Union

import attrs
import coremltools
from coremltools.converters.mil.mil import Program

from sdpa_slicer import _command_process
from sdpa_slicer._errors import EmitError, PackageError, PlotError, UsageError
from sdpa_slicer._mlpackage.package import (
    Package,
    check_destination,
    load_package,
    package_size,
    staged_package,
    weight_usage,
)
from sdpa_slicer._rewrite.config import SliceConfig
from sdpa_slicer._rewrite.pipeline import slice_attention
from sdpa_slicer._rewrite.report import COLUMNS, SliceReport
from sdpa_slicer._text import format_bytes, format_table
from sdpa_slicer._tools.demo import HEADS, TOKENS, llama_attention_program
from sdpa_slicer._tools.plot import check_path, memory_figure
from sdpa_slicer._tools.progress import BYTES, StageProgress
from sdpa_slicer._version import __version__

PROG = "sdpa-slicer"
DESCRIPTION = "Rewrite the attention of Core ML models (ML programs) to work on chunks of query rows."
EPILOG = (
    "Exit codes: 0 done, 1 the input or output failed, 2 a bad command line, 130 interrupted, "
    "141 the output pipe closed."
)
VERSION = f"{PROG} {__version__} (coremltools {coremltools.__version__}, Python {platform.python_version()})"
DEFAULTS = SliceConfig()
HELP_WIDTH = 79
REPORT_HELP = "\n".join(
    [
        "The report's columns (? where a value is unknown):",
        *(
            textwrap.fill(
                column.meaning, HELP_WIDTH, initial_indent=f"  {column.title:<15}", subsequent_indent=" " * 17
            )
            for column in COLUMNS
        ),
    ]
)
"""The ``--help`` epilog of the commands that print a report: what each column means."""
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_CLOSED_PIPE = 141
"""128 + SIGPIPE: what a shell reports for a command that ended because its output pipe closed."""
TEXT_OPTIONS = ("num_chunks", "chunk_size", "max_scores_bytes", "min_seq_length", "kv_chunk_size", "min_query_chunk")
"""``SliceConfig`` fields given as ``--name-with-dashes VALUE``; values are parsed by ``SliceConfig``."""
OFF_SWITCHES = {
    "--keep-masked-keys": (
        "prune_masked_keys",
        "compute every key even where a constant mask hides a whole range from a chunk",
    ),
    "--fused-only": (
        "match_decomposed",
        "only rewrite scaled_dot_product_attention ops, not attention written out as ops",
    ),
    "--keep-repeated-kv": (
        "fold_repeated_kv",
        "leave keys and values repeated for more query heads (grouped-query attention) as the program repeats them",
    ),
    "--keep-unchunked-fused": (
        "decompose_unchunked",
        "leave a fused attention op planned as one chunk over every key (its scores fit) fused, instead of writing it "
        "out as ops",
    ),
}
"""Flags that turn a ``SliceConfig`` field that is on by default off: flag -> (field, help)."""
SHAPE_COLUMNS = ("function", "op", "dtype", "query", "key", "value", "mask")
OPS = "ops"
SIZE_EXAMPLES = "16MiB, 512KB, 1.5GiB, 1048576"
DRAWING_MODULES = ("matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.backends.backend_svg")
"""What drawing the memory picture imports (the figure, and the writers of PNG and SVG)."""


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as ``UsageError`` so ``main`` prints one line, not the usage text."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    try:
        parsed = _parse(argv)
        if _command_process.interrupted_while_starting():
            raise KeyboardInterrupt
        code = parsed if isinstance(parsed, int) else _run(parsed)
        sys.stdout.flush()  # here, so that a closed pipe is seen here and not as Python exits
        return code
    except KeyboardInterrupt:
        _command_process.ignore_interrupts_to_the_end()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # whoever read the output stopped reading (| head): end quietly
        _discard_stdout()
        return EXIT_CLOSED_PIPE


def _discard_stdout() -> None:
    """Point stdout at the null device, so that what is still buffered for the closed pipe goes
    nowhere instead of failing again as Python exits."""
    with contextlib.suppress(AttributeError, ValueError, OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)


def _parse(argv: Optional[Sequence[str]]) -> Union[argparse.Namespace, int]:
    """The command line, or the exit code when there is nothing to run (a usage error, ``--help``).

    In the command's process Ctrl-C is still only noted here, so the modules the command will
    import late are imported here: matplotlib catches a ``KeyboardInterrupt`` raised while it
    imports its parts (it warned and the command went on)."""
    parser = _parser()
    if not (sys.argv[1:] if argv is None else argv):
        sys.stderr.write(parser.format_usage())
        return _fail(f"no command given; '{PROG} --help' lists the commands", EXIT_USAGE, debug=False)
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        return _fail(error, EXIT_USAGE, debug=False)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else EXIT_OK
    if getattr(args, "plot", None) is not None:
        with contextlib.suppress(ImportError):  # a missing matplotlib is reported before any work
            for module in DRAWING_MODULES:
                importlib.import_module(module)
    return args


def _run(args: argparse.Namespace) -> int:
    try:
        return args.run(args)
    except UsageError as error:
        return _fail(error, EXIT_USAGE, args.debug)
    except (PackageError, EmitError, PlotError) as error:
        return _fail(error, EXIT_FAILURE, args.debug)
    except BrokenPipeError:
        raise
    except Exception as error:  # a bug: still one line, the traceback with --debug
        return _fail(f"unexpected {type(error).__name__}: {error}", EXIT_FAILURE, args.debug)


def build_config(options: Mapping[str, str]) -> SliceConfig:
    """A ``SliceConfig`` from the slicing options given on the command line (field name -> text).

    Only given options are set, so an option the installed ``SliceConfig`` lacks fails
    here, naming its flag, and only when used.
    """
    known = SliceConfig.field_names()
    for name, value in options.items():
        flag = _flag(name)
        if name not in known:
            raise UsageError(f"{flag} is not supported by this version of sdpa_slicer")
        try:
            SliceConfig.from_text_options({name: value})
        except (TypeError, ValueError) as error:
            raise UsageError(f"{flag} {value}: {error}") from error
    try:
        return SliceConfig.from_text_options(options)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from error


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=VERSION)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    slice_command = _command(commands, "slice", "rewrite the attention of an .mlpackage into a new .mlpackage")
    _add_input(slice_command)
    slice_command.add_argument(
        "-o",
        "--output",
        metavar="OUT.mlpackage",
        required=True,
        help="(required) where to write the sliced package (a new folder; see --force)",
    )
    slice_command.add_argument(
        "--force", action="store_true", help="replace OUT.mlpackage if it exists and is a package (never anything else)"
    )
    slice_command.add_argument(
        "--compact",
        action="store_true",
        help="write only the weights the sliced program refers to (rewrites the weight file; by default it is "
        "the input's, byte for byte, with new values appended)",
    )
    slice_command.set_defaults(run=_slice)
    inspect = _command(commands, "inspect", "show the attention sites of an .mlpackage and what slice would do")
    _add_input(inspect)
    inspect.add_argument(
        "--explain",
        action="store_true",
        help="also list near misses: softmax ops that look like attention but were not matched, and why",
    )
    inspect.set_defaults(run=_inspect)
    demo = _command(
        commands, "demo", f"slice a built-in Llama-style attention layer ({HEADS} heads, L = S = {TOKENS}, fp16)"
    )
    demo.set_defaults(run=_demo)
    examples = commands.add_parser(
        "examples",
        help="write the example packages the documentation's commands read (model.mlpackage, ...) into DIR",
    )
    examples.add_argument("folder", metavar="DIR", help="where to write them (made if missing); none may exist yet")
    examples.add_argument("--debug", action="store_true", help="print the traceback of an error")
    examples.set_defaults(run=_examples)
    for command in (slice_command, inspect, demo):
        _add_output_options(command)
        _add_slicing_options(command)
    return parser


def _command(commands: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    """A command that prints a report: its help ends with what the report's columns mean. Its own
    arguments are added first, so that its help lists them first."""
    return commands.add_parser(
        name, help=help_text, epilog=REPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _add_input(command: argparse.ArgumentParser) -> None:
    command.add_argument("input", metavar="IN.mlpackage", help="the Core ML model package to read; never written")


def _add_output_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    command.add_argument("--quiet", action="store_true", help="no progress bar and no table (errors still show)")
    command.add_argument("--debug", action="store_true", help="print the traceback of an error")
    command.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw live bytes against op position, before and after slicing, for every function, to FILE "
        "(.png or .svg; needs matplotlib, the plot extra)",
    )


def _add_slicing_options(command: argparse.ArgumentParser) -> None:
    policy = command.add_mutually_exclusive_group()
    policy.add_argument("--num-chunks", metavar="N", help="split each attention's queries into N near-equal chunks")
    policy.add_argument("--chunk-size", metavar="N", help="N query rows per chunk (the last chunk takes the rest)")
    policy.add_argument(
        "--max-scores-bytes",
        metavar="SIZE",
        help=f"fewest chunks whose scores fit in SIZE: bytes, or a number and a unit, as in {SIZE_EXAMPLES} "
        f"(KiB, MiB, GiB count 1024s; KB, MB, GB 1000s; default {format_bytes(DEFAULTS.max_scores_bytes)})",
    )
    command.add_argument(
        "--min-seq-length",
        metavar="N",
        help=f"skip attention with fewer than N query rows (default {DEFAULTS.min_seq_length})",
    )
    command.add_argument(
        "--kv-chunk-size", metavar="N", help="also walk each query chunk's keys in chunks of N rows (online softmax)"
    )
    command.add_argument(
        "--min-query-chunk",
        metavar="N",
        help="with --max-scores-bytes, never fewer than N query rows per chunk: chunk keys instead "
        f"(default {DEFAULTS.min_query_chunk})",
    )
    for flag, (_, help_text) in OFF_SWITCHES.items():
        command.add_argument(flag, action="store_true", help=help_text)
    command.add_argument(
        "--strict", action="store_true", help="stop with an error when a site's rewrite fails instead of skipping it"
    )


def _config(args: argparse.Namespace) -> SliceConfig:
    options = {name: getattr(args, name) for name in TEXT_OPTIONS if getattr(args, name) is not None}
    for flag, (field, _) in OFF_SWITCHES.items():
        if getattr(args, flag[2:].replace("-", "_")):
            options[field] = "false"
    return build_config(options)


def _load(args: argparse.Namespace, progress: StageProgress) -> Package:
    with progress.stage(f"loading {args.input}", unit=OPS) as built:
        return load_package(args.input, progress=built)


def _sliced(
    prog: Program, config: SliceConfig, args: argparse.Namespace, progress: StageProgress, description: str
) -> SliceReport:
    with progress.stage(description):
        return slice_attention(prog, config, strict=args.strict)


def _plot_path(args: argparse.Namespace) -> Optional[Path]:
    """Where ``--plot`` draws, checked before any work: a bad suffix is a usage error."""
    if args.plot is None:
        return None
    try:
        return check_path(args.plot)
    except ValueError as error:
        raise UsageError(f"--plot {args.plot}: {error}") from error


def _slice(args: argparse.Namespace) -> int:
    config = _config(args)
    plot = _plot_path(args)
    output = Path(args.output)
    check_destination(Path(args.input), output, force=True)
    if os.path.lexists(output) and not args.force:
        raise PackageError(f"output {output} already exists; add --force to replace it")
    with _progress(args, stages=3) as progress:
        package = _load(args, progress)
        report = _sliced(package.program, config, args, progress, "slicing")
        # Drawn before saving, so that a failed drawing leaves no output behind.
        with _staged_picture(report, plot, package.path) as put_picture_in_place:
            with progress.stage(f"saving {args.output}", unit=BYTES) as written:
                staged = staged_package(package, output, force=args.force, progress=written, compact=args.compact)
                with staged as put_package_in_place:
                    _put_in_place(put_package_in_place, put_picture_in_place)
    sizes = (package_size(package.path), package_size(output))
    text = [str(report), f"wrote {output} ({format_bytes(sizes[1])}; input {format_bytes(sizes[0])})"]
    usage = weight_usage(output)
    if usage.unreferenced_blobs:
        blobs = f"{usage.unreferenced_blobs} blob{'s' if usage.unreferenced_blobs > 1 else ''}"
        text.append(
            f"{format_bytes(usage.unreferenced_bytes)} of weights ({blobs}) no op refers to any more stay in the "
            "weight file; --compact leaves them out"
        )
    _print_result(args, report, config, text, paths=(package.path, output), sizes=sizes, plot=plot)
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    config = _config(args)
    plot = _plot_path(args)
    with _progress(args, stages=2) as progress:
        package = _load(args, progress)
        report = _sliced(package.program, config, args, progress, "slicing in memory")
    with _staged_picture(report, plot, package.path) as put_picture_in_place:
        _put_in_place(put_picture_in_place)
    size = package_size(package.path)
    functions = ", ".join(package.function_names)
    text = [
        f"{package.path} ({format_bytes(size)}): function(s) {functions}; default '{package.default_function_name}'",
        *_shape_table(report),
        "what slice would do (nothing was written):",
        report.text(near_misses_listed=args.explain),
    ]
    if args.explain:
        text += ["near misses:", report.explain()]
    _print_result(args, report, config, text, paths=(package.path, None), sizes=(size, None), plot=plot)
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    config = _config(args)
    plot = _plot_path(args)
    with _progress(args, stages=2) as progress:
        with progress.stage("building the demo program"):
            prog = llama_attention_program()
        report = _sliced(prog, config, args, progress, "slicing")
    with _staged_picture(report, plot, None) as put_picture_in_place:
        _put_in_place(put_picture_in_place)
    _print_result(args, report, config, [str(report)], paths=(None, None), sizes=(None, None), plot=plot)
    return EXIT_OK


def _examples(args: argparse.Namespace) -> int:
    from sdpa_slicer._tools.examples import write_examples  # builds programs: loaded only when asked for

    with contextlib.redirect_stderr(io.StringIO()):  # coremltools' progress bars, one per conversion
        written = write_examples(Path(args.folder))
    for path in written:
        print(f"wrote {path} ({format_bytes(package_size(path))})")
    return EXIT_OK


def _shape_table(report: SliceReport) -> list[str]:
    if not report.sites:
        return ["no attention sites"]
    rows = []
    for site in report.sites:
        cells = [_shape_text(shape) for shape in (site.query_shape, site.key_shape, site.value_shape, site.mask_shape)]
        rows.append([site.function, site.op_name, site.dtype or "?", *cells])
    return format_table(SHAPE_COLUMNS, rows)


def _shape_text(shape: Optional[Sequence[Any]]) -> str:
    return "-" if shape is None else "x".join(str(dim) for dim in shape)


@contextlib.contextmanager
def _staged_picture(report: SliceReport, plot: Optional[Path], source: Optional[Path]) -> Iterator[Callable[[], None]]:
    """Draw the memory picture, if asked, into a hidden file next to ``plot``; the function yielded
    renames it into place. Unless it is called, no picture appears, and the hidden file is removed."""
    if plot is None:
        yield lambda: None
        return
    figure = memory_figure(report, title=f"{source or 'demo'}: live bytes by op position (static estimate)")
    with _writing_picture(plot):
        handle, name = tempfile.mkstemp(prefix=f".{plot.name}.", suffix=f".partial{plot.suffix}", dir=plot.parent)
        os.close(handle)
    staged = Path(name)
    try:
        with _writing_picture(plot):
            figure.savefig(staged)

        def put_in_place() -> None:
            with _writing_picture(plot):
                os.replace(staged, plot)

        yield put_in_place
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()


@contextlib.contextmanager
def _writing_picture(plot: Path) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        raise PlotError(f"cannot write {plot}: {error.strerror or error}") from error


def _put_in_place(*steps: Callable[[], None]) -> None:
    """Put the outputs in place: from here on Ctrl-C is ignored, so that the command either wrote
    nothing (interrupted before this) or all its outputs and exits 0."""
    _command_process.ignore_interrupts_to_the_end()
    for step in steps:
        step()


def _print_result(
    args: argparse.Namespace,
    report: SliceReport,
    config: SliceConfig,
    text: Sequence[str],
    paths: tuple[Optional[Path], Optional[Path]],
    sizes: tuple[Optional[int], Optional[int]],
    plot: Optional[Path],
) -> None:
    """Print the table (or the JSON document), saying where the picture was drawn."""
    if plot is not None:
        text = [*text, f"memory picture: {plot}"]
    if args.json:
        print(json.dumps(_json_document(args.command, report, config, paths, sizes, plot), indent=2))
    elif not args.quiet:
        print("\n".join(text))


def _json_document(
    command: str,
    report: SliceReport,
    config: SliceConfig,
    paths: tuple[Optional[Path], Optional[Path]],
    sizes: tuple[Optional[int], Optional[int]],
    plot: Optional[Path],
) -> dict[str, Any]:
    document = report.to_dict()
    return {
        "command": command,
        "input": None if paths[0] is None else str(paths[0]),
        "output": None if paths[1] is None else str(paths[1]),
        "input_bytes": sizes[0],
        "output_bytes": sizes[1],
        "plot": None if plot is None else str(plot),
        "config": attrs.asdict(config),
        **document,
    }


@contextlib.contextmanager
def _progress(args: argparse.Namespace, stages: int) -> Iterator[StageProgress]:
    progress = StageProgress(stages, enabled=sys.stderr.isatty() and not args.quiet)
    try:
        yield progress
    finally:
        progress.close()


def _fail(error: Any, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"{PROG}: error: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
