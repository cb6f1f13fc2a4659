"""The docs show what the code does: every ``$ sdpa-slicer ...`` example in the README and in
``docs/`` runs and prints what the page shows, and the tables of options, fields and columns
list what the code has. (The Python examples are doctests: pytest runs every page with
``--doctest-glob``.)"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import functools
import importlib
import inspect
import io
import os
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import attrs
import pytest

import sdpa_slicer
from sdpa_slicer import MemoryEstimate, SiteReport, SliceConfig
from sdpa_slicer._mlpackage.package import package_size
from sdpa_slicer._text import format_bytes
from sdpa_slicer._tools.cli import OFF_SWITCHES, TEXT_OPTIONS, main
from sdpa_slicer._tools.examples import EXAMPLES as EXAMPLE_PACKAGES

REPO = Path(__file__).resolve().parents[1]
PAGES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
FENCE = "```"
PROMPT = "$ "
COMMAND = "sdpa-slicer"
ANY_LINES = "..."
"""A line of only this, in an example's output, stands for any lines (none included)."""
OUTPUT_FLAGS = ("-o", "--output", "--plot")
NAME = re.compile(r"`([^`]+)`")
DOCTEST_LINE = re.compile(r"^(?:>>>|\.\.\.) ?(.*)$")
IMPORT = re.compile(r"^>>> (?:import|from) (coremltools|sdpa_slicer)\b", re.MULTILINE)
MISSING_RUNTIME = "Failed to load"


@functools.lru_cache(maxsize=None)
def _examples_folder() -> Path:
    """A folder where ``sdpa-slicer examples`` wrote the packages docs/cli.md reads, once per process."""
    folder = Path(tempfile.mkdtemp(prefix="sdpa-slicer-examples-")) / "examples"
    atexit.register(shutil.rmtree, folder.parent, True)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["examples", str(folder)]) == 0
    assert printed.getvalue().splitlines() == [
        f"wrote {folder / name} ({format_bytes(package_size(folder / name))})" for name in EXAMPLE_PACKAGES
    ]
    return folder


def _written_by_the_examples_command(path: Path, name: str) -> Path:
    shutil.copytree(_examples_folder() / name, path)
    return path


def _llama(path: Path, variant: str) -> Path:
    """The recipe's two-function model, as ``docs/llm_recipe.py`` writes it with int8 weights, or
    (``w8a8``) with its activations quantized too, built from the script's parts (needs PyTorch)."""
    pytest.importorskip("torch", reason="PyTorch is needed to export the Llama-style model of llm-recipe.md")
    from llama_kv import run_recipe, save_prefill_decode, w8a8

    recipe = run_recipe()
    if variant == "w8a8":
        return save_prefill_decode(recipe.parts(), path, w8a8)
    shutil.copytree(recipe.folder / path.name, path)
    return path


def _sam_vision(path: Path) -> Path:
    """SAM's image encoder of memory.md (needs PyTorch and transformers)."""
    pytest.importorskip("torch", reason="PyTorch is needed to convert the SAM encoder of memory.md")
    pytest.importorskip("transformers", reason="transformers is needed for the SAM encoder of memory.md")
    import torch_converters  # noqa: F401  (registers the converters the model needs)
    from vision_models import sam_vision_package

    return sam_vision_package(path)


PACKAGES: Mapping[str, Callable[[Path], Path]] = {
    **{name: functools.partial(_written_by_the_examples_command, name=name) for name in EXAMPLE_PACKAGES},
    "llama-int8.mlpackage": functools.partial(_llama, variant="int8"),
    "llama-w8a8.mlpackage": functools.partial(_llama, variant="w8a8"),
    "sam-vision.mlpackage": _sam_vision,
}
"""The packages the examples read, by the names the pages give them: how to build each."""


