"""A benchmark suite: which evaluators run, on which data under the data root, with which protocol flags.

The YAML (``configs/benchmark_paper.yaml`` is the paper's)::

    title: SimPool (ICCV 2023), Tables 5-7
    entries:                                   # one output folder and one set of columns each
      linear:
        evaluator: linear                      # a key of benchmark.registry.EVALUATORS
        label: ImageNet                        # fills the columns' {label} (default: the entry's name)
        data: {data_path: imagenet}            # the evaluator's data flags: paths under the data root
        flags: {epochs: 100, lr: 0.001}        # its other flags, as its command line takes them
      IN-9:
        evaluator: background_robustness
        data: {data_path: bg_challenge}
        inputs: {probe: linear}                # --probe: the output folder of entry "linear" for the same weights
    published:                                 # optional rows of published numbers, by column
      "DINO ViT-S/16, official (paper)": {IN-9: 95.3}

Every entry's flags are parsed by its driver's own parser (and checked by its flag checks) when the suite is read,
so a wrong name or value is one ``error:`` line naming the suite file and the entry before anything runs.

Example:
    >>> suite = read_suite("configs/benchmark_paper.yaml")
    >>> [entry.name for entry in suite.entries], suite.entries[0].headers()
    (['knn', 'linear', ...], ['k-NN ImageNet'])
"""

from __future__ import annotations

import argparse
import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from simpool.evaluation.benchmark.registry import EVALUATORS, Evaluator
from simpool.run.config import ConfigError

__all__ = ["Entry", "Suite", "parse_strict", "read_suite"]

