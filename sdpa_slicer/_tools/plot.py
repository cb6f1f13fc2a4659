"""A picture of the memory estimate: live bytes against op position, before and after slicing.

One row per function, before on the left and after on the right on the same scale. Each panel
draws the estimate's ``timeline`` as it is, marks the attention sites and labels the largest
tensors. Drawing needs matplotlib (the ``plot`` extra); nothing here imports it until a
picture is drawn.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Sequence, Union

import attrs

from sdpa_slicer._errors import PlotError
from sdpa_slicer._memory import MemoryEstimate, TimelinePoint
from sdpa_slicer._rewrite.report import SiteReport, SliceReport
from sdpa_slicer._text import format_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.backend_bases import RendererBase
    from matplotlib.figure import Figure
    from matplotlib.text import Text

SUFFIXES = (".png", ".svg")
"""The picture's format follows the file's suffix."""
MISSING_MATPLOTLIB = "drawing memory needs matplotlib: pip install 'sdpa-slicer[plot]'"
LIVE_LABEL = "live bytes"
SITE_LABEL = "attention site"
LABELLED_TENSORS = 3
"""Tensors labelled per panel: the largest, each made by an op type no label has yet (so the
chunks of one attention, alike, take one label)."""
UNITS = (("B", 1), ("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3))
Stage = Literal["before", "after"]
STAGES: tuple[Stage, Stage] = ("before", "after")
COLORS = {"before": "#c0504d", "after": "#4f81bd"}
SITE_COLOR = "#555555"
LABEL_TOP = 0.95
"""Where the first label's box starts, as a share of the panel's height from the bottom."""
LABEL_MARGIN = 0.03
"""Room between a label and the side of the panel, and between two labels, as a share of the panel."""
LABEL_NUDGE = 0.01
"""How far a label moves down, as a share of the panel's height, while it overlaps another."""
HEADROOM = 1.6
"""The y axis reaches this times the row's highest peak, leaving room for the labels."""
PANEL_SIZE = (6.0, 3.2)
"""Inches per panel: width, height."""


@attrs.frozen
class Panel:
    """What one panel draws: a function's estimate at one stage, its sites' positions and labels."""

    function: str
    stage: Stage
    """``"before"`` or ``"after"`` slicing."""
    estimate: MemoryEstimate
    sites: tuple[tuple[str, int], ...]
    """Each attention site found in the timeline: its name, and the position of the op producing its
    output (or holding the block it is in)."""
    labels: tuple[TimelinePoint, ...]
    """The points of the ops producing the largest tensors (see ``LABELLED_TENSORS``)."""


def panels(report: SliceReport) -> tuple[Panel, ...]:
    """The panels of ``report``'s picture, function by function, before then after."""
    result = []
    for before, after in zip(report.memory_before, report.memory_after):
        sites = [site for site in report.sites if site.function == before.function]
        for stage, estimate in zip(STAGES, (before, after)):
            result.append(Panel(before.function, stage, estimate, _site_marks(estimate, sites), _labels(estimate)))
    return tuple(result)