@attrs.frozen
class Example:
    """One command of a console block, and the output the page shows for it."""

    page: str
    line: int
    argv: tuple[str, ...]
    output: tuple[str, ...]

    @property
    def inputs(self) -> tuple[str, ...]:
        """The packages it reads: ``.mlpackage`` arguments that are not the value of an output flag."""
        return tuple(
            arg
            for previous, arg in zip(("",) + self.argv, self.argv)
            if arg.endswith(".mlpackage") and previous not in OUTPUT_FLAGS
        )

    def matches(self, printed: str) -> bool:
        pattern = "".join(
            r"(?:[^\n]*\n)*?" if line.strip() == ANY_LINES else re.escape(line.rstrip()) + r"\n" for line in self.output
        )
        text = "".join(line.rstrip() + "\n" for line in printed.splitlines())
        return re.fullmatch(pattern, text) is not None


def console_examples(page: Path) -> list[Example]:
    """The commands of every fenced block of ``page`` that holds a ``$ sdpa-slicer`` line, in order."""
    examples: list[Example] = []
    block: list[tuple[int, str]] = []
    inside = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith(FENCE):
            if inside:
                examples += _block_examples(page.name, block)
            inside, block = not inside, []
        elif inside:
            block.append((number, line))
    return examples


def _block_examples(page: str, block: list[tuple[int, str]]) -> list[Example]:
    if not any(line.startswith(f"{PROMPT}{COMMAND} ") for _, line in block):
        return []
    commands: list[tuple[int, list[str], list[str]]] = []
    for number, line in block:
        if line.startswith(PROMPT):
            program, *argv = shlex.split(line[len(PROMPT) :])
            assert program == COMMAND, f"{page}:{number}: only {COMMAND} commands can be checked, not {program}"
            commands.append((number, argv, []))
        else:
            assert commands, f"{page}:{number}: output before the first command"
            commands[-1][2].append(line)
    return [Example(page, number, tuple(argv), tuple(output)) for number, argv, output in commands]


EXAMPLES = {page.name: console_examples(page) for page in PAGES}
PAGES_WITH_EXAMPLES = sorted(name for name, examples in EXAMPLES.items() if examples)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Build a package of ``PACKAGES`` by name, once per session."""
    cache: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in cache:
            cache[name] = PACKAGES[name](tmp_path_factory.mktemp("docs") / name)
        return cache[name]

    return build


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # converting llm-recipe.md's model
def test_every_console_example_prints_what_the_page_shows(
    page: str,
    built: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The page's commands run in order in one folder holding the packages they read; each
    prints (stdout, then stderr) what the page shows."""
    examples = EXAMPLES[page]
    written = set()
    for example in examples:
        for name in example.inputs:
            assert name in PACKAGES or name in written, f"{page}:{example.line}: no test builds {name}"
            if name in PACKAGES and not (tmp_path / name).exists():
                shutil.copytree(built(name), tmp_path / name)
        written |= {arg for arg in example.argv if arg.endswith(".mlpackage")}
    monkeypatch.chdir(tmp_path)
    for example in examples:
        main(list(example.argv))
        captured = capsys.readouterr()
        printed = captured.out + captured.err
        diff = "\n".join(difflib.unified_diff(example.output, printed.splitlines(), "page", "printed", lineterm=""))
        assert example.matches(printed), f"{page}:{example.line}: $ {COMMAND} {shlex.join(example.argv)}\n{diff}"


def test_any_lines_stand_for_none_or_many() -> None:
    example = Example("page.md", 1, (), ("first", "...", "last"))
    assert example.matches("first\nlast\n")
    assert example.matches("first\n  a\n  b\nlast\n")
    assert not example.matches("first\nlast\nmore\n")
    assert not example.matches("second\nlast\n")


