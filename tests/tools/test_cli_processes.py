"""The ``sdpa-slicer`` command as its own process: the same bytes in every run, whatever the hash
seed; torch never imported."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Union

import pytest

import sdpa_slicer
from packages import kv_cache_package

REPO = Path(sdpa_slicer.__file__).resolve().parents[1]
HASH_SEEDS = ("0", "1", "2")
TIMEOUT = 180
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


def run_command(
    *argv: Union[str, Path], env: Optional[dict[str, str]] = None, script: bool = False
) -> subprocess.CompletedProcess[str]:
    """``python -m sdpa_slicer argv`` (or, with ``script``, the installed ``sdpa-slicer argv``)."""
    start = [str(SCRIPT)] if script else [sys.executable, "-m", "sdpa_slicer"]
    return subprocess.run(
        [*start, *(str(arg) for arg in argv)],
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
