"""The cleaning report: JSON (counts, settings, every removed sample), a contact sheet of what goes, and
the one-line summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bloodcell import CLASS_NAMES
from bloodcell.core.outputs import atomic_path
from bloodcell.data.cleaning.config import resolve_cfg
from bloodcell.data.cleaning.result import SCORE_MEANING, CleaningResult


def report_dict(result: CleaningResult, labels: np.ndarray, source: str | None = None) -> dict[str, Any]:
    """The JSON report: counts, settings, each removed sample (index, label, reason, score), groups."""
    labels = np.asarray(labels).reshape(-1)
    kept = result.keep
    return {
        "source": source,
        "n_input": int(len(kept)),
        "n_kept": int(kept.sum()),
        "n_removed": result.n_removed,
        "counts": result.counts,
        "removed_per_class": {
            CLASS_NAMES[c] if c < len(CLASS_NAMES) else str(c): int(v)
            for c, v in enumerate(np.bincount(labels[~kept], minlength=len(CLASS_NAMES)))
        },
        "config": result.config,
        "score_meaning": SCORE_MEANING,
        "notes": result.notes,
        "removed": result.removed,
        "duplicate_groups": result.groups,
    }


def contact_sheet(
    result: CleaningResult,
    images: np.ndarray,
    labels: np.ndarray,
    path: Path,
    per_reason: int | None = None,
    columns: int | None = None,
) -> Path:
    """A PNG of removed samples, one block per reason; duplicate groups sit side by side with their
    kept copy (framed green). Each tile is captioned with its index and label. ``per_reason``, ``columns``
    and the tile size default to the ``report`` section of the result's settings."""
    from PIL import Image, ImageDraw

    sheet_cfg = resolve_cfg(result.config)["report"]  # its settings, the defaults' for a result without
    per_reason = int(sheet_cfg["per_reason"] if per_reason is None else per_reason)
    columns = int(sheet_cfg["columns"] if columns is None else columns)
    labels = np.asarray(labels).reshape(-1)
    tile, cap = int(sheet_cfg["tile"]), 12  # a caption line of PIL's default font
    by_reason: dict[str, list[tuple[int, bool]]] = {}
    for e in result.removed:
        by_reason.setdefault(e["reason"], [])
    for reason in by_reason:
        if reason in ("duplicate", "conflicting_labels"):
            items: list[tuple[int, bool]] = []
            gids = sorted({e["group"] for e in result.removed if e["reason"] == reason})
            for g in gids:
                items += [(i, bool(result.keep[i])) for i in result.groups[g]]
        else:
            entries = sorted((e for e in result.removed if e["reason"] == reason), key=lambda e: -e["score"])
            items = [(e["index"], False) for e in entries]
        by_reason[reason] = items[:per_reason]
    header = 18
    height = (
        sum(header + ((len(v) + columns - 1) // columns) * (tile + cap) for v in by_reason.values()) or header
    )
    sheet = Image.new("RGB", (columns * tile, max(height, header)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    if not by_reason:
        draw.text((4, 3), "nothing removed", fill=(0, 0, 0))
    for reason, items in by_reason.items():
        total = result.counts.get(reason, 0)
        title = f"{reason}: {total} removed"
        if reason in ("duplicate", "conflicting_labels"):
            title += ", shown with their groups (green frame = the copy kept)"
        elif total > len(items):
            title += f" (the {len(items)} highest scores shown)"
        draw.text((4, y + 3), title, fill=(0, 0, 0))
        y += header
        for k, (i, kept) in enumerate(items):
            r, c = divmod(k, columns)
            im = Image.fromarray(images[i]).resize((tile, tile), Image.Resampling.NEAREST)
            x0, y0 = c * tile, y + r * (tile + cap)
            sheet.paste(im, (x0, y0))
            if kept:
                draw.rectangle([x0, y0, x0 + tile - 1, y0 + tile - 1], outline=(0, 170, 0), width=3)
            name = CLASS_NAMES[labels[i]] if 0 <= labels[i] < len(CLASS_NAMES) else str(labels[i])
            draw.text((x0 + 2, y0 + tile), f"{i} {name[:9]}", fill=(0, 0, 0))
        y += ((len(items) + columns - 1) // columns) * (tile + cap)
    with atomic_path(path) as partial:
        sheet.save(partial)
    return path


def write_report(
    result: CleaningResult,
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: str | Path,
    source: str | None = None,
) -> dict[str, Path]:
    """Write ``cleaning_report.json`` and ``cleaning_removed.png`` (contact sheet) into ``out_dir``;
    ``images`` and ``labels`` are the arrays the result was computed on. Returns {"json": ..., "png": ...}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "cleaning_report.json"
    with atomic_path(json_path) as partial:
        partial.write_text(json.dumps(report_dict(result, labels, source), indent=1))
    png_path = contact_sheet(result, images, labels, out_dir / "cleaning_removed.png")
    return {"json": json_path, "png": png_path}


def summary(result: CleaningResult) -> str:
    """One line of counts, e.g. 'removed 42 of 1000: outlier 30, duplicate 12'."""
    parts = ", ".join(f"{k} {v}" for k, v in result.counts.items()) or "nothing"
    return f"removed {result.n_removed} of {len(result.keep)}: {parts}"
