"""Does a figure read? Checks on matplotlib's rendered extents, for tests and for the curious.

:func:`layout_problems` draws a figure and lists, in words, what a reader would stumble on:

- an axes smaller than a set size in pixels (a panel too narrow to show anything);
- two texts on top of each other: tick labels of one axis, point labels, titles, axis labels, the
  suptitle, a legend box, a figure note (every pair of them, across the whole figure);
- a legend box over a plotted point, line vertex or bar;
- a text or legend reaching outside the canvas.

Nothing here changes the figure (it is drawn once, on an Agg canvas when it has none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import Collection, LineCollection
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from matplotlib.transforms import Bbox

MIN_AXES_PX = (120, 90)
_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class _Box:
    kind: str
    text: str
    bbox: Bbox
    group: int  # boxes of one group (e.g. one legend) may touch each other


def _overlap(a: Bbox, b: Bbox, tol: float = _TOLERANCE_PX) -> bool:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width > tol and height > tol


def _short(text: str, most: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= most else text[: most - 1] + "…"


def _drawn_text(text: Text | None) -> bool:
    return text is not None and text.get_visible() and bool(text.get_text().strip())


def _axes_name(fig: Figure, ax: Axes) -> str:
    title = ax.get_title() or ax.get_title("left") or ax.get_title("right")
    index = fig.axes.index(ax)
    return f"axes {index}" + (f" ({_short(title, 40)!r})" if title else "")


def _text_boxes(fig: Figure, renderer) -> list[_Box]:
    boxes: list[_Box] = []
    group = 0

    def add(kind: str, text: Text) -> None:
        nonlocal group
        if _drawn_text(text):
            group += 1
            # Text.get_window_extent: the text alone (an Annotation's own adds its leader line).
            boxes.append(_Box(kind, text.get_text(), Text.get_window_extent(text, renderer), group))

    suptitle = getattr(fig, "_suptitle", None)
    add("suptitle", suptitle)
    for text in fig.texts:
        if text is not suptitle:
            add("figure text", text)
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        name = _axes_name(fig, ax)
        if ax.axison:
            for loc in ("left", "center", "right"):
                title = {"left": ax._left_title, "center": ax.title, "right": ax._right_title}[loc]
                add(f"{name} title", title)
            add(f"{name} x label", ax.xaxis.label)
            add(f"{name} y label", ax.yaxis.label)
            add(f"{name} x offset", ax.xaxis.offsetText)
            add(f"{name} y offset", ax.yaxis.offsetText)
            for axis, letter in ((ax.xaxis, "x"), (ax.yaxis, "y")):
                if not axis.get_visible():
                    continue
                for tick in axis._update_ticks():  # the ticks actually drawn (inside the view)
                    for label in (tick.label1, tick.label2):
                        if tick.get_visible():
                            add(f"{name} {letter} tick label", label)
        for text in ax.texts:
            add(f"{name} label", text)
    legends: list[Legend] = [leg for leg in fig.legends if leg.get_visible()]
    legends += [ax.get_legend() for ax in fig.axes if ax.get_visible() and ax.get_legend() is not None
                and ax.get_legend().get_visible()]
    for legend in legends:
        group += 1
        title = legend.get_title().get_text()
        entries = ", ".join(t.get_text() for t in legend.get_texts()[:3])
        boxes.append(_Box("legend", _short(f"{title}: {entries}" if title else entries),
                          legend.get_window_extent(renderer), group))
    return boxes


def _data_points(ax: Axes, renderer) -> tuple[np.ndarray, list[Bbox]]:
    """Display coordinates of the plotted points and line vertices inside the axes, and the bars."""
    points: list[np.ndarray] = []
    for line in ax.get_lines():
        if line.get_visible() and len(line.get_xydata()):
            points.append(line.get_transform().transform(np.asarray(line.get_xydata(), dtype=float)))
    for coll in ax.collections:
        if not coll.get_visible() or not isinstance(coll, Collection):
            continue
        if isinstance(coll, LineCollection):
            for segment in coll.get_segments():
                if len(segment):
                    points.append(coll.get_transform().transform(np.asarray(segment, dtype=float)))
            continue
        offsets = np.asarray(coll.get_offsets(), dtype=float)
        if offsets.size:
            points.append(coll.get_offset_transform().transform(offsets))
    xy = np.vstack(points) if points else np.empty((0, 2))
    xy = xy[np.isfinite(xy).all(axis=1)]
    inside = ((xy[:, 0] >= ax.bbox.x0) & (xy[:, 0] <= ax.bbox.x1)
              & (xy[:, 1] >= ax.bbox.y0) & (xy[:, 1] <= ax.bbox.y1))
    bars = [p.get_window_extent(renderer) for p in ax.patches
            if isinstance(p, Rectangle) and p.get_visible() and p.get_height() and p.get_width()]
    bars = [Bbox.intersection(b, ax.bbox) for b in bars]
    return xy[inside], [b for b in bars if b is not None]


def layout_problems(fig: Figure, name: str = "figure", *,
                    min_axes_px: tuple[float, float] = MIN_AXES_PX) -> list[str]:
    """What does not read in ``fig``, one sentence per problem naming ``name`` and the texts concerned."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems: list[str] = []

    for ax in fig.axes:
        if ax.get_visible() and ax.axison:
            width, height = ax.bbox.width, ax.bbox.height
            if width < min_axes_px[0] or height < min_axes_px[1]:
                problems.append(f"{name}: {_axes_name(fig, ax)} is {width:.0f}x{height:.0f} px, "
                                f"smaller than {min_axes_px[0]}x{min_axes_px[1]}")

    boxes = _text_boxes(fig, renderer)
    canvas = fig.bbox
    for box in boxes:
        b = box.bbox
        if (b.x0 < canvas.x0 - _TOLERANCE_PX or b.y0 < canvas.y0 - _TOLERANCE_PX
                or b.x1 > canvas.x1 + _TOLERANCE_PX or b.y1 > canvas.y1 + _TOLERANCE_PX):
            problems.append(f"{name}: {box.kind} {_short(box.text)!r} reaches outside the canvas "
                            f"({b.x0:.0f},{b.y0:.0f})-({b.x1:.0f},{b.y1:.0f}) of "
                            f"{canvas.width:.0f}x{canvas.height:.0f} px")

    if boxes:
        corners = np.array([[b.bbox.x0, b.bbox.y0, b.bbox.x1, b.bbox.y1] for b in boxes])
        width = np.minimum(corners[:, None, 2], corners[None, :, 2]) - np.maximum(corners[:, None, 0],
                                                                                  corners[None, :, 0])
        height = np.minimum(corners[:, None, 3], corners[None, :, 3]) - np.maximum(corners[:, None, 1],
                                                                                   corners[None, :, 1])
        clash = (width > _TOLERANCE_PX) & (height > _TOLERANCE_PX)
        for i, j in zip(*np.nonzero(np.triu(clash, k=1))):
            a, b = boxes[i], boxes[j]
            if a.group != b.group:
                problems.append(f"{name}: {a.kind} {_short(a.text)!r} overlaps {b.kind} {_short(b.text)!r}")

    legends = [box for box in boxes if box.kind == "legend"]
    for ax in fig.axes:
        if not ax.get_visible() or not ax.axison:
            continue
        xy, bars = _data_points(ax, renderer)
        for legend in legends:
            lb = legend.bbox
            covered = (
                (xy[:, 0] > lb.x0) & (xy[:, 0] < lb.x1) & (xy[:, 1] > lb.y0) & (xy[:, 1] < lb.y1)).sum()
            hidden_bars = sum(_overlap(lb, bar) for bar in bars)
            if covered or hidden_bars:
                problems.append(f"{name}: legend {legend.text!r} covers {covered} data point(s) and "
                                f"{hidden_bars} bar(s) of {_axes_name(fig, ax)}")
    return problems


def assert_legible(fig: Figure, name: str = "figure", **kwargs) -> None:
    """Raise AssertionError listing every :func:`layout_problems` of ``fig``."""
    problems = layout_problems(fig, name, **kwargs)
    if problems:
        raise AssertionError(f"{len(problems)} layout problem(s):\n" + "\n".join(problems))
