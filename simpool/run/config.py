"""Command lines of every driver: the parser, ``--config`` YAML files under the flags, range checks, bad input.

One way for every driver (``train_dino.py``, ``finetune.py``, the evaluators) to read its flags:

* :class:`FlagParser` is an ``argparse.ArgumentParser`` whose errors are one ``error: ...`` line (exit 2);
* :func:`parse_over_config` is timm's two-pass parse: a first pass reads only ``--config``; the file's values,
  each checked by the parser itself exactly as if it had been typed (``epochs: 7.5`` fails like ``--epochs 7.5``),
  become the parser's defaults (``set_defaults``); the full parse then lets every flag on the command line win;
* :func:`check_ranges` stops on values a flag's type accepts but the run cannot use (``--lr nan``, ``--epochs 0``);
* :func:`bad_input` reports a user's mistake as one line and returns the exit code;
* :func:`flags_record` / :func:`write_args_yaml`: the resolved flags as plain values (``args.yaml``, checkpoints).

Example:
    >>> parser = FlagParser("my tool")
    >>> parser.add_argument("--config", default=None)
    >>> parser.add_argument("--epochs", type=int, default=100)
    >>> args = parse_over_config(parser, ["--config", "recipe.yaml", "--epochs", "3"])   # 3 wins over the file
    >>> check_ranges(args, {"epochs": AT_LEAST_ONE})
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from simpool.checkpoint import atomic_write_text

__all__ = ["AT_LEAST_ONE", "EPOCHS", "FINITE", "IMAGE_SIDE", "LEARNING_RATE", "MAX_LR", "MAX_SCHEDULE_ITERATIONS",
           "NON_NEGATIVE", "POSITIVE", "SEED", "TEMPERATURE", "UNIT_INTERVAL", "WORKERS", "ConfigError",
           "FlagParser", "Range", "bad_input", "check_decoupled_decay", "check_ranges", "check_scaled_lr",
           "check_schedule_length", "flags_record", "load_yaml_flags", "parse_over_config", "write_args_yaml"]


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag and what to give instead."""


class FlagParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose mistakes are one ``error: ...`` line and exit code 2 (no usage block, as
    for every other bad input of the tools); while ``raising`` is set they raise :class:`ConfigError` instead
    (how :func:`load_yaml_flags` checks a file's values one by one)."""

    raising = False

    def error(self, message: str) -> NoReturn:
        if self.raising:
            raise ConfigError(message)
        bad_input(f"{message} (see {self.prog} --help)")
        sys.exit(2)


class _YamlLoader(yaml.SafeLoader):
    """Safe YAML that also reads the ``!!python/tuple`` tags PyYAML writes for the fork's tuples."""


_YamlLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))


def _as_token(value: Any) -> str:
    """A YAML scalar as it would be typed (``true`` -> ``True``, ``{depth: 2}`` -> ``depth=2``)."""
    if isinstance(value, Mapping):
        raise TypeError("mapping")
    return str(value)


