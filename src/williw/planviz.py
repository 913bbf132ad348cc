"""Pictures of a plan as plain SVG strings: no plotting library, no JavaScript, nothing imported but the plan.

A pipeline plan is drawn left to right, one bar per stage; a greedy plan (no stages) as one load bar per node.
The CLI (``williw plan --svg``, ``williw show-plan``) and the worker's dashboard draw with the same function, so
the file and the page never disagree.

Each drawn part carries attributes a test or a stylesheet can select on: ``<g class="stage" data-node="gpu-a"
data-stage="0" data-blocks="[0,6)" data-bottleneck="true">`` (blocks half-open, as everywhere in williw),
``<g class="node-load" data-node=...>`` for greedy plans and ``<g class="excluded" data-node=...>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from typing import Protocol

from williw.planner.plan import NodeAssignment, Plan
from williw.units import format_bytes, format_gflops, format_seconds

WIDTH = 960
MARGIN = 20
# A stage bar holds six lines of text, which need ~170 px however few blocks it has; the rest of the width is
# shared in proportion to the blocks, so a 1-block stage of a 100-block model is still legible.
MIN_STAGE_W = 170
GAP = 10
BAR_Y = 72
BAR_H = 160
CHAR_W = 6.6  # average advance of a 12 px sans-serif character, to fit and wrap text without measuring it
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"
STAGE_FILLS = ("#e8f0fe", "#e6f4ea", "#fef7e0", "#f3e8fd", "#e0f7fa", "#fce8e6")
SLOW = "#d93025"
METER_BG = "#ffffff"
TIME_FILL = "#1a73e8"
MEM_OK, MEM_HIGH, MEM_OVER = "#188038", "#e37400", "#d93025"


class NodeLike(Protocol):
    """What the picture needs of a node: a `williw.fleet.Node`, or the worker's registry record."""

    node_id: str
    memory_gb: float
    compute_tflops: float


def plan_svg(plan: Plan, nodes: Iterable[NodeLike] | None = None, *, title: str | None = None) -> str:
    """Draw ``plan`` as a standalone SVG document.

    Args:
        plan: a pipeline or greedy plan.
        nodes: the fleet, to draw each node's memory use against its capacity (and a greedy node's compute
            against its TFLOPS); without it only the bytes are shown.
        title: the heading; default: the model name, strategy and objective.

    Returns:
        The SVG text (UTF-8, with an XML declaration), readable at 960 px wide.
    """
    fleet = {n.node_id: n for n in nodes or ()}
    heading = title or _default_title(plan)
    if plan.strategy == "pipeline" and plan.assignments:
        width, body, y = _pipeline(plan, fleet)
    else:
        width, body, y = _greedy(plan, fleet)
    excluded, y = _excluded(plan, y + 8, width)
    height = y + MARGIN
    head = (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="{escape(FONT)}" font-size="12" '
            f'class="williw-plan" data-strategy="{escape(plan.strategy)}" data-version="{plan.version}">\n'
            f"<title>{escape(heading)}</title>\n"
            f'<rect width="{width}" height="{height}" fill="#fff"/>\n'
            f'<text x="{MARGIN}" y="26" font-size="16" font-weight="600">{escape(heading)}</text>\n'
            f'<text x="{MARGIN}" y="46" fill="#444">{escape(_summary(plan))}</text>\n')
    return head + "".join(body) + "".join(excluded) + "</svg>\n"


def _default_title(plan: Plan) -> str:
    name = plan.model_name or "model"
    if plan.strategy == "pipeline":
        n = len(plan.assignments)
        return f"{name}: pipeline of {n} stage{'s' if n != 1 else ''} ({plan.objective}), plan v{plan.version}"
    n = len(plan.assignments)
    return f"{name}: greedy plan on {n} node{'s' if n != 1 else ''}, plan v{plan.version}"


