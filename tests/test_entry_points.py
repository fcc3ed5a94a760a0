"""Every console script of pyproject.toml names a callable ``main`` that exists (checked without reinstalling)."""

from __future__ import annotations

import importlib

import pytest

from tests.helpers import REPO

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_tools_have_entry_points():
    expected = {"simpool-train", "simpool-eval-knn", "simpool-eval-linear", "simpool-export", "simpool-visualize",
                "simpool-attention", "simpool-localization", "simpool-object-discovery",
                "simpool-background-robustness", "simpool-retrieval", "simpool-copy-detection",
                "simpool-video-segmentation", "simpool-benchmark"}
    assert expected <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_entry_point_target_imports_and_is_callable(name):
    module, _, attribute = SCRIPTS[name].partition(":")
    target = getattr(importlib.import_module(module), attribute)
    assert callable(target)


def test_export_entry_point_runs(tmp_path, capsys):
    module, _, attribute = SCRIPTS["simpool-export"].partition(":")
    main = getattr(importlib.import_module(module), attribute)
    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "out")]) == 2
    assert "missing.pth" in capsys.readouterr().err
