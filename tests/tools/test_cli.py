"""The ``sdpa-slicer`` command: slice, inspect and demo; tables and JSON; one-line errors and exit codes."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Union

import attrs
import coremltools
import numpy as np
import pytest

import sdpa_slicer
from generation import generate, max_differences
from graph import op_counts
from packages import (
    BAD_INPUTS,
    FUNCTIONS,
    KV_DEFAULT_FUNCTION,
    KV_FUNCTIONS,
    NOT_PACKAGES,
    PROJECTIONS,
    WEIGHT_FILE,
    blob_offsets,
    compressed_weights,
    model_spec,
    tree_digest,
    tree_times,
)
from programs import kv_cache_calls
from sdpa_slicer import SliceConfig
from sdpa_slicer._errors import EmitError, UsageError
from sdpa_slicer._mlpackage import package as _package
from sdpa_slicer._mlpackage.package import load_package, package_size
from sdpa_slicer._rewrite.emit.site import BlockRewriter
from sdpa_slicer._rewrite.report import COLUMNS
from sdpa_slicer._text import format_bytes
from sdpa_slicer._tools.cli import DEFAULTS, _config, _parser, build_config, main
from sdpa_slicer._tools.plot import MISSING_MATPLOTLIB

PROG = "sdpa-slicer"
SHAPE = [1, 2, 64, 8]
REPO = Path(sdpa_slicer.__file__).resolve().parents[1]


@attrs.frozen
class Run:
    code: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        return json.loads(self.out)


def run(capsys: pytest.CaptureFixture[str], *argv: Union[str, Path]) -> Run:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_slice_writes_the_sliced_package_and_prints_the_report(
    single_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "sliced.mlpackage"
    result = run(capsys, "slice", single_package, "-o", output, "--num-chunks", "4")
    assert (result.code, result.err) == (0, "")
    assert op_counts(load_package(output).program)["softmax"] == 4
    lines = result.out.splitlines()
    assert lines[0] == "1 attention site(s) rewritten, 0 skipped"
    assert lines[-1].startswith(f"wrote {output} (")


def test_slice_json_has_the_report_paths_and_sizes(
    multi_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "sliced.mlpackage"
    document = run(capsys, "slice", multi_package, "-o", output, "--chunk-size", "16", "--json").json()
    assert (document["command"], document["input"], document["output"]) == ("slice", str(multi_package), str(output))
    assert (document["input_bytes"], document["output_bytes"]) == (package_size(multi_package), package_size(output))
    assert document["config"]["chunk_size"] == 16
    assert [(site["function"], site["num_chunks"]) for site in document["sites"]] == [(name, 4) for name in FUNCTIONS]
    site = document["sites"][0]
    shapes = {name: site[name] for name in ("dtype", "query_shape", "key_shape", "value_shape", "mask_shape")}
    assert shapes == {
        "dtype": "fp32",
        "query_shape": SHAPE,
        "key_shape": SHAPE,
        "value_shape": SHAPE,
        "mask_shape": None,
    }
    assert [estimate["function"] for estimate in document["memory_after"]] == list(FUNCTIONS)


def test_force_replaces_an_existing_output(
    single_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "sliced.mlpackage"
    assert run(capsys, "slice", single_package, "-o", output, "--num-chunks", "2").code == 0
    assert run(capsys, "slice", single_package, "-o", output, "--num-chunks", "4", "--force").code == 0
    assert op_counts(load_package(output).program)["softmax"] == 4


@attrs.frozen
class SlicedPackage:
    source: Path
    output: Path


@pytest.fixture(scope="module")
def sliced_kv(kv_package: Path, tmp_path_factory: pytest.TempPathFactory) -> SlicedPackage:
    output = tmp_path_factory.mktemp("sliced_kv") / "sliced.mlpackage"
    assert main(["slice", str(kv_package), "-o", str(output), "--num-chunks", "4", "--quiet"]) == 0
    return SlicedPackage(kv_package, output)


def test_slice_keeps_every_function_the_default_and_the_state_descriptions(sliced_kv: SlicedPackage) -> None:
    package = load_package(sliced_kv.output)
    assert package.function_names == tuple(KV_FUNCTIONS)
    assert package.default_function_name == KV_DEFAULT_FUNCTION
    before, after = model_spec(sliced_kv.source).description, model_spec(sliced_kv.output).description
    assert after == before
    assert [[state.name for state in function.state] for function in after.functions] == [["k_cache", "v_cache"]] * 2
    assert op_counts(package.program, "prefill")["softmax"] == 4
    assert op_counts(package.program, "decode")["scaled_dot_product_attention"] == 1


def test_slice_keeps_compressed_weights_bit_exact_and_shared(sliced_kv: SlicedPackage) -> None:
    weights = compressed_weights(sliced_kv.source)
    assert all(sum(weights[name].values()) == len(PROJECTIONS) for name in KV_FUNCTIONS)
    assert compressed_weights(sliced_kv.output) == weights
    assert (sliced_kv.output / WEIGHT_FILE).read_bytes() == (sliced_kv.source / WEIGHT_FILE).read_bytes()
    offsets = blob_offsets(sliced_kv.output)
    assert offsets == blob_offsets(sliced_kv.source)
    assert offsets["prefill"] and offsets["prefill"] == offsets["decode"]


def test_the_sliced_package_generates_like_the_input(sliced_kv: SlicedPackage) -> None:
    want = generate(load_package(sliced_kv.source).program, *kv_cache_calls())
    got = generate(load_package(sliced_kv.output).program, *kv_cache_calls())
    for name, cache in want.states.items():
        np.testing.assert_array_equal(got.states[name], cache)
    for got_call, want_call in zip(got.outputs, want.outputs):
        (got_value,), (want_value,) = got_call.values(), want_call.values()
        assert max_differences(got_value, want_value)[1] < 2e-3


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_inspect_reports_sites_and_writes_nothing(
    as_json: bool, multi_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (tree_digest(multi_package.parent), tree_times(multi_package.parent))
    result = run(capsys, "inspect", multi_package, "--num-chunks", "2", *(["--json"] if as_json else []))
    assert result.code == 0
    assert (tree_digest(multi_package.parent), tree_times(multi_package.parent)) == before
    if as_json:
        document = result.json()
        assert (document["output"], document["output_bytes"]) == (None, None)
        assert document["input_bytes"] == package_size(multi_package)
        assert [site["status"] for site in document["sites"]] == ["rewritten", "rewritten"]
    else:
        assert "default 'second'" in result.out.splitlines()[0]
        rows = [line.split() for line in result.out.splitlines()]
        assert all([name, "attention", "fp32", *["1x2x64x8"] * 3, "-"] in rows for name in FUNCTIONS)
        assert "2 attention site(s) rewritten, 0 skipped" in result.out


NEAR_MISSES = [
    ("weights_by_query", "softmax over axis -2, not the last"),
    (
        "weights_gathered",
        "gather 'gathered' between the scores and the softmax is not elementwise, so it cannot be cut by query rows",
    ),
]


def test_inspect_explain_lists_the_near_misses_with_their_reasons_and_ops(
    near_misses_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = run(capsys, "inspect", near_misses_package)
    explained = run(capsys, "inspect", near_misses_package, "--explain")
    assert plain.code == explained.code == 0
    assert "2 softmax op(s) look like attention but were not matched" in plain.out
    assert "near misses:" not in plain.out
    assert "inspect --explain lists them" in plain.out and "inspect --explain lists them" not in explained.out
    notes = explained.out.split("near misses:\n")[1].splitlines()
    assert notes[0::2] == [f"main/{name} (decomposed_attention): {reason}" for name, reason in NEAR_MISSES]
    assert notes[1] == "  ops: matmul 'by_query_scores' -> softmax 'weights_by_query' -> matmul 'by_query'"


def test_the_json_document_lists_the_near_misses(near_misses_package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = run(capsys, "inspect", near_misses_package, "--num-chunks", "2", "--json").json()
    assert [(site["op_name"], site["status"]) for site in document["sites"]] == [("attention", "rewritten")]
    assert [(miss["op_name"], miss["reason"]) for miss in document["near_misses"]] == NEAR_MISSES
    assert document["near_misses"][1]["chain"] == ["gather 'gathered'", "softmax 'weights_gathered'", "matmul 'out'"]


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_demo_slices_the_llama_layer(as_json: bool, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "demo", *(["--json"] if as_json else []))
    assert result.code == 0
    if as_json:
        document = result.json()
        assert document["num_rewritten"] == 1 and document["input"] is None
        assert document["memory_after"][0]["peak_live_bytes"] < document["memory_before"][0]["peak_live_bytes"]
    else:
        assert "main      attention  fused  rewritten  2048  2048  16" in result.out
        assert "memory of 'main': peak live 288.0 MiB -> " in result.out


def _with_input(kind: str) -> Callable[[Path, Path], list[Any]]:
    make = BAD_INPUTS[kind][0]
    return lambda good, folder: ["slice", make(good, folder), "-o", folder / "out.mlpackage"]


def _slice_options(*options: str) -> Callable[[Path, Path], list[Any]]:
    return lambda good, folder: ["slice", good, "-o", folder / "out.mlpackage", *options]


def _existing_output(good: Path, folder: Path) -> list[Any]:
    shutil.copytree(good, folder / "out.mlpackage")
    return ["slice", good, "-o", folder / "out.mlpackage"]


def _forced_over(kind: str) -> Callable[[Path, Path], list[Any]]:
    return lambda good, folder: ["slice", good, "-o", NOT_PACKAGES[kind](good, folder), "--force"]


BAD_COMMAND_LINES: dict[str, tuple[Callable[[Path, Path], list[Any]], int, str]] = {
    **{kind: (_with_input(kind), 1, message) for kind, (_, message) in BAD_INPUTS.items()},
    "output exists": (_existing_output, 1, "already exists; add --force to replace it"),
    **{
        f"--force over {kind}": (_forced_over(kind), 1, "is not an .mlpackage folder with a readable manifest")
        for kind in NOT_PACKAGES
    },
    "output is the input": (lambda good, folder: ["slice", good, "-o", good, "--force"], 1, "is the input package"),
    "zero chunks": (_slice_options("--num-chunks", "0"), 2, "--num-chunks 0: SliceConfig.num_chunks must be >= 1"),
    "two policies": (_slice_options("--num-chunks", "2", "--chunk-size", "8"), 2, "not allowed with argument"),
    "size in words": (_slice_options("--max-scores-bytes", "lots"), 2, "--max-scores-bytes lots: not a byte size"),
    "no output": (lambda good, folder: ["slice", good], 2, "required: -o/--output"),
    "no command": (lambda good, folder: ["--quiet"], 2, "required: COMMAND"),
}


@pytest.mark.parametrize("case", BAD_COMMAND_LINES)
def test_a_bad_command_line_fails_with_one_line(
    case: str, single_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv_of, code, message = BAD_COMMAND_LINES[case]
    argv = argv_of(single_package, tmp_path)
    before = tree_digest(tmp_path)
    result = run(capsys, *argv)
    assert result.code == code
    (line,) = result.err.splitlines()
    assert line.startswith(f"{PROG}: error: ") and message in line
    assert result.out == ""
    assert tree_digest(tmp_path) == before


def test_debug_adds_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "inspect", tmp_path / "missing.mlpackage", "--debug")
    assert result.code == 1
    assert result.err.startswith("Traceback")
    assert result.err.splitlines()[-1] == f"{PROG}: error: {tmp_path / 'missing.mlpackage'} does not exist"


@pytest.mark.parametrize("strict", [False, True])
def test_strict_fails_on_a_site_that_cannot_be_rewritten(
    strict: bool,
    single_package: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(*args: object) -> None:
        raise EmitError("injected failure")

    monkeypatch.setattr(BlockRewriter, "rewrite", fail)
    output = tmp_path / "out.mlpackage"
    result = run(capsys, "slice", single_package, "-o", output, "--json", *(["--strict"] if strict else []))
    assert result.code == (1 if strict else 0)
    assert output.exists() is not strict
    if strict:
        assert result.err == f"{PROG}: error: injected failure\n"
    else:
        assert [(site["status"], site["reason"]) for site in result.json()["sites"]] == [
            ("skipped", "injected failure")
        ]


@pytest.mark.parametrize("quiet", [False, True])
def test_the_progress_bar_shows_on_a_terminal_unless_quiet(
    quiet: bool,
    single_package: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    output = tmp_path / "out.mlpackage"
    result = run(capsys, "slice", single_package, "-o", output, *(["--quiet"] if quiet else []))
    assert result.code == 0 and output.exists()
    if quiet:
        assert (terminal.getvalue(), result.out) == ("", "")
    else:
        assert all(stage in terminal.getvalue() for stage in ("loading", "slicing", "saving"))
        assert re.search(rf"loading {single_package}: (\d+)/\1 ops", terminal.getvalue())
        size = format_bytes((single_package / WEIGHT_FILE).stat().st_size)
        assert f"saving {output}: {size}/{size}" in terminal.getvalue()
        assert "rewritten" in result.out


def test_build_config_sets_only_the_options_given() -> None:
    assert build_config({}) == SliceConfig()
    assert build_config({"num_chunks": "3", "match_decomposed": "false"}) == SliceConfig(
        num_chunks=3, match_decomposed=False
    )


def test_every_slicing_flag_sets_its_config_field() -> None:
    args = _parser().parse_args(
        [
            "demo",
            "--chunk-size",
            "8",
            "--min-seq-length",
            "32",
            "--kv-chunk-size",
            "64",
            "--min-query-chunk",
            "4",
            "--keep-masked-keys",
            "--fused-only",
            "--keep-repeated-kv",
            "--keep-unchunked-fused",
        ]
    )
    assert _config(args) == SliceConfig(
        chunk_size=8,
        min_seq_length=32,
        kv_chunk_size=64,
        min_query_chunk=4,
        prune_masked_keys=False,
        match_decomposed=False,
        fold_repeated_kv=False,
        decompose_unchunked=False,
    )


def test_an_option_the_installed_config_lacks_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="^--frobnicate-level is not supported by this version of sdpa_slicer$"):
        build_config({"frobnicate_level": "3"})


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "--help")
    assert result.code == 0
    assert all(command in result.out for command in ("slice", "inspect", "demo", "--version"))


@pytest.mark.parametrize("command", ["slice", "inspect", "demo"])
def test_help_gives_the_configs_defaults_and_explains_the_report_columns(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    monkeypatch.setattr(
        sdpa_slicer._tools.cli, "DEFAULTS", SliceConfig(max_scores_bytes=3 << 20, min_seq_length=7, min_query_chunk=5)
    )
    result = run(capsys, command, "--help")
    assert result.code == 0
    assert "GB 1000s; default 3.0 MiB)" in result.out
    assert "fewer than N query rows (default 7)" in result.out
    assert "chunk keys instead (default 5)" in result.out
    epilog = result.out.split("The report's columns (? where a value is unknown):\n")[1]
    titles = [line[2:].split("  ")[0] for line in epilog.splitlines() if not line.startswith("   ")]
    assert titles == [column.title for column in COLUMNS]


def test_slice_help_lists_the_required_output_first_and_explains_sizes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a user: the required ``-o`` came last, and SIZE was not explained."""
    monkeypatch.setenv("COLUMNS", "400")
    options = run(capsys, "slice", "--help").out.split("options:\n")[1].splitlines()
    flags = [line.split()[0] for line in options if line.startswith("  -")]
    assert flags[:3] == ["-h,", "-o", "--force"]
    size = " ".join(" ".join(options).split()).split("--max-scores-bytes SIZE ")[1]
    examples = size.split("as in ")[1].split(" (")[0].split(", ")
    assert [build_config({"max_scores_bytes": example}).max_scores_bytes for example in examples] == [
        16 << 20,
        512_000,
        3 << 29,
        1 << 20,
    ]
    assert "KiB, MiB, GiB count 1024s; KB, MB, GB 1000s" in size


