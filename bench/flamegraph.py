"""A small flame-graph SVG from collapsed stacks (``a;b;c 12`` per line), no JavaScript:
hover a frame for its name and share. Used for py-spy's raw output, after idle samples
are dropped, so that the picture and the ranking in bench/profile.py agree."""

from __future__ import annotations

import html
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

WIDTH = 1200
ROW = 16
MIN_WIDTH = 0.3  # pixels: narrower frames are not drawn


@dataclass
class _Node:
    count: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def _colour(name: str) -> str:
    h = zlib.crc32(name.encode())
    if "mesh/" in name:
        return f"rgb({200 + h % 55},{90 + h % 80},{40 + h % 40})"
    return f"rgb({200 + h % 55},{150 + h % 80},{50 + h % 60})"


def render(stacks: Iterable[tuple[list[str], int]], title: str) -> str:
    root = _Node()
    for frames, n in stacks:
        root.count += n
        node = root
        for f in frames:
            node = node.children.setdefault(f, _Node())
            node.count += n
    depth = 0

    def walk(node: _Node, level: int) -> None:
        nonlocal depth
        depth = max(depth, level)
        for child in node.children.values():
            walk(child, level + 1)

    walk(root, 0)
    height = (depth + 3) * ROW
    total = root.count or 1
    scale = WIDTH / total
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="monospace" '
        f'font-size="11">',
        f'<rect width="100%" height="100%" fill="#fdfdf5"/><text x="4" y="13">{html.escape(title)} '
        f"({total} samples)</text>",
    ]

    def draw(node: _Node, name: str, x: float, level: int) -> None:
        w = node.count * scale
        if w < MIN_WIDTH:
            return
        y = height - (level + 1) * ROW
        label = html.escape(f"{name} — {node.count} samples, {100 * node.count / total:.1f}%")
        out.append(f'<g><title>{label}</title><rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{ROW - 1}" '
                   f'fill="{_colour(name)}"/>')
        chars = int(w / 7)
        if chars >= 3:
            text = name if len(name) <= chars else name[: chars - 2] + ".."
            out.append(f'<text x="{x + 2:.1f}" y="{y + ROW - 4}">{html.escape(text)}</text>')
        out.append("</g>")
        cx = x
        for child_name, child in sorted(node.children.items()):
            draw(child, child_name, cx, level + 1)
            cx += child.count * scale

    cx = 0.0
    for name, child in sorted(root.children.items()):
        draw(child, name, cx, 0)
        cx += child.count * scale
    out.append("</svg>")
    return "\n".join(out)
