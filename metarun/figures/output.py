"""A drawn figure as PNG and SVG bytes, and where they go: an output folder with a figures.json index
saying which file shows which settings (the HTML page embeds the same bytes)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metarun.errors import UserInputError
from metarun.figures.backend import DPI

INDEX_FILE = "figures.json"


@dataclass(frozen=True)
class RenderedFigure:
    """One figure: its file stem, what it shows (kind, metric, the full settings) and its two encodings."""

    stem: str
    kind: str  # learning_curves | results | adaptation | paired_difference
    metric: str
    settings: tuple[str, ...]
    caption: str
    png: bytes
    svg: bytes

    def index_entry(self) -> dict[str, Any]:
        return {"png": f"{self.stem}.png", "svg": f"{self.stem}.svg", "kind": self.kind, "metric": self.metric,
                "settings": list(self.settings), "caption": self.caption}


def render(figure: Any, stem: str, kind: str, metric: str, settings: tuple[str, ...], caption: str) -> RenderedFigure:
    """Encode a matplotlib Figure at its own size (no tight bbox: a column-wide figure stays column-wide)."""
    png, svg = io.BytesIO(), io.BytesIO()
    figure.savefig(png, format="png", dpi=DPI, metadata={"Software": None})
    figure.savefig(svg, format="svg", metadata={"Date": None})
    return RenderedFigure(stem, kind, metric, settings, caption, png.getvalue(), svg.getvalue())


def prepare_folder(path: str | Path) -> Path:
    """The output folder, created if needed and checked writable before anything is drawn."""
    folder = Path(path).expanduser()
    probe = folder / ".metarun-write-test"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as ex:
        raise UserInputError(f"cannot write figures to {folder}: {ex.strerror or ex}; give a folder you can "
                             f"write to (--plot DIR)") from None
    return folder


def write_figures(folder: Path, figures: list[RenderedFigure]) -> Path:
    """Write every figure's PNG and SVG and update the index: entries of other figures whose files are still
    there are kept (report and compare may share a folder)."""
    index_path = folder / INDEX_FILE
    entries = {e["png"]: e for e in _existing_index(index_path) if (folder / e["png"]).is_file()}
    try:
        for figure in figures:
            (folder / f"{figure.stem}.png").write_bytes(figure.png)
            (folder / f"{figure.stem}.svg").write_bytes(figure.svg)
            entries[f"{figure.stem}.png"] = figure.index_entry()
        index_path.write_text(json.dumps(sorted(entries.values(), key=lambda e: e["png"]), indent=2) + "\n")
    except OSError as ex:
        raise UserInputError(f"cannot write figures to {folder}: {ex.strerror or ex}") from None
    return index_path


def _existing_index(path: Path) -> list[dict[str, Any]]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [e for e in entries if isinstance(e, dict) and "png" in e] if isinstance(entries, list) else []
