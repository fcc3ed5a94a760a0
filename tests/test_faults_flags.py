"""Fault injection, flags: bad values from the command line or YAML end in one ``error:`` line (exit 2)
before a model is built, the same for both sources.
"""

from __future__ import annotations

import pytest

from simpool.dino.run_train import main
from tests.helpers import (
    TINY,
)


# ---------------------------------------------------------------------------------------------------------
# the same checks for the command line and YAML, before a model is built
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("yaml_line", "flags", "message"), [
    ("epochs: ten", [], "epochs: 'ten' is not a valid value"),
    ("batch_size_per_gpu: 8.5", [], "batch_size_per_gpu: 8.5 is not a valid value"),
    ("precision: fp8", [], "invalid choice: 'fp8'"),
    ("use_bn_in_head: maybe", [], "expected True or False"),
    ("data_path: {a: 1}", [], "expected a single value, got a mapping"),
    ("global_crops_scale: 0.4", [], "--global_crops_scale must be two numbers"),
    ("epochs: [1, 2", [], "is not valid YAML at line"),
    ("", ["--lr", "nan"], "--lr must be a finite number > 0 and <= 10000, got nan"),
    ("", ["--teacher_temp", "0"], "--teacher_temp must be a finite number >= 1e-30 and <= 1e+30"),
    ("", ["--local_crops_size", "10"], "--local_crops_size 10 is not a multiple of --patch_size 4"),
    ("", ["--model_overrides", "depht=1"], "does not accept depht (did you mean depth?)"),
    ("warmup_teacher_temp: .nan", [], "--warmup_teacher_temp must be a finite number >= 1e-30 and <= 1e+30, got nan"),
])
def test_bad_values_from_yaml_or_command_line_exit_2_in_one_line_before_any_model(
        tmp_path, monkeypatch, capsys, yaml_line, flags, message):
    import simpool.dino.build as build

    built = []
    monkeypatch.setattr(build, "build_student_teacher", lambda *a, **k: built.append(1))
    config = tmp_path / "c.yaml"
    config.write_text(f"{yaml_line}\n")
    base = [*TINY, "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    assert main([*base, "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not built and not (tmp_path / "out").exists()


def test_yaml_scalars_for_list_flags_read_like_the_command_line(tmp_path):
    from simpool.dino.config import parse_args

    config = tmp_path / "c.yaml"
    config.write_text("data_path: fashion-mnist\narch: vit_tiny\nnb_knn: 5\nmodel_overrides: depth=2\n")
    args = parse_args(["--config", str(config)])
    assert args.nb_knn == [5] and args.model_overrides == {"depth": 2}
