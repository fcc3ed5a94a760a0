"""simpool-benchmark's engine: a cell per (row, suite entry), what is done already, running the rest.

A cell is one driver run, ``main(argv)`` of the entry's evaluator (:mod:`simpool.evaluation.benchmark.registry`)
with ``--output_dir OUTPUT/<row>/<entry>/``. Its folder also holds ``benchmark_cell.json``: the cell's *identity*
(evaluator, protocol flags, data paths, inputs, the weights' identity from :mod:`simpool.evaluation.benchmark.rows`),
the command and, once run, its status and seconds. :func:`plan` decides every cell before anything runs:

* ``skipped``: its data is not under the root (or an input entry is skipped): a reason, not a failure;
* ``done``: the identity matches and the driver's finished result file is there: it is read, nothing runs;
* ``pending``: to run; an interrupted run resumes through the driver's own resume (finished images, variants,
  epochs). A folder whose recorded identity differs is refused (``ConfigError``), never mixed or overwritten.

:func:`run_pending` then runs the pending cells in order (an entry's inputs before it), in this process or, under a
``launcher`` (``torchrun --nproc_per_node N``, ``srun python``), as ``<launcher> -m <driver> argv``: each run is a
fresh process group, since one process cannot join a torchrun group twice.

Example:
    >>> cells = plan(read_suite("configs/benchmark_paper.yaml"), build_rows(["runs/vits/checkpoint.pth"]),
    ...              "/data", "runs/bench")
    >>> check_data(cells)                       # DataError before any model is built
    >>> run_pending(cells, after_each=lambda: None)
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpool.checkpoint import atomic_write_text
from simpool.evaluation.benchmark.rows import Row
from simpool.evaluation.benchmark.suite import Entry, Suite, parse_strict
from simpool.run.config import ConfigError
from simpool.run.resume_checks import changes, refuse_changes

__all__ = ["CELL_FILE", "Cell", "check_data", "plan", "read_result", "run_pending", "torchrun_launcher"]

log = logging.getLogger("simpool.evaluation.benchmark.cells")
CELL_FILE = "benchmark_cell.json"


@dataclass
class Cell:
    """One row's run of one suite entry."""

    row: Row
    entry: Entry
    folder: Path
    argv: list[str]
    identity: dict[str, Any]
    status: str = "pending"  # pending | skipped | done (finished earlier) | ran (this time) | failed
    reason: str = ""
    seconds: float | None = None
    result: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def command(self) -> str:
        return shlex.join([sys.executable, "-m", self.entry.evaluator.driver, *self.argv])

    def record(self) -> dict[str, Any]:
        return {"identity": self.identity, "command": self.command, "status": self.status, "reason": self.reason,
                "seconds": self.seconds}


