"""The ``sdpa-slicer`` command as its own process: the same bytes in every run, whatever the hash
seed; torch never imported; Ctrl-C at any moment writes nothing."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Union

import pytest

import sdpa_slicer
from packages import kv_cache_package
from sdpa_slicer import load_package

REPO = Path(sdpa_slicer.__file__).resolve().parents[1]
HASH_SEEDS = ("0", "1", "2")
TIMEOUT = 180
INTERRUPT_AT = tuple(step / 10 for step in range(1, 12))
"""When SIGINT is sent, as shares of an uninterrupted run's time: from the imports to after the end."""
SCRIPT = Path(sys.executable).with_name("sdpa-slicer")
MODULES_FILE_VARIABLE = "SDPA_SLICER_TEST_MODULES_FILE"
LIST_MODULES_AT_EXIT = f"""
import atexit, os, sys

def _write_modules():
    with open(os.environ["{MODULES_FILE_VARIABLE}"], "w") as file:
        file.write("\\n".join(sorted(sys.modules)))

atexit.register(_write_modules)
"""
"""A ``sitecustomize`` that writes the names of the modules the process imported when it exits."""


def command_environment(**extra: str) -> dict[str, str]:
    """The environment of an ``sdpa-slicer`` process that imports this checkout."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def command_line(*argv: Union[str, Path], script: bool = False) -> list[str]:
    """``python -m sdpa_slicer argv`` (or, with ``script``, the installed ``sdpa-slicer argv``)."""
    start = [str(SCRIPT)] if script else [sys.executable, "-m", "sdpa_slicer"]
    return [*start, *(str(arg) for arg in argv)]


def run_command(
    *argv: Union[str, Path], env: Optional[dict[str, str]] = None, script: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command_line(*argv, script=script),
        capture_output=True,
        text=True,
        env=env or command_environment(),
        timeout=TIMEOUT,
    )


def file_hashes(path: Path) -> dict[str, str]:
    """The SHA-256 of every file under ``path``, by relative path."""
    return {
        str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted(path.rglob("*"))
        if file.is_file()
    }


def test_slice_writes_the_same_bytes_in_every_process_and_hash_seed(multi_package: Path, tmp_path: Path) -> None:
    """Found by a user: three runs gave three model specs (protobuf map order, the order the
    loader made constants in and the names it made up all changed from process to process)."""
    stateful = kv_cache_package(tmp_path / "kv.mlpackage", "palettized4")
    for source in (multi_package, stateful):
        hashes = []
        for seed in HASH_SEEDS:
            output = tmp_path / f"{source.stem}-{seed}.mlpackage"
            done = run_command(
                "slice",
                source,
                "-o",
                output,
                "--num-chunks",
                "2",
                "--quiet",
                env=command_environment(PYTHONHASHSEED=seed),
            )
            assert done.returncode == 0, done.stderr
            hashes.append(file_hashes(output))
        assert hashes[0] == hashes[1] == hashes[2], source.name


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch installed")
@pytest.mark.parametrize("script", [False, True], ids=["python -m sdpa_slicer", "sdpa-slicer"])
@pytest.mark.parametrize("command", [("--version",), ("inspect", "PACKAGE")], ids=["--version", "inspect"])
def test_the_command_never_imports_torch_and_prints_no_torch_warning(
    command: tuple[str, ...], script: bool, single_package: Path, tmp_path: Path
) -> None:
    """Found by a user: coremltools imported torch on every command (3 s, and a warning)."""
    if script and not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} is not installed")
    (tmp_path / "sitecustomize.py").write_text(LIST_MODULES_AT_EXIT)
    modules_file = tmp_path / "modules.txt"
    env = command_environment(**{MODULES_FILE_VARIABLE: str(modules_file)})
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    argv = [single_package if argument == "PACKAGE" else argument for argument in command]
    done = run_command(*argv, env=env, script=script)
    assert (done.returncode, done.stderr) == (0, "")
    modules = modules_file.read_text().splitlines()
    assert "coremltools" in modules and "sdpa_slicer._tools.cli" in modules
    assert not [name for name in modules if name.partition(".")[0] == "torch"]


def _default_sigint() -> None:
    """In the child before it starts: SIGINT as a terminal sends it, even where this process was
    started in the background with SIGINT ignored (which the child would inherit)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupted_slice(source: Path, folder: Path, delay: float) -> tuple[subprocess.CompletedProcess[str], float]:
    """``slice source --plot`` into the empty ``folder``, sent SIGINT after ``delay`` seconds;
    the process and how long it ran."""
    argv = command_line("slice", source, "-o", folder / "out.mlpackage", "--plot", folder / "memory.png")
    start = time.perf_counter()
    child = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=command_environment(),
        preexec_fn=_default_sigint,
    )
    try:
        out, err = child.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(argv, child.returncode, out, err), time.perf_counter() - start


def test_ctrl_c_at_any_moment_writes_nothing_or_the_command_completes(single_package: Path, tmp_path: Path) -> None:
    """Found by a user: SIGINT during the imports was swallowed (the command went on and wrote
    its output), a little later it ended in a traceback, and right at the end it exited 130 with
    the package and the picture written."""
    whole = tmp_path / "whole"
    whole.mkdir()
    done, seconds = _interrupted_slice(single_package, whole, TIMEOUT)
    assert done.returncode == 0, done.stderr
    outcomes = []
    for share in INTERRUPT_AT:
        folder = tmp_path / f"at-{share:.1f}"
        folder.mkdir()
        done, _ = _interrupted_slice(single_package, folder, share * seconds)
        if done.returncode == 130:
            assert (done.stderr, done.stdout, os.listdir(folder)) == ("sdpa-slicer: interrupted\n", "", []), share
        else:
            assert (done.returncode, done.stderr) == (0, ""), share
            assert sorted(os.listdir(folder)) == ["memory.png", "out.mlpackage"], share
            assert done.stdout.splitlines()[-1] == f"memory picture: {folder / 'memory.png'}", share
            assert load_package(folder / "out.mlpackage").function_names == ("main",)
        outcomes.append(done.returncode)
    assert 130 in outcomes


def test_a_closed_output_pipe_ends_the_command_quietly() -> None:
    """Found by a user: ``sdpa-slicer demo | head -1`` ended with "unexpected BrokenPipeError"."""
    child = subprocess.Popen(
        command_line("demo"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=command_environment()
    )
    child.stdout.close()  # as head does once it has its line
    err = child.stderr.read()
    assert (child.wait(timeout=TIMEOUT), err) == (141, "")
