"""The ``sdpa-slicer`` command as its own process: the same bytes in every run, whatever the hash seed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Union

import sdpa_slicer
from packages import kv_cache_package

REPO = Path(sdpa_slicer.__file__).resolve().parents[1]
HASH_SEEDS = ("0", "1", "2")
TIMEOUT = 180


def command_environment(**extra: str) -> dict[str, str]:
    """The environment of an ``sdpa-slicer`` process that imports this checkout."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_command(*argv: Union[str, Path], env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdpa_slicer", *(str(arg) for arg in argv)],
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