def check_path(path: Union[str, os.PathLike[str]]) -> Path:
    """``path`` as a ``Path`` when a picture can be drawn to it: ``ValueError`` when its suffix
    is neither ``.png`` nor ``.svg``, when it is a folder or its folder does not exist,
    ``PlotError`` when matplotlib is missing."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        found = f", not {path.suffix}" if path.suffix else f": {path.name} has none"
        raise ValueError(f"the file name must end in {' or '.join(SUFFIXES)}{found}")
    if path.is_dir():
        raise ValueError("it is a folder; name a file in it")
    if not path.parent.is_dir():
        raise ValueError(f"the folder {path.parent} does not exist")
    _figure_class()
    return path


def plot_memory(report: SliceReport, path: Union[str, os.PathLike[str]], *, title: Optional[str] = None) -> Path:
    """Draw ``report``'s memory estimates to ``path`` (PNG or SVG, by its suffix) and return it.

    Each function gets a row: live bytes against op position before slicing (left) and after
    (right), on one scale, the attention sites marked and the largest tensors labelled.
    """
    if not isinstance(report, SliceReport):
        raise TypeError(f"plot_memory expects the SliceReport slice_attention returns, got {type(report).__name__}")
    path = check_path(path)
    figure = memory_figure(report, title=title)
    try:
        figure.savefig(path)
    except OSError as error:
        raise PlotError(f"cannot write {path}: {error.strerror or error}") from error
    return path


def memory_figure(report: SliceReport, *, title: Optional[str] = None) -> Figure:
    """The picture ``plot_memory`` saves, as a matplotlib ``Figure`` (no pyplot, no global state)."""
    figure_class = _figure_class()
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    drawn = panels(report)
    rows = max(1, len(drawn) // len(STAGES))
    unit_name, unit = _unit(max((panel.estimate.peak_live_bytes for panel in drawn), default=0))
    figure = figure_class(figsize=(PANEL_SIZE[0] * len(STAGES), PANEL_SIZE[1] * rows + 0.8), layout="constrained")
    figure.suptitle(title or "live bytes by op position (static estimate)")
    axes = figure.subplots(rows, len(STAGES), sharey="row", squeeze=False)
    for panel, ax in zip(drawn, axes.flat):
        _draw(ax, panel, unit)
        ax.set_ylabel(f"live {unit_name}" if panel.stage == STAGES[0] else "")
    for row, ax in zip(range(0, len(drawn), len(STAGES)), axes[:, 0]):
        top = max(panel.estimate.peak_live_bytes for panel in drawn[row : row + len(STAGES)]) / unit
        ax.set_ylim(0, HEADROOM * top or 1)
    for ax in axes.flat[len(drawn) :]:
        ax.set_axis_off()
    handles: list[Artist] = [Patch(color=COLORS[stage], alpha=0.6, label=f"{LIVE_LABEL}, {stage}") for stage in STAGES]
    handles.append(Line2D([], [], color=SITE_COLOR, linestyle=":", label=SITE_LABEL))
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    renderer = _renderer(figure)  # last: the labels are placed in the final layout
    for ax in axes.flat[: len(drawn)]:
        _place_labels(ax, renderer)
    return figure


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(MISSING_MATPLOTLIB) from None
    return Figure


def _draw(ax: Axes, panel: Panel, unit: int) -> None:
    """One panel: live bytes as a step per op (op ``i`` spans ``i - 0.5`` to ``i + 0.5``)."""
    from matplotlib.ticker import MaxNLocator

    timeline = panel.estimate.timeline
    ax.set_title(f"{panel.function}, {panel.stage}: peak {format_bytes(panel.estimate.peak_live_bytes)}", fontsize=10)
    ax.set_xlabel("op position")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not timeline:
        ax.text(0.5, 0.5, "no ops", ha="center", va="center", transform=ax.transAxes)
        return
    edges = [point.position - 0.5 for point in timeline] + [timeline[-1].position + 0.5]
    live = [point.live_bytes / unit for point in timeline]
    ax.stairs(live, edges, fill=True, color=COLORS[panel.stage], alpha=0.35)
    ax.stairs(live, edges, color=COLORS[panel.stage], linewidth=1)
    for name, position in panel.sites:
        ax.axvline(position, color=SITE_COLOR, linestyle=":", linewidth=1)
        site_label = ax.text(
            position,
            0.98,
            f"{name} ",
            transform=ax.get_xaxis_transform(),
            rotation=90,
            fontsize=6,
            ha="right",
            va="top",
        )
        site_label.set_gid(SITE_LABEL)
    for point in panel.labels:
        assert point.tensor is not None
        # Placed by _place_labels once the figure is laid out and the boxes can be measured.
        label = ax.annotate(
            f"{point.tensor.name}\n{format_bytes(point.tensor.bytes)}, {point.tensor.op_type}",
            xy=(point.position, point.live_bytes / unit),
            xytext=(0.5, LABEL_TOP),
            textcoords="axes fraction",
            va="top",
            fontsize=7,
            arrowprops={"arrowstyle": "-", "color": SITE_COLOR, "linewidth": 0.5},
        )
        label.set_in_layout(False)
    ax.set_xlim(edges[0], edges[-1])


@attrs.frozen
class Box:
    """A rectangle in a panel's axes fraction (0 to 1 across and up)."""

    left: float
    bottom: float
    right: float
    top: float

    def overlaps(self, other: Box) -> bool:
        return (
            self.left < other.right and other.left < self.right and self.bottom < other.top and other.bottom < self.top
        )

    @property
    def middle(self) -> tuple[float, float]:
        return (self.left + self.right) / 2, (self.bottom + self.top) / 2


def label_boxes(ax: Axes, renderer: RendererBase) -> tuple[list[Box], list[Box]]:
    """The boxes of a panel's site names and of its tensor labels (their text, not their line)."""
    from matplotlib.text import Annotation

    sites = [_box(ax, text, renderer) for text in ax.texts if text.get_gid() == SITE_LABEL]
    labels = [_box(ax, text, renderer) for text in ax.texts if isinstance(text, Annotation)]
    return sites, labels