ENTRY_KEYS = {"evaluator", "label", "data", "flags", "inputs"}
# What the benchmark sets itself for every run: the weights, the model, where results go, the launcher's flags.
RESERVED = {"pretrained_weights", "checkpoint_key", "random_init", "arch", "mode", "gamma", "patch_size",
            "model_overrides", "output_dir", "dist_url", "local_rank", "config"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # an entry's name is its output folder's name


@dataclass(frozen=True)
class Entry:
    """One evaluator run of the suite: its data (paths under the root), protocol flags and inputs."""

    name: str
    kind: str
    label: str
    data: dict[str, str]
    flags: dict[str, Any]
    words: tuple[str, ...]  # the flags as command-line words
    inputs: dict[str, str]  # flag -> name of the entry whose output folder it takes

    @property
    def evaluator(self) -> Evaluator:
        return EVALUATORS[self.kind]

    def headers(self) -> list[str]:
        return [template.format(label=self.label) for template in self.evaluator.columns]

    def data_paths(self, root: str | Path) -> dict[str, Path]:
        """The data flags' paths under ``root`` (absolute paths in the suite are kept)."""
        return {flag: (Path(root) / value).absolute() for flag, value in self.data.items()}

    @property
    def results_file(self) -> str:
        """The driver's result file; ``{flag}`` fields of the registry's name take this entry's flag values (the
        driver's default where the suite gives none): ``retrieval_{dataset}.json`` -> ``retrieval_rparis6k.json``."""
        template = self.evaluator.results_file
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
        if not fields:
            return template
        parser = self.evaluator.module.get_args_parser()
        return template.format(**{name: self.flags.get(name, parser.get_default(name)) for name in fields})

    def missing(self, root: str | Path) -> list[str]:
        """The data paths (as the suite writes them) that do not exist under ``root``."""
        return [self.data[flag] for flag, path in self.data_paths(root).items() if not path.exists()]

    def argv(self, root: str | Path, output_dir: str | Path, weights: Sequence[str],
             inputs: Mapping[str, str | Path] | None = None, options: Sequence[str] = ()) -> list[str]:
        """The driver's command line: the weights' words, the data, the protocol flags, inputs, options."""
        data_words = [w for flag, path in self.data_paths(root).items() for w in (f"--{flag}", str(path))]
        input_words = [w for flag, folder in (inputs or {}).items() for w in (f"--{flag}", str(folder))]
        return [*weights, *data_words, *self.words, *input_words, *options, "--output_dir", str(output_dir)]


@dataclass(frozen=True)
class Suite:
    path: Path
    title: str
    entries: list[Entry]  # dependencies first
    published: dict[str, dict[str, float]]

    def entry(self, name: str) -> Entry:
        return next(e for e in self.entries if e.name == name)

    def headers(self) -> list[str]:
        return [h for entry in self.entries for h in entry.headers()]


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return value


def parse_strict(parser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` raising ``ConfigError`` (a FlagParser would exit)."""
    parser.raising = True
    try:
        return parser.parse_args(argv)
    finally:
        parser.raising = False


def _value_words(key: str, value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    words = []
    for item in items:
        if isinstance(item, dict):
            raise ConfigError(f"{key}: expected a value or a list, got a mapping")
        words.append("None" if item is None else str(item))
    return [f"--{key}", *words]


def _flag_words(parser, base: list[str], flags: Mapping[str, Any]) -> list[str]:
    """The command-line words of ``flags``; ``key: true`` of a switch (``--no_hard``) is the bare flag."""
    words: list[str] = []
    for key, value in flags.items():
        if isinstance(value, bool):
            try:  # a switch parses bare (a True/False flag does not)
                switch = getattr(parse_strict(parser, [*base, f"--{key}"]), key, None) is True
            except ConfigError:
                switch = False
            if switch:
                words += [f"--{key}"] if value else []
                continue
        words += _value_words(key, value)
    return words


def _entry(name: str, spec: Any, where: str) -> Entry:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"{where}: entry name {name!r} must be letters, digits, '_', '.', '+' or '-' (it names "
                          "the entry's output folder)")
    where = f"{where}: entry {name}"
    spec = _mapping(spec, where)
    unknown = sorted(set(spec) - ENTRY_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; an entry takes {sorted(ENTRY_KEYS)}")
    kind = spec.get("evaluator")
    if kind not in EVALUATORS:
        raise ConfigError(f"{where}: unknown evaluator {kind!r}; choose one of {', '.join(EVALUATORS)}")
    evaluator = EVALUATORS[kind]
    data = {str(k): str(v) for k, v in _mapping(spec.get("data"), f"{where}: data").items()}
    flags = dict(_mapping(spec.get("flags"), f"{where}: flags"))
    inputs = {str(k): str(v) for k, v in _mapping(spec.get("inputs"), f"{where}: inputs").items()}
    if "data_path" not in data:
        raise ConfigError(f"{where}: data has no data_path (its data flags: {', '.join(evaluator.data_flags)})")
    for flag in data:
        if flag not in evaluator.data_flags:
            raise ConfigError(f"{where}: data: {flag} is not a data flag of {kind} "
                              f"({', '.join(evaluator.data_flags)}); its other flags go under flags:")
    for flag in inputs:
        if flag not in evaluator.inputs:
            raise ConfigError(f"{where}: inputs: {kind} takes {sorted(evaluator.inputs) or 'no inputs'}, not {flag}")
    missing_inputs = sorted(set(evaluator.inputs) - set(inputs))
    if missing_inputs:
        raise ConfigError(f"{where}: inputs must name the entries that give {kind} its {', '.join(missing_inputs)} "
                          f"(e.g. inputs: {{{missing_inputs[0]}: <a {evaluator.inputs[missing_inputs[0]]} entry>}})")
    clash = sorted((RESERVED | set(evaluator.data_flags) | set(evaluator.inputs)) & set(flags))
    if clash:
        raise ConfigError(f"{where}: flags: {', '.join(clash)} are set by the benchmark (weights, model, output) or "
                          "given under data: / inputs:, not under flags:")
    parser = evaluator.module.get_args_parser()
    base = ["--random_init", "--output_dir", "out", *[w for flag in data for w in (f"--{flag}", "data")],
            *[w for flag in inputs for w in (f"--{flag}", "input")]]
    try:
        words = _flag_words(parser, base, flags)
        args = parse_strict(parser, [*base, *words])
        if evaluator.check_flags:
            getattr(evaluator.module, evaluator.check_flags)(args)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    label = str(spec.get("label", name))
    return Entry(name, kind, label, data, json.loads(json.dumps(flags)), tuple(words), inputs)


def _ordered(entries: dict[str, Entry], where: str) -> list[Entry]:
    """Entries in the suite's order, each after the entries its inputs name."""
    for entry in entries.values():
        for flag, other in entry.inputs.items():
            wanted = entry.evaluator.inputs[flag]
            if other not in entries or entries[other].kind != wanted:
                candidates = ", ".join(e.name for e in entries.values() if e.kind == wanted) or "none"
                raise ConfigError(f"{where}: entry {entry.name}: inputs: {flag}: {other!r} is not a {wanted} entry "
                                  f"of the suite ({candidates})")
    ordered: list[Entry] = []
    visiting: set[str] = set()

    def visit(entry: Entry) -> None:
        if entry in ordered:
            return
        if entry.name in visiting:
            raise ConfigError(f"{where}: entry {entry.name}: its inputs form a cycle")
        visiting.add(entry.name)
        for other in entry.inputs.values():
            visit(entries[other])
        ordered.append(entry)

    for entry in entries.values():
        visit(entry)
    return ordered


def read_suite(path: str | Path) -> Suite:
    """The suite in the YAML file ``path``, every entry checked (``ConfigError`` names the file and entry)."""
    path = Path(path)
    where = f"--suite {path}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist: pass a suite YAML such as configs/benchmark_paper.yaml")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {str(err).splitlines()[0]}") from None
    spec = _mapping(spec, where)
    unknown = sorted(set(spec) - {"title", "entries", "published"})
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; a suite has title, entries and published")
    raw = _mapping(spec.get("entries"), f"{where}: entries")
    if not raw:
        raise ConfigError(f"{where} has no entries: name at least one evaluator run under entries:")
    entries = _ordered({name: _entry(name, value, where) for name, value in raw.items()}, where)
    headers = [h for entry in entries for h in entry.headers()]
    repeated = sorted({h for h in headers if headers.count(h) > 1})
    if repeated:
        raise ConfigError(f"{where}: the columns {repeated} come from several entries: give them different labels")
    published = {}
    for row, values in _mapping(spec.get("published"), f"{where}: published").items():
        values = _mapping(values, f"{where}: published: {row}")
        unknown = sorted(set(values) - set(headers))
        if unknown:
            raise ConfigError(f"{where}: published: {row}: {unknown} are not columns of the suite ({headers})")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values.values()):
            raise ConfigError(f"{where}: published: {row}: values must be numbers")
        published[str(row)] = {k: float(v) for k, v in values.items()}
    return Suite(path, str(spec.get("title") or path.stem), entries, published)