def _summary(plan: Plan) -> str:
    parts = []
    if plan.bottleneck_s is not None:
        bound = ""
        if plan.lower_bound_s:
            bound = f" (lower bound {format_seconds(plan.lower_bound_s)}{', exact' if plan.exact else ''})"
        parts.append(f"bottleneck {format_seconds(plan.bottleneck_s)}{bound}")
    if plan.latency_s is not None:
        parts.append(f"latency {format_seconds(plan.latency_s)}")
    if plan.tokens_per_s:
        parts.append(f"{plan.tokens_per_s:,.1f} tokens/s")
    total = sum(a.bytes for a in plan.assignments)
    parts.append(f"{format_bytes(total)} on {len(plan.assignments)} node{'s' if len(plan.assignments) != 1 else ''}")
    x = plan.extra
    if "context_length" in x:  # what the plan leaves (`williw.planner.capacity`)
        most = "any" if x.get("max_context_length") is None else f"{x['max_context_length']:,}"
        parts.append(f"batch {x['batch_size']} × context {x['context_length']:,} (at most {most} tokens)")
    return " · ".join(parts)


def stage_time(plan: Plan, a: NodeAssignment) -> float:
    """The stage's time under the plan's objective (what the bottleneck is the maximum of); 0 when unknown."""
    t = a.decode_time_s if plan.objective == "decode" else a.stage_time_s
    return t or 0.0


def slowest(plan: Plan) -> str | None:
    """The node id of the slowest stage (or greedy node), the first one on a tie; None when no times are known."""
    times = [(stage_time(plan, a), -i, a.node_id) for i, a in enumerate(plan.assignments)]
    if not times or max(times)[0] <= 0:
        return None
    return max(times)[2]


def stage_widths(blocks: list[int], available: float) -> list[float]:
    """Bar widths: ``MIN_STAGE_W`` each, plus the rest of ``available`` in proportion to the blocks."""
    spare = max(0.0, available - MIN_STAGE_W * len(blocks))
    total = sum(blocks)
    if total == 0:
        return [MIN_STAGE_W + spare / len(blocks)] * len(blocks)
    return [MIN_STAGE_W + spare * b / total for b in blocks]


def _pipeline(plan: Plan, fleet: dict[str, NodeLike]) -> tuple[int, list[str], float]:
    n = len(plan.assignments)
    width = max(WIDTH, 2 * MARGIN + n * MIN_STAGE_W + (n - 1) * GAP)
    counts = [(a.blocks[1] - a.blocks[0]) if a.blocks else 0 for a in plan.assignments]
    widths = stage_widths(counts, width - 2 * MARGIN - (n - 1) * GAP)
    worst = slowest(plan)
    bottleneck = max((stage_time(plan, a) for a in plan.assignments), default=0.0)
    out: list[str] = []
    x = float(MARGIN)
    for i, (a, w) in enumerate(zip(plan.assignments, widths, strict=True)):
        out.append(_stage(plan, a, i, x, w, a.node_id == worst, bottleneck, fleet.get(a.node_id)))
        if i < n - 1:  # the arrow from one stage to the next: activations flow left to right
            ax = x + w + GAP / 2
            out.append(f'<path d="M{ax - 3:.1f},{BAR_Y + BAR_H / 2 - 5} l5,5 l-5,5" fill="none" stroke="#777" '
                       'stroke-width="1.5"/>\n')
        x += w + GAP
    return width, out, BAR_Y + BAR_H + 6


