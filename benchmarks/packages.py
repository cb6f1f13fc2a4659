"""Benchmark: ``sdpa-slicer slice`` and ``inspect`` on packages of 1 GiB and 4 GiB of weights.

Run from a checkout (``PYTHONPATH=.`` or with the project installed)::

    python benchmarks/packages.py                          # 1 and 4 GiB, as docs/benchmarks.md shows
    python benchmarks/packages.py --sizes 1 --repeats 1    # 1 GiB only, once
    python benchmarks/packages.py --baseline ../old        # also time the sdpa_slicer of another checkout

It builds, once per run, synthetic packages (fp16, iOS18): N ``linear`` layers of 4096 x 4096
(32 per GiB), then one attention op over the result at L = 512, and a tiny package of the same
program with 128 x 128 layers, whose times are what starting Python, coremltools and the
command cost. Each command runs as a child process (``python -m sdpa_slicer``, ``--quiet``)
while this script samples its peak ``RssAnon`` (the heap: anonymous resident memory, not the
file pages of a mapping) and ``VmHWM`` (peak resident) from ``/proc/<pid>/status``. ``cp -r``
of each package is timed alongside, the runs of every package, command and version taking
turns. The packages live in a temporary folder, removed at the end (``--folder`` keeps them).
"""

from __future__ import annotations

import sdpa_slicer  # noqa: F401  first: it keeps coremltools' import-time warnings quiet

# isort: split
import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, Optional, Sequence

import attrs
import coremltools as ct
import numpy as np
from coremltools import proto
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, types

from compressed_weights import KINDS
from llama_package import build_llama_package
from machine import machine_description
from sdpa_slicer import estimate_memory, load_package, slice_attention
from sdpa_slicer._mlpackage.package import weight_usage
from sdpa_slicer._text import format_bytes, format_table

OPSET = ct.target.iOS18
HIDDEN = 4096
TINY_HIDDEN = 128
HEAD_DIM = 128
TOKENS = 512
LAYERS_PER_GIB = 32
"""fp16 4096 x 4096 weights are 32 MiB each."""
NUM_CHUNKS = "4"
SAMPLE_INTERVAL = 0.005
"""Seconds between two reads of the child's memory figures."""
STATUS_FIELDS = ("RssAnon", "VmHWM")
WEIGHT_FILE = Path("Data", "com.apple.CoreML", "weights", "weight.bin")
MODEL_FILE = Path("Data", "com.apple.CoreML", "model.mlmodel")
REPO = Path(__file__).resolve().parents[1]
TINY = "tiny"
COPY = "cp -r"
SLICE_TIME_COPIES = 3
SLICE_TIME_MARGIN = 1.0
INSPECT_TIME_MARGIN = 1.0
HEAP_MARGIN = 150 * 1024 * 1024
ALL, NONE = "all", "none"
LLAMA = "Llama-3.2-1B int4"
HEADER_BYTES = 64
"""Of a weight file: the blob count (4 bytes), then the format version and zeros."""


# --- packages ---------------------------------------------------------------------------


