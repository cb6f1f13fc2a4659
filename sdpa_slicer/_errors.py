"""Every error sdpa_slicer raises, and how a bug of its own is worded when it is contained."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdpa_slicer._text import first_line

if TYPE_CHECKING:
    from coremltools.converters.mil.mil import Operation


class EmitError(RuntimeError):
    """The replacement of a site could not be built or swapped in; the site is unchanged."""


class UnsupportedOpError(NotImplementedError):
    """The program holds an op (or an op form) the interpreter has no kernel for."""


class EvaluationError(RuntimeError):
    """A kernel failed, or returned something that contradicts the op's declared type."""


class PackageError(ValueError):
    """A package that cannot be read or written; the message names it."""


class BlobError(ValueError):
    """A weight file that is missing, damaged, or does not hold what the program says."""


class PlotError(Exception):
    """The picture cannot be drawn: matplotlib is not installed, or the file cannot be written."""


class UsageError(ValueError):
    """The command line is wrong: an unknown option, a bad value, options that exclude each other."""


class CoremltoolsInternalsError(RuntimeError):
    """A private part of coremltools that sdpa_slicer relies on is not where it was
    (``_coreml_compat.py``); the message names it and the installed coremltools version."""


def bug_reason(error: BaseException, doing: str, consequence: str = "the site was left as it was") -> str:
    """What a report says when sdpa_slicer itself failed: what, while doing what, with what
    consequence, and how to report it.

    >>> print(bug_reason(KeyError("x"), "while planning"))  # doctest: +NORMALIZE_WHITESPACE
    unexpected KeyError ('x') while planning; the site was left as it was. This is a bug in
    sdpa_slicer: please report it (strict=True, or --strict --debug, shows the traceback)
    """
    return (
        f"unexpected {type(error).__name__} ({first_line(error)}) {doing}; {consequence}. This is a bug in "
        "sdpa_slicer: please report it (strict=True, or --strict --debug, shows the traceback)"
    )


def contained_bug(
    error: Exception, doing: str, strict: bool, consequence: str = "the site was left as it was", where: str = ""
) -> str:
    """The reason a report gives for a bug of sdpa_slicer's own; with ``strict``, ``EmitError``
    raised from it instead (its message led by ``where``)."""
    reason = bug_reason(error, doing, consequence)
    if strict:
        raise EmitError(f"{where}: {reason}" if where else reason) from error
    return reason


def failure_reason(anchor: Operation, error: BaseException) -> str:
    """What a user reads when a site could not be rewritten: the check that failed, or, for an
    unexpected error, that it is a bug and how to see more."""
    where = f"could not rewrite {anchor.op_type} '{anchor.name}'"
    if isinstance(error, EmitError):
        return f"{where}: {error}"
    return f"{where}: {bug_reason(error, 'while building its chunked form')}"
