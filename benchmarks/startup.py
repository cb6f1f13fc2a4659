"""Benchmark: how long the ``sdpa-slicer`` command takes to start with PyTorch installed, against
the same command with torch hidden, measured side by side.

Run with the project and torch installed::

    python benchmarks/startup.py               # best of 5 runs of each command in each setting
    python benchmarks/startup.py --repeats 9

Each command runs as its own process, in three settings, taken in turn so that a change in the
machine's load hits all three alike:

- ``torch hidden``: ``import torch`` fails (a module named ``torch`` that raises
  ``ModuleNotFoundError`` comes first on ``PYTHONPATH``), as on a machine without torch;
- ``torch installed``: the command as shipped, with torch importable;
- ``torch imported``: torch imported first in the command's process, which is what coremltools
  did on every command before the command kept torch out (see ``sdpa_slicer/_command_process.py``).

The target: with torch installed, each command takes at most 0.3 s more than with torch hidden,
prints no torch warning, and does not import torch.
"""

from __future__ import annotations

import sdpa_slicer  # first: it keeps coremltools' import-time warnings quiet

# isort: split
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import attrs
import coremltools as ct
from coremltools.converters.mil import Builder as mb

from machine import machine_description
from sdpa_slicer._text import format_table

CHECKOUT = Path(sdpa_slicer.__file__).resolve().parents[1]

SETTINGS = ("torch hidden", "torch installed", "torch imported")
HIDDEN, INSTALLED, IMPORTED = SETTINGS
TINY = "tiny.mlpackage"
COMMANDS = {"--version": ("--version",), f"inspect {TINY}": ("inspect", TINY)}
REPEATS = 5
LIMIT_SECONDS = 0.3
TORCH_WARNING = "Torch version"
HIDING_MODULE = "raise ModuleNotFoundError(\"No module named 'torch' (hidden by benchmarks/startup.py)\")\n"
RUN_IMPORTED = (
    "import sys, torch; from sdpa_slicer._tools.cli import main; sys.argv[0] = 'sdpa-slicer'; sys.exit(main())"
)
COLUMNS = ("command", *(f"{setting} (s)" for setting in SETTINGS), "installed - hidden", "target", "result")


@attrs.frozen
class Run:
    seconds: float
    stderr: str


def build_tiny_package(path: Path) -> Path:
    """A one-function package with one attention op over (1, 2, 64, 8) fp32 tensors."""
    shape = (1, 2, 64, 8)

    @mb.program(input_specs=[mb.TensorSpec(shape) for _ in "qkv"], opset_version=ct.target.iOS18)
    def prog(q, k, v):
        return mb.scaled_dot_product_attention(query=q, key=k, value=v, name="attention")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
    model.save(str(path))
    return path


def command_line(setting: str, arguments: Sequence[str]) -> list[str]:
    if setting == IMPORTED:
        return [sys.executable, "-c", RUN_IMPORTED, *arguments]
    return [sys.executable, "-m", "sdpa_slicer", *arguments]


def environment(setting: str, hiding_folder: Path, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with this checkout importable, and torch hidden for ``torch hidden``."""
    first = [str(hiding_folder)] if setting == HIDDEN else []
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join([*first, str(CHECKOUT), base.get("PYTHONPATH", "")])
    return env


def run_once(setting: str, arguments: Sequence[str], folder: Path, hiding_folder: Path) -> Run:
    start = time.perf_counter()
    done = subprocess.run(
        command_line(setting, arguments),
        capture_output=True,
        text=True,
        cwd=folder,
        env=environment(setting, hiding_folder, os.environ),
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} ({setting}) failed ({done.returncode}): {done.stderr.strip()}")
    return Run(seconds, done.stderr)


def measure_all(folder: Path, repeats: int) -> dict[tuple[str, str], list[Run]]:
    """Every command in every setting, ``repeats`` times, the settings taken in turn."""
    hiding_folder = folder / "hide-torch"
    hiding_folder.mkdir()
    (hiding_folder / "torch.py").write_text(HIDING_MODULE)
    runs: dict[tuple[str, str], list[Run]] = {(name, setting): [] for name in COMMANDS for setting in SETTINGS}
    for _ in range(repeats):
        for name, arguments in COMMANDS.items():
            for setting in SETTINGS:
                runs[(name, setting)].append(run_once(setting, arguments, folder, hiding_folder))
    return runs


def imports_torch(folder: Path, arguments: Sequence[str]) -> bool:
    """Whether the command as shipped imports torch (``python -X importtime`` lists every import)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sdpa_slicer", *arguments],
        capture_output=True,
        text=True,
        cwd=folder,
        env=environment(INSTALLED, folder, os.environ),
    )
    return any(line.rstrip().endswith("| torch") for line in done.stderr.splitlines())


def verdict(hidden: float, installed: float) -> str:
    """The target, judged on the difference as the table shows it (to a hundredth of a second)."""
    return "met" if round(installed - hidden, 2) <= LIMIT_SECONDS else "NOT MET"


def results_table(best: Mapping[tuple[str, str], float]) -> list[str]:
    """One row per command: the best time in each setting and the target."""
    rows = []
    for name in COMMANDS:
        hidden, installed = best[(name, HIDDEN)], best[(name, INSTALLED)]
        rows.append(
            [
                name,
                *(f"{best[(name, setting)]:.2f}" for setting in SETTINGS),
                f"{installed - hidden:+.2f}",
                f"<= +{LIMIT_SECONDS:.1f}",
                verdict(hidden, installed),
            ]
        )
    return format_table(COLUMNS, rows)


def warnings_table(runs: Mapping[tuple[str, str], list[Run]], imported: Mapping[str, bool]) -> list[str]:
    """Per command, as shipped: how many runs printed coremltools' torch warning, and whether torch was imported."""
    rows = []
    for name in COMMANDS:
        installed = runs[(name, INSTALLED)]
        warned = sum(TORCH_WARNING in run.stderr for run in installed)
        with_torch = sum(TORCH_WARNING in run.stderr for run in runs[(name, IMPORTED)])
        rows.append([name, f"{warned}/{len(installed)}", f"{with_torch}/{len(installed)}", _yes(imported[name])])
    return format_table(("command", "torch warning, installed", "torch warning, imported", "imports torch"), rows)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"runs of each command (default {REPEATS})")
    args = parser.parse_args(argv)
    print("\n".join(machine_description()), end="\n\n")
    with tempfile.TemporaryDirectory() as folder_name:
        folder = Path(folder_name)
        build_tiny_package(folder / TINY)
        runs = measure_all(folder, args.repeats)
        imported = {name: imports_torch(folder, arguments) for name, arguments in COMMANDS.items()}
    best = {key: min(run.seconds for run in key_runs) for key, key_runs in runs.items()}
    print(f"best of {args.repeats} runs, wall time of the whole process:")
    print("\n".join(results_table(best)), end="\n\n")
    print("\n".join(warnings_table(runs, imported)))


if __name__ == "__main__":
    main()