def _stage(plan: Plan, a: NodeAssignment, i: int, x: float, w: float, is_worst: bool, bottleneck: float,
           node: NodeLike | None) -> str:
    blocks = f"[{a.blocks[0]},{a.blocks[1]})" if a.blocks else ""
    label_blocks = f"blocks [{a.blocks[0]}, {a.blocks[1]})" if a.blocks else "no blocks"
    t = stage_time(plan, a)
    stroke = f'stroke="{SLOW}" stroke-width="3"' if is_worst else 'stroke="#9aa0a6" stroke-width="1"'
    fits = int((w - 16) / CHAR_W)
    lines = [f'<g class="stage{" bottleneck" if is_worst else ""}" data-node="{escape(a.node_id)}" '
             f'data-stage="{a.stage if a.stage is not None else i}" data-blocks="{blocks}" '
             f'data-bottleneck="{"true" if is_worst else "false"}">\n',
             f"<title>{escape(_stage_tooltip(plan, a, i, t, bottleneck, node))}</title>\n",
             f'<rect x="{x:.1f}" y="{BAR_Y}" width="{w:.1f}" height="{BAR_H}" rx="6" '
             f'fill="{STAGE_FILLS[i % len(STAGE_FILLS)]}" {stroke}/>\n']
    tx = x + 8
    lines.append(_text(tx, BAR_Y + 20, _fit(f"stage {a.stage if a.stage is not None else i} · {a.node_id}", fits),
                       weight="600", size=13))
    lines.append(_text(tx, BAR_Y + 38, _fit(label_blocks, fits)))
    lines.append(_text(tx, BAR_Y + 54, _fit(f"{format_gflops(a.total_compute)} · {format_bytes(a.bytes)}", fits),
                       fill="#444"))
    share = t / bottleneck if bottleneck > 0 else 0.0
    if is_worst:  # above the bar, where it cannot be cut short by a narrow stage
        lines.append(_text(x + 2, BAR_Y - 6, "▼ bottleneck (slowest stage)", fill=SLOW, weight="600", size=11))
    lines.append(_text(tx, BAR_Y + 78, _fit(f"time {format_seconds(t)} ({share:.0%})", fits),
                       fill=SLOW if is_worst else "#202124", weight="600" if is_worst else "400"))
    lines.append(_meter(tx, BAR_Y + 84, w - 16, share, SLOW if is_worst else TIME_FILL, "time"))
    lines.append(_text(tx, BAR_Y + 107, _fit(runs_in(a), fits), fill="#555", size=11))
    held = a.bytes + (a.kv_bytes or 0) + (a.activation_bytes or 0)  # at run time: weights, KV cache, transient
    if node is not None:
        cap = round(node.memory_gb * 1e9)
        use = held / cap if cap else 0.0
        label = f"memory {format_bytes(held)} ({use:.0%})"
        color = MEM_OVER if use > 1 else MEM_HIGH if use > 0.8 else MEM_OK
    else:
        use, label, color = 0.0, f"memory {format_bytes(held)} (capacity unknown)", "#bbb"
    lines.append(_text(tx, BAR_Y + 118, _fit(label, fits)))
    lines.append(_meter(tx, BAR_Y + 124, w - 16, use, color, "memory"))
    if node is not None:
        lines.append(_text(tx, BAR_Y + 150, _fit(f"of {format_bytes(cap)} · {node.compute_tflops:g} TFLOPS", fits),
                           fill="#555", size=11))
    lines.append("</g>\n")
    return "".join(lines)


def runs_in(a: NodeAssignment) -> str:
    """``cpu · float32`` or ``cuda:0 · int4/bfloat16``: the stage's device, then its weight format and dtype."""
    return f"{a.run_device} · {a.precision.label}"


def _stage_tooltip(plan: Plan, a: NodeAssignment, i: int, t: float, bottleneck: float, node: NodeLike | None) -> str:
    parts = [f"stage {a.stage if a.stage is not None else i} on {a.node_id}",
             f"blocks [{a.blocks[0]}, {a.blocks[1]})" if a.blocks else "no blocks",
             f"{len(a.layer_names)} tensors", format_gflops(a.total_compute), format_bytes(a.bytes),
             f"{plan.objective} time {format_seconds(t)} of bottleneck {format_seconds(bottleneck)}"]
    parts.append(f"runs on {runs_in(a)}")
    if a.stage_time_s is not None and a.decode_time_s is not None:
        parts.append(f"prefill {format_seconds(a.stage_time_s)}, decode {format_seconds(a.decode_time_s)}/token")
    if a.kv_bytes is not None and a.activation_bytes is not None and a.headroom_bytes is not None:
        room = format_bytes(a.headroom_bytes) if a.headroom_bytes >= 0 else f"-{format_bytes(-a.headroom_bytes)}"
        parts.append(f"KV cache {format_bytes(a.kv_bytes)}, activations {format_bytes(a.activation_bytes)}, "
                     f"headroom {room}")
    if node is not None:
        parts.append(f"node: {node.compute_tflops:g} TFLOPS, {format_bytes(round(node.memory_gb * 1e9))}")
    return "; ".join(parts)