def read_result(folder: Path, entry: Entry) -> dict[str, Any] | None:
    """The driver's finished result in ``folder``, or None (absent, or cut short)."""
    try:
        result = json.loads((folder / entry.results_file).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if isinstance(result, dict) else None


def _read_cell_file(folder: Path) -> dict[str, Any] | None:
    path = folder / CELL_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is unreadable ({err}): move {folder} away to run that cell afresh") from None
    return saved if isinstance(saved, dict) else {}


def plan(suite: Suite, rows: Sequence[Row], data_root: str | Path, output_dir: str | Path,
         options: Sequence[str] = ()) -> list[Cell]:
    """Every cell, row by row in the suite's order, with its status decided from the files (nothing runs).

    ``options``: benchmark-wide words (``--num_workers 4``, ``--no_progress``) passed to the drivers that take them.
    Raises ``ConfigError`` when the root holds none of the suite's data, or a cell folder holds another run's files.
    """
    root, output_dir = Path(data_root), Path(output_dir).absolute()
    if not root.is_dir():
        raise ConfigError(f"--data_root {root} is not a folder: pass the folder holding the data sets")
    missing = {entry.name: entry.missing(root) for entry in suite.entries}
    if all(missing.values()):
        wanted = sorted({path for entry in suite.entries for path in entry.data.values()})
        raise ConfigError(f"--data_root {root} holds none of the data of {suite.path} (it looks for "
                          f"{', '.join(wanted)}): pass the root those paths are under, or write a suite for yours")
    cells: list[Cell] = []
    for row in rows:
        mine: dict[str, Cell] = {}
        for entry in suite.entries:
            folder = output_dir / row.folder_name / entry.name
            inputs = {flag: mine[other].folder for flag, other in entry.inputs.items()}
            argv = entry.argv(root, folder, row.words, inputs, _options_for(entry, options))
            identity = {"evaluator": entry.kind, "flags": entry.flags,
                        "data": {flag: str(path) for flag, path in entry.data_paths(root).items()},
                        "inputs": dict(entry.inputs), "weights": row.identity}
            cell = mine[entry.name] = Cell(row, entry, folder, argv, identity)
            cells.append(cell)
            if missing[entry.name]:
                cell.status, cell.reason = "skipped", f"not under {root}: {', '.join(missing[entry.name])}"
                continue
            skipped_inputs = [other for other in entry.inputs.values() if mine[other].status == "skipped"]
            if skipped_inputs:
                cell.status, cell.reason = "skipped", f"needs entry {skipped_inputs[0]}, which is skipped"
                continue
            saved = _read_cell_file(folder)
            if saved is not None:
                before, now = _flat(saved.get("identity") or {}), _flat(identity)
                names = sorted(set(before) | set(now))  # a flag added or dropped is a change too
                refuse_changes(folder, "results of another benchmark cell",
                               changes({n: before.get(n) for n in names}, {n: now.get(n) for n in names}),
                               fix=f"use another --output_dir, or move {folder} away to run it afresh")
                cell.seconds = saved.get("seconds")
                cell.result = read_result(folder, entry)
                if cell.result is not None:
                    cell.status = "done"
    return cells


def _flat(identity: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"flags": {"image_size": 56}}`` -> ``{"flags.image_size": 56}``: a refusal names the one value that
    changed."""
    out: dict[str, Any] = {}
    for key, value in identity.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _options_for(entry: Entry, options: Sequence[str]) -> list[str]:
    """The words of ``options`` (``--flag [value]`` groups) whose flag the entry's evaluator takes."""
    taken, words, keep = entry.evaluator.options, [], False
    for word in options:
        if word.startswith("--"):
            keep = word[2:] in taken
        if keep:
            words.append(word)
    return words


def check_data(cells: Sequence[Cell]) -> None:
    """Read the data of every entry with a pending cell (the registry's ``check_data``): a wrong layout is a
    ``DataError`` naming the file, before any model is built."""
    checked = set()
    for cell in cells:
        check = cell.entry.evaluator.check_data
        if cell.status != "pending" or check is None or cell.entry.name in checked:
            continue
        checked.add(cell.entry.name)
        try:
            check(parse_strict(cell.entry.evaluator.module.get_args_parser(), cell.argv))
        except ValueError as err:
            raise type(err)(f"entry {cell.entry.name} of the suite: {err}") from None


class _ErrorLines:
    """A stderr that writes through and keeps the lines a driver reports its bad input with (``error: ...``)."""

    def __init__(self, stream) -> None:
        self.stream, self.error_lines, self._line = stream, [], ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        self._line += text
        *lines, self._line = self._line.split("\n")
        self.error_lines += [line for line in lines if line.startswith("error: ")]
        return len(text)

    def __getattr__(self, name: str):  # flush, isatty, encoding, fileno: the real stream's
        return getattr(self.stream, name)


def _run_here(cell: Cell) -> tuple[int, str]:
    errors = _ErrorLines(sys.stderr)
    with contextlib.redirect_stderr(errors):
        try:
            code = cell.entry.evaluator.module.main(cell.argv)
        except SystemExit as err:  # argparse; the suite's flags were parsed already, so unexpected
            code = err.code if isinstance(err.code, int) else 1
        except Exception as err:  # a crash of one evaluator (out of memory, a bug) leaves the others to run
            log.exception("%s / %s crashed", cell.row.name, cell.entry.name)
            return 1, f"{type(err).__name__}: {err}"
    return code, (errors.error_lines[-1].removeprefix("error: ") if errors.error_lines else f"exit code {code}")


def _run_launched(cell: Cell, launcher: Sequence[str]) -> tuple[int, str]:
    command = [*launcher, "-m", cell.entry.evaluator.driver, *cell.argv]
    log.info("%s", shlex.join(command))
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    tail: deque[str] = deque(maxlen=200)
    for line in process.stderr:  # shown as it comes, and kept for the reason of a failure
        sys.stderr.write(line)
        tail.append(line.rstrip("\n"))
    code = process.wait()
    errors = [line.split("error: ", 1)[1] for line in tail if "error: " in line]
    return code, (errors[-1] if errors else f"exit code {code}")


def torchrun_launcher(nproc_per_node: int) -> list[str]:
    """``torchrun --standalone --nproc_per_node N`` with this Python."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]


def run_pending(cells: Sequence[Cell], after_each: Callable[[], None],
                launcher: Sequence[str] | None = None) -> None:
    """Run the pending cells in order; ``after_each()`` after every one (the table is rewritten as it fills)."""
    by_key = {(c.row.name, c.entry.name): c for c in cells}
    for cell in cells:
        if cell.status != "pending":
            continue
        blocked = [other for other in cell.entry.inputs.values()
                   if by_key[(cell.row.name, other)].status not in ("done", "ran")]
        if blocked:
            cell.status, cell.reason = "skipped", f"needs entry {blocked[0]}, which did not finish"
            after_each()
            continue
        log.info("== %s / %s (%s)", cell.row.name, cell.entry.name, cell.entry.kind)
        cell.folder.mkdir(parents=True, exist_ok=True)
        cell.status = "running"
        atomic_write_text(cell.folder / CELL_FILE, json.dumps(cell.record(), indent=2) + "\n")
        start = time.perf_counter()
        code, reason = _run_launched(cell, launcher) if launcher else _run_here(cell)
        cell.seconds = time.perf_counter() - start
        cell.result = read_result(cell.folder, cell.entry) if code == 0 else None
        if cell.result is not None:
            cell.status, cell.reason = "ran", ""
        else:
            cell.status = "failed"
            cell.reason = reason if code else f"finished without writing {cell.entry.results_file}"
            log.warning("%s / %s failed: %s", cell.row.name, cell.entry.name, cell.reason)
        atomic_write_text(cell.folder / CELL_FILE, json.dumps(cell.record(), indent=2) + "\n")
        after_each()
