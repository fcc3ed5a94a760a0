"""Fault injection, exports: written whole (a failure between the files leaves the previous export as it was, a
kill leaves no working folder behind the next export), files of another model never left behind, files with the
process umask, a folder of other files never replaced; a damaged ``config.json`` (wrong types, missing fields,
keywords of another family, file names outside the folder) is one line from every loader.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

import simpool.export as export
from simpool.cli.run_export import main as export_main
from simpool.loading import load_backbone, load_model
from simpool.models import build_backbone

TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2}


def _checkpoint(folder: Path, mode: str) -> Path:
    model = build_backbone("vit_tiny", mode=mode, patch_size=8, **TINY)
    path = folder / f"{mode}.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "args": {"arch": "vit_tiny", "mode": mode, "patch_size": 8, "model_overrides": TINY}}, path)
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_failure_between_the_files_leaves_the_previous_export_as_it_was(tmp_path, monkeypatch, capsys):
    out = tmp_path / "export"
    assert export_main([str(_checkpoint(tmp_path, "official")), str(out)]) == 0
    before = _files(out)
    assert load_backbone(out).mode == "official"

    def refuse(*args):
        raise OSError(28, "No space left on device")  # after model.safetensors, before config.json

    monkeypatch.setattr(export, "_export_classifier", refuse)
    assert export_main([str(_checkpoint(tmp_path, "simpool")), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot write the export {out} (No space left on device" in err and "unchanged" in err, err
    assert _files(out) == before and load_backbone(out).mode == "official"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".export.simpool.lock"]


def test_exporting_another_model_leaves_none_of_the_old_files_and_honours_the_umask(tmp_path):
    out = tmp_path / "export"
    previous = os.umask(0o002)
    try:
        assert export_main([str(_checkpoint(tmp_path, "official")), str(out)]) == 0
        assert (out / "timm_model.safetensors").is_file()
        (out / "knn.json").write_text("{}")  # results of the old model beside it
        assert export_main([str(_checkpoint(tmp_path, "simpool")), str(out)]) == 0
    finally:
        os.umask(previous)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["timm"] is None
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o664}  # not safetensors' 0600
    assert load_backbone(out).mode == "simpool"


def test_a_folder_of_other_files_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert export_main([str(_checkpoint(tmp_path, "simpool")), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{out} exists and is not an export folder (it holds thesis.tex)" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_working_folders_of_a_killed_export_are_removed_by_the_next(tmp_path):
    out = tmp_path / "export"
    stale = tmp_path / ".export.4242-deadbeef.new-export"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    other = tmp_path / ".other.4242-deadbeef.new-export"  # another export's: not ours to remove
    other.mkdir()
    assert export_main([str(_checkpoint(tmp_path, "simpool")), str(out)]) == 0
    assert not stale.exists() and other.exists()


def _damaged(tmp_path: Path, change) -> Path:
    out = tmp_path / "export"
    if not out.exists():
        assert export_main([str(_checkpoint(tmp_path, "simpool")), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    change(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


DAMAGE = {
    "missing arch": (lambda c: c.pop("arch"), "arch is missing"),
    "arch a number": (lambda c: c.update(arch=3), "arch must be a model name, got 3"),
    "unknown arch": (lambda c: c.update(arch="vit_gigantic"), "arch 'vit_gigantic' is neither"),
    "mode": (lambda c: c.update(mode="average"), "mode must be one of simpool, official, got 'average'"),
    "gamma a string": (lambda c: c.update(gamma="1.25"), "gamma must be null or a finite number > 0, got '1.25'"),
    "embed_dim": (lambda c: c.update(embed_dim=-4), "embed_dim must be an integer >= 1, got -4"),
    "keywords of a resnet": (lambda c: c["build_kwargs"].update(layers=[1, 1, 1, 1]),
                             "build_kwargs ['layers'] are not keywords of vit_tiny (vit family)"),
    "family": (lambda c: c.update(family="resnet"), "family 'resnet' is not the family of vit_tiny (vit)"),
    "build_kwargs a list": (lambda c: c.update(build_kwargs=[1]), "build_kwargs must be an object, got [1]"),
    "weights outside": (lambda c: c.update(weights="../../etc/passwd"),
                        "weights must be a file name inside the folder, got '../../etc/passwd'"),
    "version a string": (lambda c: c.update(format_version="1"), "format_version must be an integer, got '1'"),
    "values a constructor refuses": (lambda c: c["build_kwargs"].update(depth=-1),
                                     "(RuntimeError: number of steps must be non-negative)"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_config_json_is_one_line_from_every_loader(case, tmp_path, capsys):
    from simpool.evaluation.run_knn import main as knn

    change, message = DAMAGE[case]
    out = _damaged(tmp_path, change)
    for load in (load_backbone, lambda folder: load_model(folder)):
        with pytest.raises(ValueError) as raised:
            load(out)
        assert message in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
    (tmp_path / "photos" / "train" / "a").mkdir(parents=True)
    code = knn(["--pretrained_weights", str(out), "--data_path", str(tmp_path / "photos")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
