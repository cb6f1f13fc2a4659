"""Record every program ``slice_attention`` rewrites during a test run, to show that a change of
the code's layout changes no emitted program.

As a pytest plugin, it replaces ``sdpa_slicer.slice_attention`` (in every module that holds it)
by a wrapper that writes, after each call, a snapshot of the rewritten program: every op of every
block in order, with its type, name, inputs and output types, and a digest of each constant's
value. Run the suite on two commits and compare::

    export PYTHONPATH=scripts
    OPTIONS="-p program_snapshots --hypothesis-profile=snapshots --hypothesis-seed=0"
    SDPA_SLICER_SNAPSHOTS=/tmp/before.jsonl pytest $OPTIONS     # on one commit
    SDPA_SLICER_SNAPSHOTS=/tmp/after.jsonl pytest $OPTIONS      # on the other
    python scripts/program_snapshots.py /tmp/before.jsonl /tmp/after.jsonl

The comparison matches snapshots by content, not by test name, so tests may move between files;
it prints how many are equal and every one that differs. The demo layer and the grouped-query
package are sliced by the tests, so they are recorded too.

Four things would make equal code give different snapshots, and the plugin removes them:
- the ``ci`` profile seeds each property from its test's source, so a test whose body changed
  would draw other examples: the ``snapshots`` profile (the ``ci`` example count, no
  derandomizing, no example database) with a fixed ``--hypothesis-seed`` draws the same ones;
- coremltools names unnamed ops from one counter per process, so names would depend on the
  tests run before: the counter starts afresh before each test;
- the constants of a program loaded from a package come in an order that changes from run to
  run: a snapshot lists a block's constants by name, then its other ops in order;
- symbolic dims are numbered from one counter per process: a snapshot numbers them by first
  appearance.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import os
import re
import sys
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

SNAPSHOTS_VARIABLE = "SDPA_SLICER_SNAPSHOTS"
SYMBOL = re.compile(r"\bis[0-9]+\b")
TEXT_VARIABLE = "SDPA_SLICER_SNAPSHOT_TEXT"
"""Set, each record also holds the snapshot's text (large), not only its digest."""


def program_snapshot(prog: Any) -> str:
    """The program as text: each function's inputs, then every op in block order, nested blocks
    indented, constants by a digest of their value."""
    if not hasattr(prog, "functions"):
        return f"not a program: {type(prog).__name__}"
    lines = []
    for name, function in prog.functions.items():
        inputs = ", ".join(f"{input_name}: {_type(var)}" for input_name, var in function.inputs.items())
        lines.append(f"function {name} ({inputs})")
        lines += _block_lines(function, 1)
    return _numbered_symbols("\n".join(lines))


def _numbered_symbols(text: str) -> str:
    """``text`` with coremltools' symbols (``is12``) numbered by first appearance: their numbers
    come from one counter per process."""
    numbers: dict[str, str] = {}
    return SYMBOL.sub(lambda match: numbers.setdefault(match.group(0), f"is_{len(numbers)}"), text)


def _block_lines(block: Any, depth: int) -> Iterator[str]:
    indent = "  " * depth
    inputs = block.inputs.values() if isinstance(block.inputs, dict) else block.inputs
    yield f"{indent}block ({', '.join(var.name for var in inputs)})"
    # coremltools' milproto loader places the constants of a loaded program in an order that
    # changes from run to run: constants come first, by name, and then every other op in order.
    ops = list(block.operations)
    for op in sorted((op for op in ops if op.op_type == "const"), key=lambda op: op.name) + [
        op for op in ops if op.op_type != "const"
    ]:
        inputs = ", ".join(f"{key}={_input_text(value)}" for key, value in op.inputs.items())
        outputs = ", ".join(f"{var.name}: {_type(var)}" for var in op.outputs)
        value = f" value={_digest(op.outputs[0].val)}" if op.op_type == "const" else ""
        yield f"{indent}  {outputs} = {op.op_type}({inputs}) name={op.name}{value}"
        for nested in op.blocks:
            yield from _block_lines(nested, depth + 2)
    yield f"{indent}-> ({', '.join(var.name for var in block.outputs)})"


def _input_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(var.name for var in value) + ")"
    return value.name


def _type(var: Any) -> str:
    return str(var.sym_type.__type_info__()) if hasattr(var.sym_type, "__type_info__") else repr(var.sym_type)


def _digest(value: Any) -> str:
    array = np.asarray(value)
    if array.dtype == object:
        return repr(value)
    data = np.ascontiguousarray(array).tobytes()
    return f"{array.dtype.str}{array.shape}:{hashlib.blake2b(data, digest_size=12).hexdigest()}"


settings.register_profile(
    "snapshots",
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: Any) -> None:
    from coremltools.converters.mil.mil import Builder

    Builder.name_count.clear()


def _recording(original: Callable[..., Any], path: str) -> Callable[..., Any]:
    counts: collections.Counter[str] = collections.Counter()

    @functools.wraps(original)
    def slice_attention(prog: Any, *args: Any, **kwargs: Any) -> Any:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        counts[test] += 1
        try:
            result = original(prog, *args, **kwargs)
        except Exception as error:
            outcome = f"raised {type(error).__name__}: {error}"
            raise
        else:
            outcome = "returned"
            return result
        finally:
            with open(path, "a", encoding="utf-8") as out:
                text = program_snapshot(prog)
                digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
                record = {"test": test, "call": counts[test], "outcome": outcome, "program": digest}
                if os.environ.get(TEXT_VARIABLE):
                    record["text"] = text
                out.write(json.dumps(record) + "\n")

    return slice_attention


def pytest_collection_finish(session: Any) -> None:
    """Swap the wrapper in for every reference to ``slice_attention``, once all test modules are imported."""
    path = os.environ.get(SNAPSHOTS_VARIABLE)
    if not path:
        return
    import sdpa_slicer

    original = sdpa_slicer.slice_attention
    wrapper = _recording(original, path)
    for module in list(sys.modules.values()):
        for attribute, value in list(getattr(module, "__dict__", {}).items()):
            if value is original:
                setattr(module, attribute, wrapper)
    print(f"program snapshots of {os.path.dirname(sdpa_slicer.__file__)} go to {path}")


def compare(before_path: str, after_path: str) -> int:
    """Print how the snapshots of two runs compare; 0 when every snapshot of one is in the other."""
    before, after = (_read(path) for path in (before_path, after_path))
    before_counts = collections.Counter(record["program"] + record["outcome"] for record in before)
    after_counts = collections.Counter(record["program"] + record["outcome"] for record in after)
    print(f"{len(before)} snapshots before, {len(after)} after; {sum((before_counts & after_counts).values())} equal")
    only_before, only_after = before_counts - after_counts, after_counts - before_counts
    for label, missing, records in (("only before", only_before, before), ("only after", only_after, after)):
        for record in records:
            key = record["program"] + record["outcome"]
            if missing[key]:
                missing[key] -= 1
                print(f"{label}: {record['test']} call {record['call']} ({record['outcome']})")
    return 0 if not only_before and not only_after else 1


def _read(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as source:
        return [json.loads(line) for line in source]


def main() -> int:
    parser = argparse.ArgumentParser(description="Compare the program snapshots of two test runs.")
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args()
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