def test_no_arguments_print_the_usage_and_where_help_is(capsys: pytest.CaptureFixture[str]) -> None:
    """Found by a user: only "the following arguments are required: COMMAND"."""
    result = run(capsys)
    assert (result.code, result.out) == (2, "")
    assert result.err.splitlines()[0].startswith(f"usage: {PROG} ")
    assert result.err.splitlines()[-1] == f"{PROG}: error: no command given; '{PROG} --help' lists the commands"


def test_the_help_defaults_are_the_configs() -> None:
    assert DEFAULTS == SliceConfig()


def test_version_names_the_package_coremltools_and_python(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "--version")
    assert result.code == 0
    versions = f"(coremltools {coremltools.__version__}, Python {platform.python_version()})"
    assert result.out == f"{PROG} {sdpa_slicer.__version__} {versions}\n"
    assert sdpa_slicer.__version__ == importlib.metadata.version("sdpa-slicer")


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_draws_the_picture_and_says_where(
    suffix: str, multi_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / f"memory{suffix}"
    result = run(capsys, "inspect", multi_package, "--num-chunks", "2", "--plot", picture)
    assert (result.code, result.err) == (0, "")
    assert picture.stat().st_size > 0
    assert result.out.splitlines()[-1] == f"memory picture: {picture}"
    document = run(capsys, "slice", multi_package, "-o", tmp_path / "out.mlpackage", "--plot", picture, "--json").json()
    assert document["plot"] == str(picture)


@pytest.mark.parametrize(
    "plot, hide_matplotlib, code, message",
    [
        ("memory.jpg", False, 2, "--plot memory.jpg: the file name must end in .png or .svg, not .jpg"),
        ("memory.png", True, 1, MISSING_MATPLOTLIB),
        ("no/memory.png", False, 2, "--plot no/memory.png: the folder {tmp}/no does not exist"),
    ],
    ids=["another suffix", "no matplotlib", "no folder"],
)
def test_plot_fails_with_one_line_before_any_work(
    plot: str,
    hide_matplotlib: bool,
    code: int,
    message: str,
    single_package: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if hide_matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(
        sdpa_slicer._tools.cli, "load_package", lambda *args, **kwargs: pytest.fail("loaded the package")
    )
    result = run(capsys, "slice", single_package, "-o", tmp_path / "out.mlpackage", "--plot", tmp_path / plot)
    expected = f"{PROG}: error: {message}\n".replace(plot, str(tmp_path / plot)).replace("{tmp}", str(tmp_path))
    assert (result.code, result.out, result.err) == (code, "", expected)
    assert list(tmp_path.iterdir()) == []


def test_a_picture_that_cannot_be_written_fails_with_one_line_and_no_output(
    single_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: the picture was drawn after the package was saved, so a failed drawing
    exited 1 with the output written anyway."""
    from matplotlib.figure import Figure

    def refuse(self: Figure, path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Figure, "savefig", refuse)
    picture = tmp_path / "memory.png"
    result = run(capsys, "slice", single_package, "-o", tmp_path / "out.mlpackage", "--plot", picture)
    assert (result.code, result.out, result.err) == (
        1,
        "",
        f"{PROG}: error: cannot write {picture}: Permission denied\n",
    )
    assert list(tmp_path.iterdir()) == []


def test_python_m_runs_without_coremltools_progress_bars(single_package: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.mlpackage"
    env = {name: value for name, value in os.environ.items() if name != "TQDM_DISABLE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "sdpa_slicer", "slice", str(single_package), "-o", str(output), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output_bytes"] == package_size(output)
    assert "Running MIL" not in done.stderr and "Traceback" not in done.stderr


class _DiskFull(OSError):
    """Stands for a disk that fills up halfway through writing the package."""


def _fail_halfway(failure: BaseException) -> Callable[[pytest.MonkeyPatch], None]:
    """Write the whole package into the staging folder, then raise ``failure``."""

    def inject(monkeypatch: pytest.MonkeyPatch) -> None:
        real = _package._build

        def write_then_fail(*args: object) -> None:
            real(*args)
            raise failure

        monkeypatch.setattr(_package, "_build", write_then_fail)

    return inject


def _deny_the_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", kwargs["dir"])

    monkeypatch.setattr(_package.tempfile, "mkdtemp", refuse)


FAILED_WRITES: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], int, str]] = {
    "disk full halfway": (_fail_halfway(_DiskFull(28, "No space left on device")), 1, "error: cannot write"),
    "a bug halfway": (_fail_halfway(RuntimeError("injected")), 1, "error: unexpected RuntimeError: injected"),
    "interrupted halfway": (_fail_halfway(KeyboardInterrupt()), 130, "interrupted"),
    "unwritable folder": (_deny_the_folder, 1, "error: cannot write in"),
}


@pytest.mark.parametrize("existing", [False, True], ids=["new output", "forced over an output"])
@pytest.mark.parametrize("case", FAILED_WRITES)
def test_a_failed_slice_leaves_the_input_and_any_old_output_as_they_were(
    case: str,
    existing: bool,
    single_package: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = Path(shutil.copytree(single_package, tmp_path / "input.mlpackage"))
    output = tmp_path / "out.mlpackage"
    if existing:
        assert run(capsys, "slice", source, "-o", output, "--num-chunks", "2").code == 0
    before = {path.name: tree_digest(path) for path in tmp_path.iterdir()}
    inject, code, message = FAILED_WRITES[case]
    inject(monkeypatch)
    result = run(capsys, "slice", source, "-o", output, "--num-chunks", "4", "--force")
    assert result.code == code
    (line,) = result.err.splitlines()
    assert line.startswith(f"{PROG}: ") and message in line
    assert {path.name: tree_digest(path) for path in tmp_path.iterdir()} == before


def test_a_successful_slice_leaves_the_input_as_it_was(
    single_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = Path(shutil.copytree(single_package, tmp_path / "input.mlpackage"))
    before = (tree_digest(source), tree_times(source))
    assert run(capsys, "slice", source, "-o", tmp_path / "out.mlpackage", "--num-chunks", "4").code == 0
    assert (tree_digest(source), tree_times(source)) == before