def synthetic_program(layers: int, hidden: int, seed: int = 0, kind: Optional[str] = None) -> Program:
    """``main(x)``: ``layers`` fp16 ``linear`` layers of ``hidden`` x ``hidden`` random weights
    (compressed as ``compressed_weights.KINDS[kind]`` says, if given), then one attention over
    their output split into heads of 128: ``scaled_dot_product_attention``, or, before iOS18,
    written out as ops."""
    rng = np.random.default_rng(seed)
    opset = OPSET if kind is None else KINDS[kind].opset

    @mb.program(input_specs=[mb.TensorSpec((1, TOKENS, hidden), dtype=types.fp16)], opset_version=opset)
    def prog(x):
        for index in range(layers):
            if kind is None:
                weight = rng.standard_normal((hidden, hidden), dtype=np.float32) / np.float32(np.sqrt(hidden))
                weight = weight.astype(np.float16)
            else:
                weight = KINDS[kind].weight(rng, (hidden, hidden))
            x = mb.linear(x=x, weight=weight, name=f"linear_{index}")
        heads = mb.reshape(x=x, shape=(1, TOKENS, hidden // HEAD_DIM, HEAD_DIM))
        heads = mb.transpose(x=heads, perm=(0, 2, 1, 3))
        if opset >= ct.target.iOS18:
            return mb.scaled_dot_product_attention(query=heads, key=heads, value=heads, name="attention")
        scaled = mb.mul(x=heads, y=np.float16(HEAD_DIM**-0.5))
        scores = mb.matmul(x=scaled, y=heads, transpose_y=True)
        return mb.matmul(x=mb.softmax(x=scores, axis=-1), y=heads, name="attention")

    return prog


def build_package(path: Path, layers: int, hidden: int, kind: Optional[str] = None) -> Path:
    """Save ``synthetic_program(layers, hidden, kind=kind)`` as an ``.mlpackage`` at ``path`` (kept if it exists)."""
    if not path.exists():
        model = ct.convert(
            synthetic_program(layers, hidden, kind=kind),
            convert_to="mlprogram",
            minimum_deployment_target=OPSET if kind is None else KINDS[kind].opset,
            pass_pipeline=ct.PassPipeline.EMPTY,
            skip_model_load=True,
        )
        model.save(str(path))
    return path


# --- measuring --------------------------------------------------------------------------


@attrs.frozen
class Run:
    """One child process: wall time, peak anonymous and peak total resident bytes, and the CPU
    time (user and system) it used, which the other processes of a loaded machine change less."""

    seconds: float
    heap: int
    resident: int
    cpu: float = 0.0


def read_status(pid: int) -> dict[str, int]:
    """The memory figures of ``STATUS_FIELDS`` in ``/proc/<pid>/status``, in bytes; empty once it is gone."""
    figures = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in STATUS_FIELDS:
                    figures[name] = int(value.split()[0]) * 1024  # kB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return figures


def measure(argv: Sequence[str], folder: Path, env: Optional[Mapping[str, str]] = None) -> Run:
    """Run ``argv`` in ``folder`` to the end, sampling its memory; raise if it fails."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        child = subprocess.Popen(list(argv), cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        peaks = dict.fromkeys(STATUS_FIELDS, 0)
        while True:
            for name, value in read_status(child.pid).items():
                peaks[name] = max(peaks[name], value)
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(SAMPLE_INTERVAL)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(argv)} failed ({child.returncode}): {errors.read().decode()[-2000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return Run(seconds=seconds, heap=peaks["RssAnon"], resident=peaks["VmHWM"], cpu=cpu)


@attrs.frozen
class Version:
    """An sdpa_slicer checkout to run the command of.

    Its commands must run in another folder: ``python -m`` imports from the current folder first.
    """

    name: str
    folder: Path

    def environment(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.folder), "TQDM_DISABLE": "1"}

    def command(self, *arguments: str) -> list[str]:
        return [sys.executable, "-m", "sdpa_slicer", *arguments, "--quiet"]


def slice_run(version: Version, package: Path, output: Path) -> Run:
    """Slice ``package`` into ``output``, which is removed afterwards."""
    argv = version.command("slice", str(package), "-o", str(output), "--num-chunks", NUM_CHUNKS)
    run = measure(argv, output.parent, version.environment())
    shutil.rmtree(output)
    return run


def inspect_run(version: Version, package: Path, folder: Path) -> Run:
    return measure(version.command("inspect", str(package), "--num-chunks", NUM_CHUNKS), folder, version.environment())


def copy_run(package: Path, copy: Path) -> Run:
    """``cp -r`` of ``package`` to ``copy``, which is removed afterwards."""
    run = measure(["cp", "-r", str(package), str(copy)], copy.parent)
    shutil.rmtree(copy)
    return run


@attrs.frozen
class OutputCheck:
    """What the package ``version`` slices holds, against its input."""

    weights_identical: bool
    """The output's weight file is the input's, byte for byte."""
    compressed_kept: bool
    """The output has the input's ``constexpr_*`` ops, with the same types of stored values."""


def check_output(version: Version, package: Path, output: Path) -> OutputCheck:
    slice_command = version.command("slice", str(package), "-o", str(output), "--num-chunks", NUM_CHUNKS)
    subprocess.run(slice_command, cwd=output.parent, env=version.environment(), check=True, capture_output=True)
    try:
        return OutputCheck(
            weights_identical=filecmp.cmp(package / WEIGHT_FILE, output / WEIGHT_FILE, shallow=False),
            compressed_kept=compressed_ops(output) == compressed_ops(package),
        )
    finally:
        shutil.rmtree(output)


def compressed_ops(package: Path) -> Counter[tuple[str, tuple[str, ...]]]:
    """How often each ``constexpr_*`` op occurs in the package's spec with the types of the values it reads."""
    spec = _spec(package)
    types_of = {}
    ops = []
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                for output in op.outputs:
                    types_of[output.name] = output.type.tensorType.dataType
                if op.type.startswith("constexpr_"):
                    ops.append(op)
    found: Counter[tuple[str, tuple[str, ...]]] = Counter()
    for op in ops:
        read = []
        for name, argument in sorted(op.inputs.items()):
            for binding in argument.arguments:
                data_type = types_of[binding.name] if binding.name else binding.value.type.tensorType.dataType
                read.append(f"{name}: {proto.MIL_pb2.DataType.Name(data_type)}")
        found[(op.type, tuple(read))] += 1
    return found


# --- tables -----------------------------------------------------------------------------


Key = tuple[str, str, str]
"""(package, version, command)"""


def measure_all(
    packages: Mapping[str, Path], versions: Sequence[Version], folder: Path, repeats: int
) -> dict[Key, Run]:
    """The median run (by time; heap and resident their own medians) of every package, version and command."""
    runs: dict[Key, list[Run]] = defaultdict(list)
    output, copy = folder / "out.mlpackage", folder / "copy.mlpackage"
    for name, package in packages.items():
        copy_run(package, copy)  # read the package once so that every run finds it in the page cache
    for version in versions:
        inspect_run(version, packages[TINY], folder)  # compile the version's modules once
    for _ in range(repeats):
        for name, package in packages.items():
            runs[(name, "-", COPY)].append(copy_run(package, copy))
            for version in versions:
                runs[(name, version.name, "slice")].append(slice_run(version, package, output))
                runs[(name, version.name, "inspect")].append(inspect_run(version, package, folder))
    return {
        key: Run(
            seconds=statistics.median(run.seconds for run in values),
            heap=int(statistics.median(run.heap for run in values)),
            resident=int(statistics.median(run.resident for run in values)),
            cpu=statistics.median(run.cpu for run in values),
        )
        for key, values in runs.items()
    }


def results_table(results: Mapping[Key, Run], packages: Mapping[str, Path], repeats: int) -> list[str]:
    rows = [
        [
            name,
            version,
            command,
            f"{run.seconds:.2f}",
            f"{run.cpu:.2f}",
            format_bytes(run.heap),
            format_bytes(run.resident),
        ]
        for (name, version, command), run in results.items()
    ]
    sizes = ", ".join(f"{name} {format_bytes(package_size(package))}" for name, package in packages.items())
    return [
        f"slice (--num-chunks {NUM_CHUNKS}) and inspect as child processes, median of {repeats}; packages: {sizes}",
        "time: wall; cpu: user + system; heap: peak RssAnon, resident: peak VmHWM, sampled from /proc/<pid>/status",
        *format_table(["package", "version", "command", "time s", "cpu s", "heap", "resident"], rows),
    ]


def target_rows(results: Mapping[Key, Run], package: str, version: str) -> list[tuple[str, str, str, bool]]:
    """Each target for ``package`` and ``version`` against the tiny package and ``cp -r``: its
    name, what was measured, the limit (with its formula) and whether it is met. The time targets
    are judged on wall time, and again on CPU time (the tiny package's CPU time in the formula)."""
    copy = round(results[(package, "-", COPY)].seconds, 2)  # the figures shown, so that the formulas add up
    rows = []
    for command in ("slice", "inspect"):
        run, tiny = results[(package, version, command)], results[(TINY, version, command)]
        for clock, measured, base in (("time", run.seconds, tiny.seconds), ("cpu", run.cpu, tiny.cpu)):
            measured, base = round(measured, 2), round(base, 2)
            margin = SLICE_TIME_COPIES * copy + SLICE_TIME_MARGIN if command == "slice" else INSPECT_TIME_MARGIN
            formula = (
                f"{base:.2f} + {SLICE_TIME_COPIES} x {copy:.2f} + {SLICE_TIME_MARGIN:.0f}"
                if command == "slice"
                else f"{base:.2f} + {INSPECT_TIME_MARGIN:.0f}"
            )
            limit = base + margin
            rows.append((f"{command} {clock}", f"{measured:.2f} s", f"{formula} = {limit:.2f} s", measured <= limit))
        heap_limit = tiny.heap + HEAP_MARGIN
        heap_formula = f"{format_bytes(tiny.heap)} + {format_bytes(HEAP_MARGIN)} = {format_bytes(heap_limit)}"
        rows.append((f"{command} heap", format_bytes(run.heap), heap_formula, run.heap <= heap_limit))
    return rows


def targets_table(results: Mapping[Key, Run], package: str, version: str) -> list[str]:
    rows = [[name, measured, limit, _met(ok)] for name, measured, limit, ok in target_rows(results, package, version)]
    return [f"targets, {package} package, {version}:", *format_table(["target", "measured", "limit", "result"], rows)]


def kinds_table(
    results: Mapping[Key, Run],
    sizes: Mapping[str, int],
    kinds: Sequence[str],
    version: str,
    checks: Mapping[str, OutputCheck],
) -> list[str]:
    """One line per compressed package: each target, met or not."""
    rows = []
    for kind in kinds:
        check = checks[kind]
        rows.append(
            [
                kind,
                format_bytes(sizes[kind]),
                f"{results[(kind, version, 'slice')].seconds:.2f}",
                f"{results[(kind, version, 'inspect')].seconds:.2f}",
                format_bytes(max(results[(kind, version, command)].heap for command in ("slice", "inspect"))),
                _met(all(ok for name, *_, ok in target_rows(results, kind, version) if "cpu" not in name)),
                _met(all(ok for name, *_, ok in target_rows(results, kind, version) if "time" not in name)),
                _met(check.weights_identical and check.compressed_kept),
            ]
        )
    return [
        f"compressed packages, {version}: the time and heap targets of its targets table (wall time), the cpu "
        "and heap targets (CPU time); the output's weight file and constexpr ops the input's",
        *format_table(
            ["package", "size", "slice s", "inspect s", "heap", "targets (wall)", "targets (cpu)", "output"], rows
        ),
    ]


def llama_report(package: Path, output: Path) -> list[str]:
    """What slicing the Llama package does to it: the static peak of each function before and after
    (sliced in this process, as the command does), and what the command's output keeps."""
    loaded = load_package(package)
    before = {name: estimate_memory(loaded.program, name) for name in loaded.function_names}
    report = slice_attention(loaded.program, num_chunks=int(NUM_CHUNKS))
    rows = []
    for name, estimate in before.items():
        after = estimate_memory(loaded.program, name)
        rewritten = sum(site.status == "rewritten" for site in report.sites if site.function == name)
        rows.append(
            [
                name,
                str(rewritten),
                format_bytes(estimate.peak_live_bytes),
                format_bytes(after.peak_live_bytes),
                format_bytes(estimate.largest_tensor_bytes),
                format_bytes(after.largest_tensor_bytes),
                format_bytes(estimate.weights_bytes),
                format_bytes(estimate.state_bytes),
            ]
        )
    lines = [
        f"{LLAMA}: static estimate of each function, before and after slice --num-chunks {NUM_CHUNKS}",
        *format_table(
            ["function", "sites", "peak before", "peak after", "largest before", "largest after", "weights", "state"],
            rows,
        ),
    ]
    version = Version("this", REPO)
    argv = version.command("slice", str(package), "-o", str(output), "--num-chunks", NUM_CHUNKS)
    subprocess.run(argv, cwd=output.parent, env=version.environment(), check=True, capture_output=True)
    try:
        model = ct.models.MLModel(str(output), skip_model_load=True)  # rewrites the output's manifest
        description, source = model.get_spec().description, _spec(package).description
        functions = [function.name for function in description.functions]
        states = {function.name: [state.name for state in function.state] for function in description.functions}
        source_states = {function.name: [state.name for state in function.state] for function in source.functions}
        usage = weight_usage(output)
        new_bytes = (output / WEIGHT_FILE).stat().st_size - (package / WEIGHT_FILE).stat().st_size
        sizes = package_size(package), package_size(output)
        spec_sizes = (package / MODEL_FILE).stat().st_size, (output / MODEL_FILE).stat().st_size
        lines += [
            f"the output loads with ct.models.MLModel(path, skip_model_load=True): functions {', '.join(functions)} "
            f"(the input's: {functions == [function.name for function in source.functions]}), default "
            f"'{description.defaultFunctionName}' (the input's: "
            f"{description.defaultFunctionName == source.defaultFunctionName}), the input's states in every function: "
            f"{states == source_states} ({sum(map(len, states.values()))} states)",
            f"sizes: input {format_bytes(sizes[0])}, output {format_bytes(sizes[1])}, new constants "
            f"{format_bytes(new_bytes)}, the spec {format_bytes(spec_sizes[0])} -> {format_bytes(spec_sizes[1])}; "
            f"output <= input + new constants + the spec's growth: "
            f"{sizes[1] <= sizes[0] + new_bytes + spec_sizes[1] - spec_sizes[0]}; the output's weight file is the "
            f"input's with the new constants appended: {_appended_to(package / WEIGHT_FILE, output / WEIGHT_FILE)}",
            f"weights no op refers to any more: {format_bytes(usage.unreferenced_bytes)} "
            f"({usage.unreferenced_blobs} blobs)",
        ]
    finally:
        shutil.rmtree(output)
    return lines


def _spec(package: Path) -> proto.Model_pb2.Model:
    spec = proto.Model_pb2.Model()
    spec.ParseFromString((package / MODEL_FILE).read_bytes())
    return spec


def _appended_to(source: Path, output: Path) -> bool:
    """Whether ``output`` is ``source`` (but the blob count in its header) with bytes appended."""
    chunk = 64 * 1024 * 1024
    with open(source, "rb") as before, open(output, "rb") as after:
        if before.read(HEADER_BYTES)[4:] != after.read(HEADER_BYTES)[4:]:
            return False
        while data := before.read(chunk):
            if after.read(len(data)) != data:
                return False
    return True


def _slug(name: str) -> str:
    return "".join(character if character.isalnum() else "_" for character in name)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def package_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="1,4", help="GiB of fp16 weights of the packages to build, or 'none' (default 1,4)"
    )
    parser.add_argument(
        "--kinds",
        default=ALL,
        help="compressed packages to build (1 GiB of fp16 weights' worth each), comma-separated names of "
        f"compressed_weights.KINDS, 'all' (the default) or 'none': {', '.join(KINDS)}",
    )
    parser.add_argument(
        "--llama",
        action="store_true",
        help="also build and time a package of Llama-3.2-1B's shape, int4 (about 1 GiB, a minute to build)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command, the median reported (default 3)")
    parser.add_argument("--baseline", type=Path, help="a checkout of another sdpa_slicer version to time as 'before'")
    parser.add_argument("--folder", type=Path, help="build (or reuse) the packages here and keep them")
    args = parser.parse_args(argv)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="sdpa_slicer_packages_"))
    folder.mkdir(parents=True, exist_ok=True)
    versions = [Version("after" if args.baseline else "this", REPO)]
    if args.baseline is not None:
        versions.insert(0, Version("before", args.baseline.resolve()))
    try:
        print("\n".join(machine_description()), end="\n\n", flush=True)
        sizes = [int(size) for size in args.sizes.split(",")] if args.sizes != NONE else []
        kinds = list(KINDS) if args.kinds == ALL else [] if args.kinds == NONE else args.kinds.split(",")
        start = time.perf_counter()
        packages = {TINY: build_package(folder / "tiny.mlpackage", LAYERS_PER_GIB, TINY_HIDDEN)}
        for size in sizes:
            packages[f"{size} GiB"] = build_package(folder / f"{size}gib.mlpackage", LAYERS_PER_GIB * size, HIDDEN)
        for kind in kinds:
            packages[kind] = build_package(folder / f"{_slug(kind)}.mlpackage", LAYERS_PER_GIB, HIDDEN, kind)
        if args.llama:
            packages[LLAMA] = build_llama_package(folder / "llama_1b.mlpackage")
        print(f"packages ready in {time.perf_counter() - start:.0f} s", end="\n\n", flush=True)
        results = measure_all(packages, versions, folder, args.repeats)
        print("\n".join(results_table(results, packages, args.repeats)), end="\n\n")
        checks = {}
        for name in [f"{size} GiB" for size in sizes] + kinds + ([LLAMA] if args.llama else []):
            for version in versions:
                print("\n".join(targets_table(results, name, version.name)), end="\n\n")
            checks[name] = check_output(versions[-1], packages[name], folder / "out.mlpackage")
            print(
                f"{name}, {versions[-1].name}: the output's weight file is the input's byte for byte: "
                f"{checks[name].weights_identical}; the same constexpr ops read the same types: "
                f"{checks[name].compressed_kept}",
                end="\n\n",
            )
        if kinds:
            sizes_of = {name: package_size(package) for name, package in packages.items()}
            print("\n".join(kinds_table(results, sizes_of, kinds, versions[-1].name, checks)), end="\n\n")
        if args.llama:
            print("\n".join(llama_report(packages[LLAMA], folder / "out.mlpackage")), end="\n\n")
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
