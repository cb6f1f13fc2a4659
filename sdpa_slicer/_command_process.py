"""What the ``sdpa-slicer`` command's process sets up before anything else is imported.

**Torch is kept out.** coremltools imports torch when it is installed (to offer its
converter), which costs about 3 seconds and prints a warning about torch's version, on every
command. Nothing the command does needs torch: it reads and writes ML programs, builds MIL with
coremltools' builder and draws with matplotlib. So when this process was started as the
command (the ``sdpa-slicer`` script or ``python -m sdpa_slicer``), an import hook installed
before coremltools is imported makes ``import torch`` (and of the packages built on it) fail as
if torch were not installed; coremltools then runs without its torch frontend.

**Ctrl-C waits for the imports.** coremltools imports optional packages inside bare
``except:`` clauses, which swallowed a ``KeyboardInterrupt`` (the command ran on and wrote its
output), and one raised elsewhere in an import ended in a traceback. So SIGINT is only noted
while modules are imported; the command's ``main`` then asks ``interrupted_while_starting`` and
stops, and from there on SIGINT raises ``KeyboardInterrupt`` as usual. Once the command starts
to put its outputs in place (``ignore_interrupts_to_the_end``), SIGINT is ignored to the end, so that an
interrupted command has written nothing and a command that wrote its outputs exits 0.

A program that imports ``sdpa_slicer`` as a library is never affected, and neither is a process
that imported torch already.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import sys
from typing import Any, Optional, Sequence

COMMAND_NAMES = ("sdpa-slicer", "sdpa-slicer.exe", "sdpa-slicer-script.py")
"""How the installed command's script can be named (``sys.argv[0]``'s last part)."""
COMMAND_MODULES = ("sdpa_slicer", "sdpa_slicer._tools.cli")
"""The modules ``python -m`` runs as the command."""
BLOCKED = ("torch", "torchvision", "torchaudio", "torchao", "executorch")
"""torch and the packages coremltools looks for that import it."""


class TorchBlocker(importlib.abc.MetaPathFinder):
    """Finds no module of ``BLOCKED``: importing one raises ``ModuleNotFoundError``."""

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: object = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (the sdpa-slicer command does not use it)")
        return None


def started_as_command(argv: Sequence[str], orig_argv: Sequence[str]) -> bool:
    """Whether the process runs the ``sdpa-slicer`` script or ``python -m sdpa_slicer``."""
    if argv and os.path.basename(argv[0]) in COMMAND_NAMES:
        return True
    return _module_run(orig_argv[1:]) in COMMAND_MODULES


def _module_run(options: Sequence[str]) -> Optional[str]:
    """The module that the interpreter options ``options`` run with ``-m``, if any. They end at the
    script, ``-c`` or ``-m``; ``-X``, ``-W`` and ``--check-hash-based-pycs`` take the next word."""
    rest = list(options)
    while rest:
        word = rest.pop(0)
        if word == "--check-hash-based-pycs":
            rest = rest[1:]
        elif word == "-" or not word.startswith("-") or word.startswith("--"):
            return None
        else:
            for index, letter in enumerate(word[1:], start=2):
                if letter in "cmXW":
                    value = word[index:] or (rest.pop(0) if rest else "")
                    if letter == "m":
                        return value
                    if letter == "c":
                        return None
                    break
    return None


class _StartingInterrupts:
    """The SIGINT handler while the command's modules are imported: it only notes the signal."""

    def __init__(self) -> None:
        self.interrupted = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.interrupted = True


_COMMAND = [False]
"""Whether this process was set up as the command."""


def install() -> None:
    """If this process was started as the command: block torch (unless it is imported already) and
    note SIGINT instead of raising it until ``interrupted_while_starting``."""
    if not started_as_command(sys.argv, getattr(sys, "orig_argv", ())):
        return
    _COMMAND[0] = True
    if "torch" not in sys.modules and not any(isinstance(finder, TorchBlocker) for finder in sys.meta_path):
        sys.meta_path.insert(0, TorchBlocker())
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _StartingInterrupts())


def interrupted_while_starting() -> bool:
    """Whether SIGINT came while the command's modules were imported; from now on it raises
    ``KeyboardInterrupt``. Always False in a process that is not the command."""
    handler = signal.getsignal(signal.SIGINT)
    if not isinstance(handler, _StartingInterrupts):
        return False
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return handler.interrupted


def ignore_interrupts_to_the_end() -> None:
    """In the command's process, ignore SIGINT from here to the end: the command puts its outputs
    in place now, or has stopped. A signal already on its way is raised here or dropped."""
    if _COMMAND[0]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
