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
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Optional, Sequence

import attrs
import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, types

from machine import machine_description
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
REPO = Path(__file__).resolve().parents[1]
TINY = "tiny"
COPY = "cp -r"
SLICE_TIME_COPIES = 3
SLICE_TIME_MARGIN = 1.0
INSPECT_TIME_MARGIN = 1.0
HEAP_MARGIN = 150 * 1024 * 1024


# --- packages ---------------------------------------------------------------------------


def synthetic_program(layers: int, hidden: int, seed: int = 0) -> Program:
    """``main(x)``: ``layers`` fp16 ``linear`` layers of ``hidden`` x ``hidden`` random weights,
    then one ``scaled_dot_product_attention`` over their output split into heads of 128."""
    rng = np.random.default_rng(seed)

    @mb.program(input_specs=[mb.TensorSpec((1, TOKENS, hidden), dtype=types.fp16)], opset_version=OPSET)
    def prog(x):
        for index in range(layers):
            weight = rng.standard_normal((hidden, hidden), dtype=np.float32) / np.float32(np.sqrt(hidden))
            x = mb.linear(x=x, weight=weight.astype(np.float16), name=f"linear_{index}")
        heads = mb.reshape(x=x, shape=(1, TOKENS, hidden // HEAD_DIM, HEAD_DIM))
        heads = mb.transpose(x=heads, perm=(0, 2, 1, 3))
        return mb.scaled_dot_product_attention(query=heads, key=heads, value=heads, name="attention")

    return prog


def build_package(path: Path, layers: int, hidden: int) -> Path:
    """Save ``synthetic_program(layers, hidden)`` as an ``.mlpackage`` at ``path`` (kept if it exists)."""
    if not path.exists():
        model = ct.convert(
            synthetic_program(layers, hidden),
            convert_to="mlprogram",
            minimum_deployment_target=OPSET,
            pass_pipeline=ct.PassPipeline.EMPTY,
            skip_model_load=True,
        )
        model.save(str(path))
    return path


# --- measuring --------------------------------------------------------------------------


@attrs.frozen
class Run:
    """One child process: wall time, peak anonymous and peak total resident bytes."""

    seconds: float
    heap: int
    resident: int


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
        while child.poll() is None:
            for name, value in read_status(child.pid).items():
                peaks[name] = max(peaks[name], value)
            time.sleep(SAMPLE_INTERVAL)
        seconds = time.perf_counter() - start
        if child.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(argv)} failed ({child.returncode}): {errors.read().decode()[-2000:]}")
    return Run(seconds=seconds, heap=peaks["RssAnon"], resident=peaks["VmHWM"])


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


def weights_identical(version: Version, package: Path, output: Path) -> bool:
    """Whether the package ``version`` slices has the input's weight file, byte for byte."""
    slice_command = version.command("slice", str(package), "-o", str(output), "--num-chunks", NUM_CHUNKS)
    subprocess.run(slice_command, cwd=output.parent, env=version.environment(), check=True, capture_output=True)
    try:
        return filecmp.cmp(package / WEIGHT_FILE, output / WEIGHT_FILE, shallow=False)
    finally:
        shutil.rmtree(output)


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
        )
        for key, values in runs.items()
    }


def results_table(results: Mapping[Key, Run], packages: Mapping[str, Path], repeats: int) -> list[str]:
    rows = [
        [name, version, command, f"{run.seconds:.2f}", format_bytes(run.heap), format_bytes(run.resident)]
        for (name, version, command), run in results.items()
    ]
    sizes = ", ".join(f"{name} {format_bytes(package_size(package))}" for name, package in packages.items())
    return [
        f"slice (--num-chunks {NUM_CHUNKS}) and inspect as child processes, median of {repeats}; packages: {sizes}",
        "heap: peak RssAnon; resident: peak VmHWM; both sampled from /proc/<pid>/status",
        *format_table(["package", "version", "command", "time s", "heap", "resident"], rows),
    ]


def targets_table(results: Mapping[Key, Run], package: str, version: str) -> list[str]:
    """Each target for ``package`` and ``version`` against the tiny package and ``cp -r``."""
    copy = results[(package, "-", COPY)].seconds
    rows = []
    for command in ("slice", "inspect"):
        run, tiny = results[(package, version, command)], results[(TINY, version, command)]
        limit = tiny.seconds + (
            SLICE_TIME_COPIES * copy + SLICE_TIME_MARGIN if command == "slice" else INSPECT_TIME_MARGIN
        )
        formula = (
            f"{tiny.seconds:.2f} + {SLICE_TIME_COPIES} x {copy:.2f} + {SLICE_TIME_MARGIN:.0f}"
            if command == "slice"
            else f"{tiny.seconds:.2f} + {INSPECT_TIME_MARGIN:.0f}"
        )
        rows.append(
            [f"{command} time", f"{run.seconds:.2f} s", f"{formula} = {limit:.2f} s", _met(run.seconds <= limit)]
        )
        heap_limit = tiny.heap + HEAP_MARGIN
        rows.append(
            [
                f"{command} heap",
                format_bytes(run.heap),
                f"{format_bytes(tiny.heap)} + {format_bytes(HEAP_MARGIN)} = {format_bytes(heap_limit)}",
                _met(run.heap <= heap_limit),
            ]
        )
    return [f"targets, {package} package, {version}:", *format_table(["target", "measured", "limit", "result"], rows)]


def _met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def package_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4", help="GiB of weights of the packages to build (default 1,4)")
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
        sizes = [int(size) for size in args.sizes.split(",")]
        start = time.perf_counter()
        packages = {TINY: build_package(folder / "tiny.mlpackage", LAYERS_PER_GIB, TINY_HIDDEN)}
        for size in sizes:
            packages[f"{size} GiB"] = build_package(folder / f"{size}gib.mlpackage", LAYERS_PER_GIB * size, HIDDEN)
        print(f"packages ready in {time.perf_counter() - start:.0f} s", end="\n\n", flush=True)
        results = measure_all(packages, versions, folder, args.repeats)
        print("\n".join(results_table(results, packages, args.repeats)), end="\n\n")
        for size in sizes:
            for version in versions:
                print("\n".join(targets_table(results, f"{size} GiB", version.name)), end="\n\n")
            same = weights_identical(versions[-1], packages[f"{size} GiB"], folder / "out.mlpackage")
            print(
                f"{size} GiB, {versions[-1].name}: the output's weight file is the input's byte for byte: {same}",
                end="\n\n",
            )
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
