"""The command's process keeps torch out and notes Ctrl-C while it imports; a library process is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Iterator

import pytest

from sdpa_slicer import _command_process
from sdpa_slicer._command_process import TorchBlocker, started_as_command

COMMAND_STARTS = {
    "the installed script": (["/venv/bin/sdpa-slicer", "inspect"], ["/venv/bin/python", "/venv/bin/sdpa-slicer"]),
    "python -m sdpa_slicer": (["-m"], ["python", "-m", "sdpa_slicer", "--version"]),
    "python -X importtime -m sdpa_slicer": (["-m"], ["python", "-X", "importtime", "-m", "sdpa_slicer"]),
    "python -msdpa_slicer": (["-m"], ["python", "-msdpa_slicer"]),
    "python -m sdpa_slicer._tools.cli": (["-m"], ["python", "-m", "sdpa_slicer._tools.cli"]),
    "python -I -W ignore -Bm sdpa_slicer": (["-m"], ["python", "-I", "-W", "ignore", "-Bm", "sdpa_slicer"]),
    "python -Xdev -m sdpa_slicer": (["-m"], ["python", "-Xdev", "-m", "sdpa_slicer"]),
}
LIBRARY_STARTS = {
    "a script": (["train.py"], ["python", "train.py", "-m", "sdpa_slicer"]),
    "pytest": (["/venv/bin/pytest"], ["/venv/bin/python", "/venv/bin/pytest", "-q"]),
    "python -c": (["-c"], ["python", "-c", "import sdpa_slicer"]),
    "another module": (["-m"], ["python", "-m", "sdpa_slicer_tools"]),
    "an interpreter": ([""], ["python"]),
    "a warning filter naming the module": (["-c"], ["python", "-W", "sdpa_slicer", "-c", "pass"]),
    "a module after the script": (["x.py"], ["python", "-X", "importtime", "x.py", "-m", "sdpa_slicer"]),
}


@pytest.mark.parametrize("start", COMMAND_STARTS)
def test_the_command_is_recognised_however_it_is_started(start: str) -> None:
    assert started_as_command(*COMMAND_STARTS[start])


@pytest.mark.parametrize("start", LIBRARY_STARTS)
def test_a_library_process_is_not_the_command(start: str) -> None:
    assert not started_as_command(*LIBRARY_STARTS[start])


@pytest.mark.parametrize("name", ["torch", "torch.nn", "torchvision", "executorch.exir"])
def test_the_blocker_finds_no_torch(name: str) -> None:
    with pytest.raises(ModuleNotFoundError, match="does not use it"):
        TorchBlocker().find_spec(name, None)


@pytest.mark.parametrize("name", ["numpy", "torchgen_like", "matplotlib.pyplot"])
def test_the_blocker_leaves_other_modules_to_the_other_finders(name: str) -> None:
    assert TorchBlocker().find_spec(name, None) is None


def test_importing_the_library_leaves_torch_importable() -> None:
    code = "import sdpa_slicer, sys; from sdpa_slicer._command_process import TorchBlocker; "
    code += "print(any(isinstance(finder, TorchBlocker) for finder in sys.meta_path))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


@pytest.fixture
def starting_handler() -> Iterator[None]:
    """SIGINT handled as in the command's process while it imports; the usual handler afterwards."""
    signal.signal(signal.SIGINT, _command_process._StartingInterrupts())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.parametrize("interrupt", [False, True], ids=["no Ctrl-C", "Ctrl-C while importing"])
def test_ctrl_c_while_starting_is_noted_then_raises_again(interrupt: bool, starting_handler: None) -> None:
    if interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes
    assert _command_process.interrupted_while_starting() is interrupt
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_command_interrupts_are_left_alone() -> None:
    assert _command_process.interrupted_while_starting() is False
    _command_process.ignore_interrupts_to_the_end()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