def _tokens(key: str, value: Any) -> list[str]:
    """The command-line words that give flag ``key`` the YAML value ``value``."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    words = []
    for item in items:
        if isinstance(item, Mapping):  # key=value flags (--model_overrides depth=2 layers=[1,1])
            words += [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                      for k, v in item.items()]
        else:
            words.append(_as_token(item))
    return [f"--{key}", *words]


def _parse_one(parser: FlagParser, key: str, value: Any, defaults: Mapping[str, Any]) -> Any:
    """``value`` converted and checked by ``parser`` as ``--key value`` would be; raises ConfigError(reason)."""
    if value is None:  # null: "no value" where the flag has none by default or its type reads None
        if defaults[key] is None:
            return None
        try:
            converted = _parse_one(parser, key, "None", defaults)
        except ConfigError:
            converted = "not None"
        if converted is None:
            return None
        raise ConfigError(f"this flag needs a value (its default is {defaults[key]!r}): give one or leave {key} out")
    parser.raising = True
    try:
        parsed = getattr(parser.parse_args(_tokens(key, value)), key)
    except ConfigError as err:
        reason = str(err)
        if isinstance(value, list | tuple) and "unrecognized arguments" in reason:
            reason = "expected a single value, got a list"
        raise ConfigError(reason.removeprefix(f"argument --{key}: ")) from None
    finally:
        parser.raising = False
    takes_mappings = isinstance(parsed, dict) or (isinstance(parsed, list) and parsed and isinstance(parsed[0], dict))
    if isinstance(value, Mapping) and not takes_mappings:
        raise ConfigError("expected a single value, got a mapping")
    return parsed


def load_yaml_flags(parser: FlagParser, path: str | os.PathLike) -> dict[str, Any]:
    """The flags a YAML file sets, by name, each converted and checked by ``parser`` as if typed (``--config``).

    The file must be a mapping of flag names (without ``--``) to values; a ``config`` key (a saved ``args.yaml``
    names the file it came from) is ignored. Lists give several values (``nb_knn: [10, 20]``), a scalar one
    (``nb_knn: 10``), a mapping ``key=value`` words (``model_overrides: {depth: 2}``), ``null`` no value where
    the flag allows none.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {str(path)!r} does not exist")
    try:
        with path.open() as f:
            values = yaml.load(f, Loader=_YamlLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--config: {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of flag names to values")
    defaults = vars(parser.parse_args([]))  # every flag's name (dest) and default
    unknown = sorted(str(k) for k in set(values) - set(defaults))
    if unknown:
        raise ConfigError(f"--config: {path} has unknown flags {unknown}")
    converted = {}
    for key, value in values.items():
        if key == "config":
            continue
        try:
            converted[key] = _parse_one(parser, key, value, defaults)
        except ConfigError as err:
            raise ConfigError(f"--config: {path}: {key}: {value!r} is not a valid value ({err})") from None
    return converted


def parse_over_config(parser: FlagParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` over the values of the ``--config`` YAML file ``argv`` names, if any.

    timm's pattern: a first parse reads only ``--config``; the file's values become the parser's defaults
    (``set_defaults``), so the full parse lets every flag typed on the command line win.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", type=str, default=None)
    config, _ = config_parser.parse_known_args(argv)
    if config.config:
        parser.set_defaults(**load_yaml_flags(parser, config.config))
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# ranges
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """The values a numeric flag may take: finite, within ``[low, high]`` (ends excluded when ``*_open``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self, value: Any) -> str:
        def number(bound: float) -> str:
            return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e12 else f"{bound:g}"

        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {number(self.low)}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {number(self.high)}")
        kind = "an integer" if isinstance(value, int) and not isinstance(value, bool) else "a finite number"
        return f"{kind} {' and '.join(bounds)}".strip()


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
UNIT_INTERVAL = Range(0, 1)
FINITE = Range()

# Upper bounds where a value breaks memory or numerics (benchmarks/numeric_limits.py measures the numerics).
# Per-iteration schedules are float64 arrays of epochs x iterations per epoch (4 of them in DINO): 10^8 iterations
# (3.2 GB of schedules; 800 ImageNet epochs at a global batch of 16 are 6.4 x 10^7) is the most a run may ask.
MAX_SCHEDULE_ITERATIONS = 100_000_000
EPOCHS = Range(1, MAX_SCHEDULE_ITERATIONS)
# The peak lr, after the linear scaling rule: the demo ViT's weights turn non-finite within 3 steps from 1e6 with
# AdamW (1e10 with SGD or LARS); 1e4 keeps two orders of magnitude below that.
MAX_LR = 1e4
LEARNING_RATE = Range(0, MAX_LR, low_open=True)
# Temperatures divide float32 logits / cosine similarities: the DINO loss turns non-finite at 1e-39 (float32's
# smallest numbers); above 1e30 every distribution is uniform to float32 precision anyway.
TEMPERATURE = Range(1e-30, 1e30)
# Image sides: a 3 x 8192 x 8192 float32 crop is 0.8 GB; larger ones exhaust memory before they help.
IMAGE_SIDE = Range(1, 8192)
# Loader processes per rank: more than any node has cores only exhausts process and memory limits.
WORKERS = Range(0, 256)
# numpy's generators take seeds in [0, 2^32); ranks add their index.
SEED = Range(0, 2**32 - 2**16)


def check_ranges(args: argparse.Namespace, ranges: Mapping[str, Range]) -> None:
    """Raise ``ConfigError("--name must be <range>, got <value>")`` for the first flag outside its range
    (every value of a list flag is checked; None, "no value", is left to the driver)."""
    for name, allowed in ranges.items():
        value = getattr(args, name)
        for item in value if isinstance(value, list | tuple) else [value]:
            if item is not None and not allowed.contains(item):
                raise ConfigError(f"--{name} must be {allowed.describe(item)}, got {value}")


def check_schedule_length(epochs: int, niter_per_epoch: int) -> None:
    """Refuse schedules longer than :data:`MAX_SCHEDULE_ITERATIONS` before any is allocated."""
    total = int(epochs) * int(niter_per_epoch)
    if total > MAX_SCHEDULE_ITERATIONS:
        raise ConfigError(f"--epochs {epochs} x {niter_per_epoch} iterations per epoch = {total:,} iterations, more "
                          f"than {MAX_SCHEDULE_ITERATIONS:,} (the per-iteration schedules alone would need "
                          f"{total * 32 / 2**30:,.0f} GiB): lower --epochs or raise the batch size")


def check_scaled_lr(lr: float, global_batch: int, flag: str = "--lr") -> float:
    """The peak lr after the linear scaling rule (``lr * global_batch / 256``), refused above :data:`MAX_LR`."""
    scaled = lr * global_batch / 256.0
    if not scaled <= MAX_LR:
        raise ConfigError(f"{flag} {lr:g} x global batch {global_batch} / 256 = {scaled:g}, above {MAX_LR:g}, where "
                          f"the updates themselves overflow float32 weights: lower {flag}")
    return scaled


def check_decoupled_decay(peak_lr: float, weight_decay: float, flags: str = "--lr and --weight_decay") -> None:
    """Weight decay multiplies the weights by ``1 - lr * wd`` every step (AdamW, and SGD's coupled decay to first
    order): above 1 the factor is negative and above 2 it grows the weights geometrically to inf (to non-finite
    losses within 20 steps from lr * wd = 1e12 on the demo ViT); refused above 1."""
    if peak_lr * weight_decay > 1:
        raise ConfigError(f"{flags}: the peak lr {peak_lr:g} x weight decay {weight_decay:g} = "
                          f"{peak_lr * weight_decay:g} > 1 makes the decay factor 1 - lr * wd negative (weights flip "
                          "sign and grow every step): lower one of them")


# ----------------------------------------------------------------------------------------------------------
# reporting and recording
# ----------------------------------------------------------------------------------------------------------
def bad_input(err: Exception | str, code: int = 2) -> int:
    """Report a user's mistake as one line, ``error: ...`` on stderr, and return the exit code (2 by default).

    Every entry point catches the ValueErrors its set-up raises (bad flags, data or weights) and returns this,
    instead of a traceback.
    """
    sys.stderr.write(f"error: {err}\n")  # one write: the ranks of a run share one stream
    return code


def flags_record(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as plain values for files (tuples -> lists, markers such as FROM_CHECKPOINT -> their text)."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if isinstance(value, tuple):
            value = list(value)
        elif value is not None and not isinstance(value, bool | int | float | str | list | dict):
            value = str(value)
        out[key] = value
    return out


def write_args_yaml(folder: str | os.PathLike, args: argparse.Namespace) -> Path:
    """``folder/args.yaml``: the resolved flags (:func:`flags_record`), loadable again with ``--config``."""
    return atomic_write_text(Path(folder) / "args.yaml", yaml.safe_dump(flags_record(args), sort_keys=True))
