"""Keep PyTorch out of the ``sdpa-slicer`` command's process.

coremltools imports torch when it is installed (to offer its converter), which costs about
3 seconds and prints a warning about torch's version, on every command. Nothing the command
does needs torch: it reads and writes ML programs, builds MIL with coremltools' builder and
draws with matplotlib. So when this process was started as the command (the ``sdpa-slicer``
script or ``python -m sdpa_slicer``), an import hook installed before coremltools is imported
makes ``import torch`` (and of the packages built on it) fail as if torch were not installed;
coremltools then runs without its torch frontend. A program that imports ``sdpa_slicer`` as a
library is never affected, and neither is a process that imported torch already.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from typing import Optional, Sequence

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


def install() -> None:
    """Block torch in this process if it was started as the command and has not imported torch."""
    if "torch" in sys.modules or not started_as_command(sys.argv, getattr(sys, "orig_argv", ())):
        return
    if not any(isinstance(finder, TorchBlocker) for finder in sys.meta_path):
        sys.meta_path.insert(0, TorchBlocker())