def _table(page: str, after: str) -> list[list[str]]:
    """The rows (cells without the bars) of the first table from the line holding ``after`` on."""
    lines = (REPO / page).read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if after in line)
    rows: list[list[str]] = []
    for line in lines[start:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # below the header and its rule


def _names(rows: list[list[str]], column: int = 0) -> list[str]:
    return [name for row in rows for name in NAME.findall(row[column])]


def _fields(cls: type) -> list[str]:
    return [field.name for field in attrs.fields(cls)]


def test_the_slice_config_table_has_every_field_and_its_default() -> None:
    rows = _table("docs/api.md", "## `SliceConfig`")
    assert _names(rows) == _fields(SliceConfig)
    defaults = {NAME.findall(row[0])[0]: row[1] for row in rows}
    parsed = SliceConfig.from_text_options(defaults)
    assert parsed == SliceConfig(), "a default in the table is not the field's"


def test_the_options_table_has_every_slicing_flag() -> None:
    flags = [name.split()[0] for name in _names(_table("docs/cli.md", "Slicing options (all commands)"))]
    assert set(flags) == {"--" + name.replace("_", "-") for name in TEXT_OPTIONS} | set(OFF_SWITCHES) | {"--strict"}


@pytest.mark.parametrize(
    "page, after, fields",
    [
        ("docs/api.md", "| `SiteReport` field |", _fields(SiteReport)),
        ("docs/cli.md", "Each site:", _fields(SiteReport)),
        ("docs/cli.md", "Each memory estimate:", [name for name in _fields(MemoryEstimate) if name != "timeline"]),
        ("docs/memory.md", "`MemoryEstimate` fields:", [*_fields(MemoryEstimate), "largest_tensor_bytes"]),
    ],
    ids=["api SiteReport", "cli site", "cli memory", "memory MemoryEstimate"],
)
def test_a_field_table_lists_every_field(page: str, after: str, fields: list[str]) -> None:
    assert sorted(_names(_table(page, after))) == sorted(fields)


def test_the_json_table_lists_every_key_of_the_document(
    built: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(built("model.mlpackage")), "--json"]) == 0
    document = capsys.readouterr().out
    keys = re.findall(r'^  "(\w+)":', document, re.MULTILINE)
    assert sorted(_names(_table("docs/cli.md", "every command prints one JSON object"))) == sorted(keys)


def test_every_class_the_api_page_names_is_importable_from_the_package() -> None:
    """api.md says everything public is importable from ``sdpa_slicer``; found in review:
    ``NearMissReport`` was not."""
    defined = {
        name
        for module in pkgutil.walk_packages(sdpa_slicer.__path__, prefix="sdpa_slicer.")
        if module.name != "sdpa_slicer.__main__"
        for name, value in vars(importlib.import_module(module.name)).items()
        if inspect.isclass(value) and value.__module__.startswith("sdpa_slicer")
    }
    named = set(re.findall(r"`([A-Z]\w+)`", (REPO / "docs/api.md").read_text())) & defined
    assert {"SliceConfig", "NearMissReport"} <= named
    assert sorted(name for name in named if name not in sdpa_slicer.__all__) == []


def test_the_pages_hold_examples_of_every_command() -> None:
    commands = {example.argv[0] for examples in EXAMPLES.values() for example in examples if example.argv}
    assert {"slice", "inspect", "demo"} <= commands


@pytest.mark.parametrize("page", [page.name for page in PAGES if IMPORT.search(page.read_text())])
def test_python_examples_import_sdpa_slicer_before_coremltools(page: str) -> None:
    """So that, copied into a script on Linux, they do not print coremltools' runtime warnings."""
    first = IMPORT.search(next(path for path in PAGES if path.name == page).read_text())
    assert first is not None and first.group(1) == "sdpa_slicer"


def test_the_readme_example_prints_nothing_from_coremltools_on_stderr() -> None:
    """The README's Python example, run as a script (no test settings), prints its report and
    none of coremltools' "Failed to load" lines."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("```python") :].split(FENCE)[1]
    source = "\n".join(match.group(1) for line in block.splitlines() if (match := DOCTEST_LINE.match(line)))
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST")}
    done = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "1 attention site(s) rewritten" in done.stdout
    assert MISSING_RUNTIME not in done.stderr