def _greedy(plan: Plan, fleet: dict[str, NodeLike]) -> tuple[int, list[str], float]:
    """One row per node: compute load against capacity (the seed's utilisation) and memory against capacity."""
    width = WIDTH
    worst = slowest(plan) if len(plan.assignments) > 1 else None  # "slowest" of one node says nothing
    label_w = 200
    bar_w = (width - 2 * MARGIN - label_w - 20) / 2
    out = [_text(MARGIN + label_w, BAR_Y + 4, "compute load (of one second of the node's compute)", fill="#444"),
           _text(MARGIN + label_w + bar_w + 20, BAR_Y + 4, "memory", fill="#444")]
    y = BAR_Y + 14
    for a in plan.assignments:
        node = fleet.get(a.node_id)
        is_worst = a.node_id == worst
        out.append(f'<g class="node-load{" bottleneck" if is_worst else ""}" data-node="{escape(a.node_id)}" '
                   f'data-bottleneck="{"true" if is_worst else "false"}">\n'
                   f"<title>{escape(a.node_id)}: {len(a.layer_names)} tensors, {format_gflops(a.total_compute)}, "
                   f"{format_bytes(a.bytes)}</title>\n")
        name = _fit(a.node_id, int(label_w / CHAR_W) - 2) + ("  ◀ slowest" if is_worst else "")
        out.append(_text(MARGIN, y + 16, name, weight="600", fill=SLOW if is_worst else "#202124"))
        load = a.compute_utilization
        out.append(_meter(MARGIN + label_w, y + 4, bar_w, load, SLOW if is_worst else TIME_FILL, "compute", h=16))
        out.append(_text(MARGIN + label_w + 4, y + 34, f"{format_gflops(a.total_compute)} ({load:.0%})"
                                                       + (f" · {format_seconds(a.stage_time_s)}"
                                                          if a.stage_time_s is not None else ""), size=11))
        mx = MARGIN + label_w + bar_w + 20
        if node is not None:
            cap = round(node.memory_gb * 1e9)
            use = a.bytes / cap if cap else 0.0
            color = MEM_OVER if use > 1 else MEM_HIGH if use > 0.8 else MEM_OK
            label = f"{format_bytes(a.bytes)} of {format_bytes(cap)} ({use:.0%})"
        else:
            use, color, label = 0.0, "#bbb", f"{format_bytes(a.bytes)} (capacity unknown)"
        out.append(_meter(mx, y + 4, bar_w, use, color, "memory", h=16))
        out.append(_text(mx + 4, y + 34, label, size=11))
        out.append("</g>\n")
        y += 44
    return width, out, y


def _excluded(plan: Plan, y: float, width: int) -> tuple[list[str], float]:
    if not plan.excluded:
        return [], y
    out = [_text(MARGIN, y + 14, f"Not used ({len(plan.excluded)})", weight="600", size=13)]
    y += 22
    per_line = int((width - 2 * MARGIN - 20) / CHAR_W)
    for e in plan.excluded:
        lines = _wrap(f"{e.node_id}: {e.reason}", per_line)
        out.append(f'<g class="excluded" data-node="{escape(e.node_id)}">\n<title>{escape(e.reason)}</title>\n')
        for j, line in enumerate(lines):
            out.append(_text(MARGIN + (8 if j == 0 else 20), y + 14, ("• " if j == 0 else "") + line, fill="#444"))
            y += 17
        out.append("</g>\n")
    return out, y


def _meter(x: float, y: float, w: float, frac: float, color: str, kind: str, h: int = 10) -> str:
    """A track with a fill; over 100 % the fill is capped and the track's outline turns the fill colour."""
    shown = max(0.0, min(frac, 1.0)) * w
    outline = color if frac > 1 else "#c4c7c5"
    return (f'<g class="meter" data-kind="{kind}" data-fraction="{frac:.4f}">'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h}" rx="3" fill="{METER_BG}" '
            f'stroke="{outline}"/>'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{shown:.1f}" height="{h}" rx="3" fill="{color}"/></g>\n')


def _text(x: float, y: float, s: str, *, fill: str = "#202124", weight: str = "400", size: int = 12) -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" fill="{fill}" font-size="{size}" font-weight="{weight}">'
            f"{escape(s)}</text>\n")


def _fit(s: str, chars: int) -> str:
    return s if len(s) <= chars else s[:max(1, chars - 1)] + "…"


def _wrap(s: str, per_line: int, max_lines: int = 3) -> list[str]:
    words, lines, cur = s.split(), [], ""
    for word in words:
        if cur and len(cur) + 1 + len(word) > per_line:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1] + " …", per_line)
    return [_fit(line, per_line) for line in lines]
