"""Charts as inline SVG, drawn on the server: no chart library, no script, nothing to fetch.

A line chart of a telemetry rollup (mean line over a min-max band) and a bar chart (SLA
compliance per class and month). Text that goes into the SVG is escaped, numbers are
formatted, hence the `Markup` of the result. Each SVG has a `<title>`, and pages show the
figures as text too, so a chart is never the only way to read the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape

W, H = 640, 200
PAD_L, PAD_R, PAD_T, PAD_B = 48, 8, 10, 22


@dataclass(frozen=True)
class Sample:
    """One bucket: when, mean, min, max."""

    ts: datetime
    mean: float
    low: float
    high: float


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def line_chart(samples: Sequence[Sample], title: str, unit: str = "") -> Markup:
    """Mean line over the min-max band of `samples` (oldest first)."""
    label = escape(f"{title}{' (' + unit + ')' if unit else ''}")
    if len(samples) < 2:
        return Markup(f'<p class="muted">{label}: not enough data for a chart yet.</p>')  # noqa: S704
    t0, t1 = samples[0].ts.timestamp(), samples[-1].ts.timestamp()
    lo = min(s.low for s in samples)
    hi = max(s.high for s in samples)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    span_t = max(t1 - t0, 1.0)

    def x(ts: datetime) -> float:
        return PAD_L + (ts.timestamp() - t0) / span_t * (W - PAD_L - PAD_R)

    def y(v: float) -> float:
        return PAD_T + (hi - v) / (hi - lo) * (H - PAD_T - PAD_B)

    mean = " ".join(f"{x(s.ts):.1f},{y(s.mean):.1f}" for s in samples)
    band = " ".join(f"{x(s.ts):.1f},{y(s.high):.1f}" for s in samples) + " " + " ".join(
        f"{x(s.ts):.1f},{y(s.low):.1f}" for s in reversed(samples)
    )
    first, last = samples[0].ts, samples[-1].ts
    fmt = "%H:%M" if span_t <= 2 * 86400 else "%d %b"
    return Markup(  # noqa: S704 - every interpolated text is escaped
        f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" preserveAspectRatio="none" '
        f'aria-label="{label}"><title>{label}</title>'
        f'<line class="axis" x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" y2="{H - PAD_B}"/>'
        f'<text x="{PAD_L - 4}" y="{PAD_T + 8}" text-anchor="end">{_fmt(hi)}</text>'
        f'<text x="{PAD_L - 4}" y="{H - PAD_B}" text-anchor="end">{_fmt(lo)}</text>'
        f'<text x="{PAD_L}" y="{H - 6}">{first.strftime(fmt)}</text>'
        f'<text x="{W - PAD_R}" y="{H - 6}" text-anchor="end">{last.strftime(fmt)} UTC</text>'
        f'<polygon class="band" points="{band}"/>'
        f'<polyline class="line" points="{mean}"/></svg>'
    )


def bar_chart(bars: Sequence[tuple[str, float | None]], title: str, target: float | None = None,
              max_value: float = 100.0) -> Markup:
    """Vertical bars (label, value in 0..max_value; None = no data), an optional target line."""
    label = escape(title)
    if not bars:
        return Markup(f'<p class="muted">{label}: no data yet.</p>')  # noqa: S704
    n = len(bars)
    slot = (W - PAD_L - PAD_R) / n
    bw = max(slot * 0.6, 2.0)
    parts = [f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{label}">'
             f"<title>{label}</title>"
             f'<line class="axis" x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" '
             f'y2="{H - PAD_B}"/>'
             f'<text x="{PAD_L - 4}" y="{PAD_T + 8}" text-anchor="end">{_fmt(max_value)}</text>'
             f'<text x="{PAD_L - 4}" y="{H - PAD_B}" text-anchor="end">0</text>']
    scale = (H - PAD_T - PAD_B) / max_value
    for i, (name, value) in enumerate(bars):
        bx = PAD_L + i * slot + (slot - bw) / 2
        if value is not None:
            bh = max(min(value, max_value), 0.0) * scale
            ok = target is None or value >= target
            parts.append(f'<rect class="bar {"ok" if ok else "bad"}" x="{bx:.1f}" '
                         f'y="{H - PAD_B - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}">'
                         f"<title>{escape(name)}: {value:.1f}</title></rect>")
        parts.append(f'<text x="{bx + bw / 2:.1f}" y="{H - 6}" text-anchor="middle">'
                     f"{escape(name)}</text>")
    if target is not None:
        ty = H - PAD_B - target * scale
        parts.append(f'<line class="target" x1="{PAD_L}" y1="{ty:.1f}" x2="{W - PAD_R}" '
                     f'y2="{ty:.1f}"><title>target {target:g}</title></line>')
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every interpolated text is escaped


def site_map(points: Sequence[tuple[str, str, float, float, str]]) -> Markup:
    """Sites (code, name, lat, lon, state) on an equirectangular frame fitted to them."""
    if not points:
        return Markup("")
    lats = [p[2] for p in points]
    lons = [p[3] for p in points]
    pad = 5.0
    lat0, lat1 = min(lats) - pad, max(lats) + pad
    lon0, lon1 = min(lons) - pad, max(lons) + pad
    mw, mh = 640, 320

    def xy(lat: float, lon: float) -> tuple[float, float]:
        return ((lon - lon0) / (lon1 - lon0) * (mw - 40) + 20,
                (lat1 - lat) / (lat1 - lat0) * (mh - 40) + 20)

    parts = [f'<svg class="map" viewBox="0 0 {mw} {mh}" role="img" '
             f'aria-label="Map of sites"><title>Map of sites</title>'
             f'<rect class="sea" x="0" y="0" width="{mw}" height="{mh}"/>']
    for code, name, lat, lon, state in points:
        px, py = xy(lat, lon)
        parts.append(
            f'<a href="/sites/{escape(code)}"><circle class="pin {escape(state)}" cx="{px:.1f}" '
            f'cy="{py:.1f}" r="9"><title>{escape(name)}: {escape(state)}</title></circle>'
            f'<text x="{px + 12:.1f}" y="{py + 4:.1f}">{escape(name)} ({escape(state)})</text></a>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every interpolated text is escaped
