"""plot_memory: the picture draws each function's timeline before and after, marks the sites,
labels the largest tensors, and is written as PNG or SVG; without matplotlib, one clear error."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from coremltools.converters.mil.mil import Program
from matplotlib.patches import StepPatch
from matplotlib.text import Annotation

from attention_cases import AttentionCase, sdpa_program
from programs import kv_cache_program, nested_attention_program
from sdpa_slicer import MemoryEstimate, PlotError, SliceReport, plot_memory, slice_attention
from sdpa_slicer._tools.demo import grouped_query_layer
from sdpa_slicer._tools.examples import GROUPED_QUERY_CACHE, GROUPED_QUERY_LENGTHS
from sdpa_slicer._tools.plot import (
    MISSING_MATPLOTLIB,
    STAGES,
    UNITS,
    Box,
    _renderer,
    label_boxes,
    memory_figure,
    panels,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report() -> SliceReport:
    """Two functions (prefill, decode) over KV-cache states; prefill chunked, decode not."""
    return slice_attention(kv_cache_program(), num_chunks=4)


def _drawn_bytes(report: SliceReport) -> list[list[float]]:
    """The values of each panel's filled step, in bytes, read back from the figure's artists."""
    figure = memory_figure(report)
    units = dict(UNITS)
    drawn = []
    for row in np.asarray(figure.axes).reshape(-1, len(STAGES)):
        unit = units[row[0].get_ylabel().split()[-1]]
        for ax in row:
            (filled, _) = [patch for patch in ax.patches if isinstance(patch, StepPatch)]
            drawn.append([value * unit for value in filled.get_data().values])
    return drawn


def _estimates(report: SliceReport) -> list[MemoryEstimate]:
    return [estimate for pair in zip(report.memory_before, report.memory_after) for estimate in pair]


def test_each_panel_draws_its_functions_timeline_before_and_after(report: SliceReport) -> None:
    estimates = _estimates(report)
    assert [(panel.function, panel.stage) for panel in panels(report)] == [
        (function, stage) for function in ("prefill", "decode") for stage in STAGES
    ]
    for drawn, estimate in zip(_drawn_bytes(report), estimates, strict=True):
        assert drawn == pytest.approx([point.live_bytes for point in estimate.timeline])
        assert max(drawn) == pytest.approx(estimate.peak_live_bytes)


def test_sites_are_marked_where_their_output_is_made(report: SliceReport) -> None:
    prefill_before, prefill_after = panels(report)[:2]
    (site,) = [site for site in report.sites if site.function == "prefill"]
    before = {point.position: point for point in prefill_before.estimate.timeline}
    after = {point.position: point for point in prefill_after.estimate.timeline}
    ((name, position_before),) = prefill_before.sites
    ((_, position_after),) = prefill_after.sites
    assert name == site.op_name
    assert before[position_before].op_type == "scaled_dot_product_attention"
    assert after[position_after].op_type == "concat" and site.op_name in after[position_after].outputs


def test_a_site_in_a_nested_block_is_marked_at_the_op_holding_it() -> None:
    report = slice_attention(nested_attention_program(), num_chunks=2)
    nested = {
        "in_true": "cond",
        "in_false": "cond",
        "in_loop": "while_loop",
        "depth2": "while_loop",
        "depth3": "while_loop",
    }
    for panel, top in zip(panels(report), ("scaled_dot_product_attention", "concat")):
        marked = {name: panel.estimate.timeline[position].op_type for name, position in panel.sites}
        assert marked == {"top": top, **nested}


def test_the_largest_tensor_of_each_panel_is_labelled_first(report: SliceReport) -> None:
    for panel in panels(report):
        assert panel.labels[0].tensor == panel.estimate.largest_tensor
        op_types = [point.tensor.op_type for point in panel.labels if point.tensor]
        assert len(op_types) == len(set(op_types))


@pytest.mark.parametrize(
    "suffix, is_format",
    [(".png", lambda data: data.startswith(PNG_MAGIC)), (".svg", lambda data: b"<svg" in data[:1000])],
)
def test_the_picture_is_written_in_the_format_of_its_suffix(
    suffix, is_format, report: SliceReport, tmp_path: Path
) -> None:
    path = plot_memory(report, tmp_path / f"memory{suffix}", title="kv cache")
    assert path == tmp_path / f"memory{suffix}"
    assert is_format(path.read_bytes())


def test_another_suffix_is_refused_before_anything_is_drawn(report: SliceReport, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must end in \.png or \.svg, not \.jpg"):
        plot_memory(report, tmp_path / "memory.jpg")
    with pytest.raises(ValueError, match=r"must end in \.png or \.svg: memory has none$"):
        plot_memory(report, tmp_path / "memory")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_or_a_missing_folder_is_refused_before_anything_is_drawn(report: SliceReport, tmp_path: Path) -> None:
    (tmp_path / "memory.png").mkdir()
    with pytest.raises(ValueError, match="it is a folder"):
        plot_memory(report, tmp_path / "memory.png")
    with pytest.raises(ValueError, match=f"the folder {tmp_path / 'no'} does not exist"):
        plot_memory(report, tmp_path / "no" / "memory.png")
    assert [path.name for path in tmp_path.iterdir()] == ["memory.png"]


def test_plot_memory_names_a_wrong_argument(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="expects the SliceReport slice_attention returns, got str"):
        plot_memory("report", tmp_path / "memory.png")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_without_matplotlib_the_error_names_the_extra(
    report: SliceReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(PlotError) as raised:
        plot_memory(report, tmp_path / "memory.png")
    assert str(raised.value) == MISSING_MATPLOTLIB == "drawing memory needs matplotlib: pip install 'sdpa-slicer[plot]'"
    assert list(tmp_path.iterdir()) == []


def test_a_function_without_ops_gets_an_empty_panel(tmp_path: Path) -> None:
    case = AttentionCase(batch=(1, 2), query_length=64, key_length=64, head_dim=8, value_dim=8)
    report = slice_attention(sdpa_program(case))
    empty = MemoryEstimate(function="empty", largest_tensor=None, peak_live_bytes=0, weights_bytes=0)
    with_empty = SliceReport(
        report.sites, memory_before=(*report.memory_before, empty), memory_after=(*report.memory_after, empty)
    )
    assert plot_memory(with_empty, tmp_path / "memory.png").read_bytes().startswith(PNG_MAGIC)
    assert [panel.sites for panel in panels(with_empty)][2:] == [(), ()]


def _grouped_query_report() -> SliceReport:
    prog = Program()
    for name, length in GROUPED_QUERY_LENGTHS.items():
        prog.add_function(name, grouped_query_layer(length, GROUPED_QUERY_CACHE))
    return slice_attention(prog)


LABELLED_REPORTS = {
    "kv cache": lambda: slice_attention(kv_cache_program(), num_chunks=4),
    "nested sites": lambda: slice_attention(nested_attention_program(), num_chunks=2),
    "grouped-query": _grouped_query_report,
}


@pytest.mark.parametrize("build", LABELLED_REPORTS.values(), ids=LABELLED_REPORTS)
def test_labels_overlap_neither_each_other_nor_the_site_names_and_their_lines_do_not_cross(build) -> None:
    figure = memory_figure(build())
    figure.draw_without_rendering()
    renderer = _renderer(figure)
    for ax in figure.axes:
        sites, labels = label_boxes(ax, renderer)
        for index, label in enumerate(labels):
            assert 0 <= label.left and label.right <= 1 and 0 <= label.bottom and label.top <= 1, ax.get_title()
            assert not any(label.overlaps(other) for other in labels[index + 1 :] + sites), ax.get_title()
        lines = [text.arrow_patch.get_path() for text in ax.texts if isinstance(text, Annotation)]
        for first, second in itertools.combinations(lines, 2):
            assert not first.intersects_path(second, filled=False), ax.get_title()


def test_boxes_overlap_only_where_they_share_area() -> None:
    box = Box(0.0, 0.0, 0.5, 0.5)
    assert box.overlaps(Box(0.4, 0.4, 0.6, 0.6))
    assert not box.overlaps(Box(0.5, 0.0, 0.7, 0.5))
    assert not box.overlaps(Box(0.0, 0.6, 0.5, 0.9))
