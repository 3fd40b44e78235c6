"""Draw a simulated timeline: a character chart for the terminal and a PNG, one row per rank.

The PNG is written with zlib and struct only (no plotting package on the training path): one
horizontal band per rank, one coloured block per compute action (F blue, B purple, I green,
W orange), idle time left light grey, a thin dark line between micro-batches' blocks. Colours
rather than labels: ``orch schedule`` prints the legend beside the figures.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from orch.parallel.schedules.simulate import Timeline

COLOURS = {"F": (66, 133, 244), "B": (142, 68, 173), "I": (52, 168, 83), "W": (251, 140, 0)}
IDLE, EDGE, BACKGROUND = (235, 235, 235), (40, 40, 40), (255, 255, 255)
LEGEND = "F blue, B purple, I green, W orange, idle grey"


def chart(timeline: Timeline, width: int = 96) -> str:
    """One line per rank: each character is ``makespan / width`` of time, showing the compute
    action running at its middle (``F``, ``B``, ``I``, ``W``), or ``.`` when idle."""
    step = timeline.makespan / width if timeline.makespan else 1.0
    lines = []
    for rank, spans in enumerate(timeline.spans):
        cells = ["."] * width
        for span in spans:
            if span.action.kind not in COLOURS:
                continue
            for col in range(width):
                middle = (col + 0.5) * step
                if span.start <= middle < span.end:
                    cells[col] = span.action.kind
        lines.append(f"rank {rank:<3d}|{''.join(cells)}|")
    return "\n".join(lines)


def write_png(timeline: Timeline, path: Path, width: int = 1200, row: int = 28) -> None:
    """Write the timeline as a PNG of ``width`` pixels and ``row`` pixels per rank."""
    ranks, gap = len(timeline.spans), 6
    height = ranks * (row + gap) + gap
    pixels = [bytearray(bytes(BACKGROUND) * width) for _ in range(height)]
    scale = (width - 1) / timeline.makespan if timeline.makespan else 0.0
    for rank, spans in enumerate(timeline.spans):
        top = gap + rank * (row + gap)
        _fill(pixels, 0, top, width, top + row, IDLE)
        for span in spans:
            colour = COLOURS.get(span.action.kind)
            if colour is None:
                continue
            x0, x1 = round(span.start * scale), max(round(span.end * scale), 1)
            _fill(pixels, x0, top, x1, top + row, colour)
            _fill(pixels, x0, top, min(x0 + 1, x1), top + row, EDGE)
    _save_png(pixels, width, height, path)


def _fill(pixels: list[bytearray], x0: int, y0: int, x1: int, y1: int,
          colour: tuple[int, int, int]) -> None:
    for y in range(y0, y1):
        pixels[y][3 * x0 : 3 * x1] = bytes(colour) * (x1 - x0)


def _save_png(pixels: list[bytearray], width: int, height: int, path: Path) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + bytes(line) for line in pixels)  # filter type 0 per scanline
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


__all__ = ["LEGEND", "chart", "write_png"]