def _box(ax: Axes, text: Text, renderer: RendererBase) -> Box:
    from matplotlib.text import Text

    extent = Text.get_window_extent(text, renderer).transformed(ax.transAxes.inverted())
    return Box(extent.x0, extent.y0, extent.x1, extent.y1)


def _renderer(figure: Figure) -> RendererBase:
    """A renderer for ``figure``, its layout done, to measure text with."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    figure.draw_without_rendering()
    return canvas.get_renderer()


def _place_labels(ax: Axes, renderer: RendererBase) -> None:
    """Put a panel's tensor labels in one column at the top, on the side and in the order whose
    leader lines cross the fewest times, each as high as it goes without overlapping a site's
    name or another label; the side away from the labelled tensors first."""
    from matplotlib.text import Annotation

    labels = [text for text in ax.texts if isinstance(text, Annotation)]
    if not labels:
        return
    sites, boxes = label_boxes(ax, renderer)
    sizes = [(box.right - box.left, box.top - box.bottom) for box in boxes]
    targets = [tuple(ax.transAxes.inverted().transform(ax.transData.transform(label.xy))) for label in labels]
    away_left = sum(x for x, _ in targets) / len(targets) > 0.5
    best: Optional[tuple[tuple[int, int, int], bool, list[Box]]] = None
    orders = list(itertools.permutations(range(len(labels))))
    for side_rank, on_left in enumerate((away_left, not away_left)):
        for order_rank, order in enumerate(orders):
            placed = _stack(order, sizes, on_left, sites)
            if placed is None:
                continue
            lines = [(box.middle, target) for box, target in zip(placed, targets)]
            crossings = sum(_cross(*first, *second) for first, second in itertools.combinations(lines, 2))
            score = (crossings, side_rank, order_rank)
            if best is None or score < best[0]:
                best = (score, on_left, placed)
    if best is None:
        return  # no room for all of them anywhere: left where they are
    _, on_left, placed = best
    for label, box in zip(labels, placed):
        label.set_horizontalalignment("left" if on_left else "right")
        label.set_position((box.left if on_left else box.right, box.top))


def _stack(
    order: Sequence[int], sizes: Sequence[tuple[float, float]], on_left: bool, fixed: Sequence[Box]
) -> Optional[list[Box]]:
    """Boxes of ``sizes`` stacked from the top in ``order`` on one side, each moved down past what
    it overlaps; ``None`` when one would leave the panel."""
    placed: dict[int, Box] = {}
    top = LABEL_TOP
    for index in order:
        width, height = sizes[index]
        left = LABEL_MARGIN if on_left else 1 - LABEL_MARGIN - width
        box = Box(left, top - height, left + width, top)
        while any(box.overlaps(other) for other in (*fixed, *placed.values())):
            box = Box(box.left, box.bottom - LABEL_NUDGE, box.right, box.top - LABEL_NUDGE)
            if box.bottom < 0:
                return None
        placed[index] = box
        top = box.bottom - LABEL_MARGIN
    return [placed[index] for index in range(len(sizes))]


def _cross(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float], d: tuple[float, float]) -> bool:
    """Whether the segments ``a-b`` and ``c-d`` cross."""

    def side(p: tuple[float, float], q: tuple[float, float], r: tuple[float, float]) -> float:
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    return side(a, b, c) * side(a, b, d) < 0 and side(c, d, a) * side(c, d, b) < 0


def _site_marks(estimate: MemoryEstimate, sites: Sequence[SiteReport]) -> tuple[tuple[str, int], ...]:
    """Where each site's output is made: the op named like the site (as before slicing), or the
    op producing the var of that name (the rewritten site's output keeps it), or the op whose
    nested blocks hold it."""
    found = []
    for site in sites:
        for point in estimate.timeline:
            if point.op_name == site.op_name or site.op_name in point.outputs:
                found.append((site.op_name, point.position))
                break
    return tuple(found)


def _labels(estimate: MemoryEstimate) -> tuple[TimelinePoint, ...]:
    labels: list[TimelinePoint] = []
    for point in sorted(estimate.timeline, key=lambda point: -point.tensor.bytes if point.tensor else 0):
        if point.tensor is None or len(labels) == LABELLED_TENSORS:
            break
        if all(point.tensor.op_type != labelled.tensor.op_type for labelled in labels if labelled.tensor):
            labels.append(point)
    return tuple(labels)


def _unit(largest: int) -> tuple[str, int]:
    """The largest unit in which ``largest`` bytes is at least 1."""
    return max((unit for unit in UNITS if unit[1] <= max(largest, 1)), key=lambda unit: unit[1])
