"""The benchmark's table files: ``benchmark.json`` (every value, per row and per cell) and ``benchmark.md`` (the
paper's tables side by side, a row per weights, with the data set sizes used, what was not computed and why, and
the time each cell took).

A cell's values are the registry's columns applied to the driver's result JSON (``None`` when the model has no
such value, e.g. LOST for a convnet); its ``details`` are the evaluator's other rows (an official ViT's best head,
every k of the k-NN, every variant of IN-9).

Example:
    >>> payload = table_payload(suite, "/data", cells)
    >>> write_tables("runs/bench", payload)          # runs/bench/benchmark.json, runs/bench/benchmark.md
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simpool.checkpoint import atomic_write_text
from simpool.evaluation.benchmark.cells import Cell
from simpool.evaluation.benchmark.registry import TABLES
from simpool.evaluation.benchmark.suite import Suite

__all__ = ["JSON_FILE", "MARKDOWN_FILE", "table_markdown", "table_payload", "write_tables"]

JSON_FILE, MARKDOWN_FILE = "benchmark.json", "benchmark.md"
MODEL_KEYS = ("arch", "mode", "gamma", "epoch")


def _cell_payload(cell: Cell) -> dict[str, Any]:
    out: dict[str, Any] = {"status": cell.status, "folder": str(cell.folder), "command": cell.command}
    if cell.reason:
        out["reason"] = cell.reason
    if cell.seconds is not None:
        out["seconds"] = round(cell.seconds, 2)
    if cell.result is not None:
        evaluator = cell.entry.evaluator
        out["values"] = {template.format(label=cell.entry.label): read(cell.result)
                         for template, read in evaluator.columns.items()}
        out["details"] = evaluator.details(cell.result)
        out["images"] = evaluator.images(cell.result)
    return out


def table_payload(suite: Suite, data_root: str | Path, cells: Sequence[Cell]) -> dict[str, Any]:
    """Everything ``benchmark.json`` holds; ``benchmark.md`` is written from it."""
    tables: dict[str, list[str]] = {}
    for title in [*TABLES, *[e.evaluator.table for e in suite.entries]]:
        headers = [h for e in suite.entries if e.evaluator.table == title for h in e.headers()]
        if headers and title not in tables:
            tables[title] = headers
    entries = {e.name: {"evaluator": e.kind, "label": e.label, "data": e.data, "flags": e.flags,
                        "inputs": e.inputs, "columns": e.headers()} for e in suite.entries}
    rows: dict[str, dict[str, Any]] = {}
    for cell in cells:
        row = rows.setdefault(cell.row.name, {"name": cell.row.name, "weights": cell.row.weights,
                                              "random_init": cell.row.weights is None, "model": {},
                                              "values": {h: None for h in suite.headers()}, "cells": {}})
        row["cells"][cell.entry.name] = payload = _cell_payload(cell)
        row["values"].update(payload.get("values", {}))
        if cell.result is not None and not row["model"]:
            row["model"] = {k: cell.result.get(k) for k in MODEL_KEYS if k in cell.result}
    for entry in suite.entries:  # the sizes the finished runs used (the same data for every row)
        sizes = [c.result and entry.evaluator.images(c.result) for c in cells if c.entry is entry]
        entries[entry.name]["images"] = next((s for s in sizes if s), None)
        entries[entry.name]["not_found"] = entry.missing(data_root)
    return {"title": suite.title, "suite": str(suite.path), "data_root": str(data_root),
            "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "tables": tables, "entries": entries, "published": suite.published, "rows": list(rows.values())}


def _number(value: Any) -> str:
    return "—" if value is None else f"{value:.1f}"


def _images(sizes: Any) -> str:
    if sizes is None:
        return "—"
    if isinstance(sizes, dict):
        if len(sizes) > 2 and len(set(sizes.values())) == 1:  # IN-9's variants: the same images in each
            return f"{next(iter(sizes.values())):,} each in {', '.join(sizes)}"
        return ", ".join(f"{k} {v:,}" for k, v in sizes.items())
    return f"{sizes:,}"


def _model(row: dict[str, Any]) -> str:
    model = row["model"]
    if not model:
        return ""
    text = f"{model.get('arch')} {model.get('mode')}"
    return text + (", random init" if row["random_init"] else f", epoch {model['epoch']}"
                   if model.get("epoch") is not None else "")


def table_markdown(payload: dict[str, Any]) -> str:
    lines = [f"# {payload['title']}", "",
             f"Suite `{payload['suite']}` on the data root `{payload['data_root']}`; written {payload['written']} by "
             "simpool-benchmark. Every value and each run's command: `benchmark.json`.", ""]
    for title, headers in payload["tables"].items():
        lines += [f"## {title}", "", "| weights | model | " + " | ".join(headers) + " |",
                  "|---|---|" + "---|" * len(headers)]
        for name, values in payload["published"].items():
            if any(h in values for h in headers):
                lines.append(f"| *{name}* | | " + " | ".join(_number(values.get(h)) for h in headers) + " |")
        for row in payload["rows"]:
            lines.append(f"| {row['name']} | {_model(row)} | "
                         + " | ".join(_number(row["values"].get(h)) for h in headers) + " |")
        lines.append("")
    lines += ["Official ViTs are scored on their last block's [CLS] attention averaged over heads (the best head, "
              "picked on the same images, is in `benchmark.json`); SimPool models on SimPool's map.", "",
              "## Data used", "", "| entry | evaluator | data under the root | images |", "|---|---|---|---|"]
    for name, entry in payload["entries"].items():
        images = f"not found: {', '.join(entry['not_found'])}" if entry["not_found"] else _images(entry["images"])
        lines.append(f"| {name} | {entry['evaluator']} | {', '.join(entry['data'].values())} | {images} |")
    problems = [f"- {row['name']} / {name}: {cell['status']}: {cell['reason']}" for row in payload["rows"]
                for name, cell in row["cells"].items() if cell.get("reason")]
    if problems:
        lines += ["", "## Not computed", "", *problems]
    lines += ["", "## Time", "", "| weights | entry | status | seconds | images | s per 1,000 images |",
              "|---|---|---|---|---|---|"]
    for row in payload["rows"]:
        for name, cell in row["cells"].items():
            if cell.get("seconds") is None:
                continue
            sizes = cell.get("images")
            total = sum(sizes.values()) if isinstance(sizes, dict) else sizes
            per_k = f"{1000 * cell['seconds'] / total:.1f}" if total else "—"
            lines.append(f"| {row['name']} | {name} | {cell['status']} | {cell['seconds']:.1f} | "
                         f"{'—' if total is None else f'{total:,}'} | {per_k} |")
    return "\n".join(lines) + "\n"


def write_tables(output_dir: str | Path, payload: dict[str, Any]) -> tuple[Path, Path]:
    """``benchmark.json`` and ``benchmark.md`` in ``output_dir``, each written whole (a temporary file, a rename)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_text(output_dir / JSON_FILE, json.dumps(payload, indent=2) + "\n")
    md_path = atomic_write_text(output_dir / MARKDOWN_FILE, table_markdown(payload))
    return Path(json_path), Path(md_path)
