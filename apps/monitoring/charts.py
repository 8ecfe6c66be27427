"""Small server-rendered SVG charts for the operations dashboard.

No JavaScript and nothing fetched from elsewhere: the page works offline, behind strict CSPs and in
e-mailed screenshots. Every chart is an <svg role="img"> with a <title> and its numbers in <title>
tooltips, so the figures stay readable to screen readers and tests.
"""
from __future__ import annotations

import math
from typing import Sequence

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import gettext

PALETTE = ["#417690", "#e08e0b", "#5b9a68", "#c0392b", "#8e44ad", "#7f8c8d"]
_FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" font-size="11"'


def nice_max(value: float) -> float:
    """A round axis maximum at or above `value` (1, 2, 2.5, 5 x 10^n)."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        candidate = step * 10 ** exponent
        if candidate >= value:
            return float(candidate)
    return float(10 ** (exponent + 1))


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:.1f}k".replace(".0k", "k")
    if value == int(value):
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _frame(width: int, height: int, title: str, body: list[str]) -> SafeString:
    return mark_safe(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {width} {height}" '
        f'width="100%" preserveAspectRatio="xMidYMid meet" aria-label="{escape(title)}" {_FONT}>'
        f"<title>{escape(title)}</title>" + "".join(body) + "</svg>"
    )


def _empty(width: int, height: int, title: str, message: str | None = None) -> SafeString:
    message = gettext("No data in this period") if message is None else message
    return _frame(width, height, title, [
        f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" fill="#fafafa" stroke="#ddd"/>',
        f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#888" class="empty">{escape(message)}</text>',
    ])


def _axes(width: int, height: int, left: int, bottom: int, top: int, y_max: float, unit: str) -> list[str]:
    parts = []
    plot_h = height - top - bottom
    for i in range(5):
        value = y_max * i / 4
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{left}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#666">{_fmt(value)}{escape(unit)}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#999"/>')
    return parts


def _x_labels(labels: Sequence[str], xs: Sequence[float], y: float, max_labels: int = 10) -> list[str]:
    step = max(1, math.ceil(len(labels) / max_labels))
    return [f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="middle" fill="#666">{escape(label)}</text>'
            for i, (label, x) in enumerate(zip(labels, xs)) if i % step == 0 or i == len(labels) - 1]


def _legend(series: Sequence[tuple[str, str]], x: float, y: float) -> list[str]:
    parts, offset = [], 0.0
    for name, color in series:
        parts.append(f'<rect x="{x + offset:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x + offset + 14:.1f}" y="{y:.1f}" fill="#333">{escape(name)}</text>')
        offset += 24 + 7 * len(name)
    return parts


def stacked_bar_chart(labels: Sequence[str], series: Sequence[tuple[str, str, Sequence[float]]], *, title: str,
                      unit: str = "", width: int = 640, height: int = 220) -> SafeString:
    """Bars per label, one stacked segment per series (name, colour, values). One series = plain bars."""
    totals = [sum(values[i] for _, _, values in series) for i in range(len(labels))]
    if not labels or not any(totals):
        return _empty(width, height, title)
    left, bottom, top = 48, 24, 22
    plot_w, plot_h = width - left - 8, height - top - bottom
    y_max = nice_max(max(totals))
    slot = plot_w / len(labels)
    bar_w = max(2.0, slot * 0.7)
    parts = _axes(width, height, left, bottom, top, y_max, unit)
    xs = []
    for i, label in enumerate(labels):
        x = left + slot * i + (slot - bar_w) / 2
        xs.append(x + bar_w / 2)
        y = top + plot_h
        for name, color, values in series:
            value = values[i]
            if value <= 0:
                continue
            h = plot_h * value / y_max
            y -= h
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="{color}">'
                         f"<title>{escape(label)} {escape(name)}: {_fmt(value)}{escape(unit)}</title></rect>")
    parts += _x_labels(labels, xs, height - 8)
    if len(series) > 1:
        parts += _legend([(n, c) for n, c, _ in series], left, 13)
    return _frame(width, height, title, parts)


def bar_chart(labels: Sequence[str], values: Sequence[float], *, title: str, name: str = "", unit: str = "",
              color: str = PALETTE[0], width: int = 640, height: int = 220) -> SafeString:
    return stacked_bar_chart(labels, [(name or title, color, values)], title=title, unit=unit, width=width,
                             height=height)


def line_chart(labels: Sequence[str], series: Sequence[tuple[str, str, Sequence[float | None]]], *, title: str,
               unit: str = "", width: int = 640, height: int = 220) -> SafeString:
    """Lines per series (name, colour, values); None leaves a gap (a day without data)."""
    values = [v for _, _, vs in series for v in vs if v is not None]
    if not labels or not values:
        return _empty(width, height, title)
    left, bottom, top = 56, 24, 22
    plot_w, plot_h = width - left - 12, height - top - bottom
    y_max = nice_max(max(values))
    step = plot_w / max(1, len(labels) - 1)
    xs = [left + (step * i if len(labels) > 1 else plot_w / 2) for i in range(len(labels))]
    parts = _axes(width, height, left, bottom, top, y_max, unit)
    for name, color, vs in series:
        segment: list[str] = []
        for i, v in enumerate(vs):
            if v is None:
                if len(segment) > 1:
                    parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(segment)}"/>')
                segment = []
                continue
            y = top + plot_h - plot_h * v / y_max
            segment.append(f"{xs[i]:.1f},{y:.1f}")
            parts.append(f'<circle class="point" cx="{xs[i]:.1f}" cy="{y:.1f}" r="2.5" fill="{color}">'
                         f"<title>{escape(labels[i])} {escape(name)}: {_fmt(v)}{escape(unit)}</title></circle>")
        if len(segment) > 1:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(segment)}"/>')
    parts += _x_labels(labels, xs, height - 8)
    parts += _legend([(n, c) for n, c, _ in series], left, 13)
    return _frame(width, height, title, parts)


def rate_bars(items: Sequence[tuple[str, float, str]], *, title: str, width: int = 640,
              good_high: bool = True) -> SafeString:
    """Horizontal bars for rates in [0, 1]: (label, rate, note). Colour says good or bad at a glance."""
    if not items:
        return _empty(width, 60, title)
    row_h, left = 24, 170
    height = 12 + row_h * len(items)
    plot_w = width - left - 120
    parts = []
    for i, (label, rate, note) in enumerate(items):
        y = 6 + row_h * i
        rate = min(1.0, max(0.0, rate))
        good = rate >= 0.8 if good_high else rate <= 0.05
        bad = rate < 0.5 if good_high else rate > 0.2
        color = "#5b9a68" if good else "#c0392b" if bad else "#e08e0b"
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end" fill="#333">{escape(label[:28])}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{plot_w}" height="16" fill="#f0f0f0"/>')
        parts.append(f'<rect class="bar" x="{left}" y="{y + 3}" width="{plot_w * rate:.1f}" height="16" fill="{color}">'
                     f"<title>{escape(label)}: {rate:.1%} {escape(note)}</title></rect>")
        parts.append(f'<text x="{left + plot_w + 6}" y="{y + 15}" fill="#333">{rate:.1%} <tspan fill="#888">'
                     f"{escape(note)}</tspan></text>")
    return _frame(width, height, title, parts)
