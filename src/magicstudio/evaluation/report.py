"""Evaluation report: per-metric summary (mean, std, n, misses), report.json and a markdown table next to it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..io import atomic_write, write_json

#: what each metric measures, for the markdown report (direction: higher is better unless said)
DESCRIPTIONS = {
    "csim": "face-embedding cosine, mean source face vs generated (identity)",
    "face_sim": "same as csim (MagicFace's name)",
    "style": "CLIP image cosine, reference vs generated, faces masked out (style)",
    "aesthetic": "LAION aesthetic predictor on CLIP ViT-L/14 (fidelity, ~1-10)",
    "clip_t": "CLIP cosine of prompt and image (placeholder tokens removed)",
    "clip_i": "CLIP image cosine, reference vs generated (unmasked)",
    "dino": "DINO ViT-S/16 [CLS] cosine, reference vs generated",
    "dreamsim": "DreamSim distance, reference vs generated (lower = more similar)",
}


def summarise(values: Sequence[float | None]) -> dict[str, Any]:
    """``mean`` and population ``std`` (ddof=0) of the values that are not None, their count ``n`` and the
    number of ``misses`` (None: no face found, no prompt, unreadable image). Mean/std are None when n == 0."""
    got = [float(v) for v in values if v is not None]
    n = len(got)
    mean = math.fsum(got) / n if n else None
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in got) / n) if n else None
    return {"mean": mean, "std": std, "n": n, "misses": len(values) - n}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    summary: dict[str, dict] = report.get("summary", {})
    lines = ["# Evaluation report", "", "| metric | mean | std | n | misses | measures |",
             "|---|---:|---:|---:|---:|---|"]
    for metric, s in summary.items():
        desc = DESCRIPTIONS.get(metric, "")
        if "error" in s:
            lines.append(f"| {metric} | - | - | - | - | unavailable: {_cell(s['error'])} |")
        else:
            lines.append(f"| {metric} | {_fmt(s.get('mean'))} | {_fmt(s.get('std'))} | {s.get('n', 0)} | "
                         f"{s.get('misses', 0)} | {desc} |")
    config = report.get("config", {})
    warnings = config.get("warnings") or []
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {_cell(w)}" for w in warnings]
    notes = config.get("notes") or {}
    if notes:
        lines += ["", "## Notes", ""] + [f"- {k}: {_cell(v)}" for k, v in notes.items()]
    images = report.get("images", [])
    metrics = [m for m, s in summary.items() if "error" not in s]
    if images and metrics:
        lines += ["", "## Images", "", "| file | " + " | ".join(metrics) + " |",
                  "|---|" + "---:|" * len(metrics)]
        for row in images:
            name = Path(str(row.get("file", ""))).name
            lines.append(f"| {_cell(name)} | " + " | ".join(_fmt(row.get(m)) for m in metrics) + " |")
    settings = {k: v for k, v in config.items() if k not in ("warnings", "notes") and not isinstance(v, (list, dict))}
    if settings:
        lines += ["", "## Settings", ""] + [f"- {k}: {_cell(_fmt(v))}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_json: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report`` as JSON to ``out_json`` and its markdown rendering next to it (same name, ``.md``);
    returns ``(json_path, markdown_path)``. Both writes are atomic."""
    out_json = Path(out_json)
    if out_json.suffix.lower() != ".json":
        out_json = out_json.with_name(out_json.name + ".json")
    md = out_json.with_suffix(".md")
    write_json(out_json, report)
    text = markdown(report)
    atomic_write(md, lambda p: p.write_text(text))
    return out_json, md


def write_new_report(report: dict[str, Any], out_json: str | os.PathLike) -> tuple[Path, Path]:
    """``write_report`` that never replaces a file: ``out_json`` and its ``.md`` companion, else ``<stem>-2.json`` /
    ``<stem>-2.md``, ... (both names free, each claimed exclusively as it is written)."""
    from ..io import write_new

    out_json = Path(out_json)
    if out_json.suffix.lower() != ".json":
        out_json = out_json.with_name(out_json.name + ".json")
    folder, stem = out_json.parent, out_json.stem
    data = json.dumps(report, indent=2, sort_keys=False, default=str) + "\n"
    text = markdown(report)
    for n in range(1, 10_000):
        name = stem if n == 1 else f"{stem}-{n}"
        if (folder / f"{name}.json").exists() or (folder / f"{name}.md").exists():
            continue
        try:
            json_path = write_new(folder, [f"{name}.json"], lambda p: p.write_text(data))
        except FileExistsError:
            continue
        try:
            md_path = write_new(folder, [f"{name}.md"], lambda p: p.write_text(text))
        except FileExistsError:
            json_path.unlink()
            continue
        return json_path, md_path
    raise UserError(f"no free report name next to {out_json}")
