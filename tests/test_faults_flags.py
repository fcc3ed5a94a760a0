"""Fault injection, flags: bad values from the command line or YAML end in one ``error:`` line (exit 2)
before a model is built, the same for both sources; values that break memory or numerics later (absurd epochs,
huge learning rates, ``--model_overrides`` values, image sizes against the patch, a relaunch asking for fewer
epochs than done) are refused before anything is written, in every driver they apply to.
"""

from __future__ import annotations

import pytest
import torch

from simpool.dino.run_train import main
from tests.helpers import TINY, photo_folder


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
    ("arch: null", [], "arch: None is not a valid value (this flag needs a value (its default is 'resnet50')"),
    ("lr: null", [], "lr: None is not a valid value (this flag needs a value (its default is 0.3)"),
    ("", ["--epochs", "1000000000000"], "--epochs must be an integer >= 1 and <= 100000000, got 1000000000000"),
    ("", ["--lr", "1e308"], "--lr must be a finite number > 0 and <= 10000, got 1e+308"),
    ("", ["--model_overrides", "depth=abc"], "--model_overrides depth=abc: cannot build this model (TypeError"),
    ("", ["--model_overrides", "depth=-1"], "cannot build this model (RuntimeError: number of steps must be non-neg"),
    ("", ["--model_overrides", "embed_dim=50"], "embed_dim=50: cannot build this model (AssertionError: dim should be"),
    ("", ["--lr", "100", "--weight_decay", "1", "--weight_decay_end", "1"], "x weight decay 1 = 1.5625 > 1 makes the "
                                                                              "decay factor 1 - lr * wd negative"),
    ("", ["--seed", "-1"], "--seed must be an integer >= 0"),
    ("", ["--num_workers", "100000"], "--num_workers must be an integer >= 0 and <= 256"),
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


def test_schedules_longer_than_the_bound_are_refused_before_they_are_allocated(tmp_path, capsys):
    data = photo_folder(tmp_path / "photos")  # 12 images: 3 steps of 4 an epoch
    out = tmp_path / "out"
    assert main([*TINY, "--data_path", str(data), "--epochs", "100000000", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--epochs 100000000 x 3 iterations per epoch = 300,000,000 iterations, more than 100,000,000" in err, err
    assert len(err.strip().splitlines()) == 1 and not (out / "args.yaml").exists()


def test_a_relaunch_with_fewer_epochs_than_done_is_refused_and_keeps_args_yaml(tmp_path, capsys):
    data = photo_folder(tmp_path / "photos")
    out = tmp_path / "run"
    assert main([*TINY, "--data_path", str(data), "--epochs", "2", "--output_dir", str(out)]) == 0
    args_yaml = (out / "args.yaml").read_bytes()
    capsys.readouterr()
    assert main([*TINY, "--data_path", str(data), "--epochs", "1", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has trained 2 epoch(s), more than --epochs 1 asks for: relaunch with --epochs 2 or more" in err, err
    assert (out / "args.yaml").read_bytes() == args_yaml and len(err.strip().splitlines()) == 1
    assert main([*TINY, "--data_path", str(data), "--epochs", "2", "--output_dir", str(out)]) == 0  # done: fine


FINETUNE = ["--random_init", "--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "4", "--model_overrides",
            "depth=1", "embed_dim=32", "num_heads=2", "--input_size", "16", "--batch_size_per_gpu", "4",
            "--num_workers", "0", "--warmup_epochs", "0", "--precision", "fp32"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr", "inf"], "--lr must be a finite number > 0 and <= 10000, got inf"),
    (["--lr", "1e308"], "--lr must be a finite number > 0 and <= 10000, got 1e+308"),
    (["--epochs", "1000000000000"], "--epochs must be an integer >= 1 and <= 100000000"),
    (["--model_overrides", "depth=-1"], "--model_overrides depth=-1: cannot build this model (RuntimeError"),
    (["--input_size", "30"], "--input_size 30 is not a multiple of the model's patch size 4: use 28 or 32"),
    (["--lr", "1000", "--weight_decay", "1"], "the peak lr 15.625 x weight decay 1 = 15.625 > 1"),
    (["--mixup_mode", "elem", "--batch_size_per_gpu", "3"], "need an even --batch_size_per_gpu, got 3"),
])
def test_fine_tuning_values_that_break_later_exit_2_before_anything_is_written(tmp_path, capsys, flags, message):
    from simpool.finetune.run_finetune import main as finetune

    data = photo_folder(tmp_path / "photos")
    out = tmp_path / "ft"
    assert finetune([*FINETUNE, "--data_path", str(data), "--output_dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_fine_tuning_relaunched_with_fewer_epochs_is_refused_and_keeps_args_yaml(tmp_path, capsys):
    from simpool.finetune.run_finetune import main as finetune

    data = photo_folder(tmp_path / "photos")  # 12 train images: 3 steps of 4 an epoch
    flags = [*FINETUNE, "--data_path", str(data), "--output_dir", str(tmp_path / "ft"), "--mixup", "0",
             "--cutmix", "0"]
    assert finetune([*flags, "--epochs", "2", "--exit_after_iterations", "4"]) == 0  # 1 epoch and 1 step
    args_yaml = (tmp_path / "ft" / "args.yaml").read_bytes()
    capsys.readouterr()
    assert finetune([*flags, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "has trained 1 epoch(s) and 1 iterations of the next, more than --epochs 1 asks for: relaunch with " \
           "--epochs 2 or more" in err, err
    assert (tmp_path / "ft" / "args.yaml").read_bytes() == args_yaml


@pytest.mark.parametrize("tool", ["eval_knn.py", "eval_linear.py"])
def test_an_image_size_that_is_not_a_multiple_of_the_patch_exits_2_before_extraction(tool, tmp_path, capsys,
                                                                                     monkeypatch):
    from simpool.evaluation import run_knn, run_linear

    module = run_knn if tool == "eval_knn.py" else run_linear
    extracted = []
    monkeypatch.setattr(run_knn, "extract_features", lambda *a, **k: extracted.append(1))
    monkeypatch.setattr(run_linear, "probe_features", lambda *a, **k: extracted.append(1))
    data = photo_folder(tmp_path / "photos")
    flags = ["--random_init", "--arch", "vit_tiny", "--patch_size", "7", "--model_overrides", "depth=1",
             "embed_dim=32", "num_heads=2", "--data_path", str(data), "--image_size", "30", "--num_workers", "0",
             "--output_dir", str(tmp_path / "out")]
    assert module.main(flags) == 2
    err = capsys.readouterr().err
    assert "--image_size 30 is not a multiple of the model's patch size 7: use 28 or 35" in err, err
    assert not extracted and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("flags", "message"), [
    (["--gamma", "nan"], "--gamma must be a finite number > 0, 'None' or 'auto', got nan"),
    (["--model_overrides", "depth=-1"], "with --model_overrides depth=-1: cannot build this model (RuntimeError"),
    (["--model_overrides", "embed_dim=50"], "cannot build this model (AssertionError: dim should be divisible"),
    (["--temperature", "0"], "--temperature must be a finite number >= 1e-30"),
    (["--image_size", "100000"], "--image_size must be an integer >= 1 and <= 8192"),
])
def test_evaluator_model_values_exit_2_before_data_or_weights_are_read(tmp_path, capsys, flags, message):
    from simpool.evaluation.run_knn import main as knn

    assert knn(["--random_init", "--arch", "vit_tiny", "--data_path", str(tmp_path / "absent"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_ranges_say_their_bounds_and_the_lr_checks_compute_them():
    from simpool.run.config import EPOCHS, LEARNING_RATE, ConfigError, check_decoupled_decay, check_scaled_lr

    assert EPOCHS.describe(5) == "an integer >= 1 and <= 100000000"
    assert LEARNING_RATE.describe(0.1) == "a finite number > 0 and <= 10000"
    assert not LEARNING_RATE.contains(float("inf")) and LEARNING_RATE.contains(1e4) and not LEARNING_RATE.contains(0)
    assert check_scaled_lr(0.5, 1024) == 2.0  # 0.5 x 1024 / 256
    with pytest.raises(ConfigError, match="= 40000, above 10000"):
        check_scaled_lr(10000, 1024)
    check_decoupled_decay(2.0, 0.5)  # lr x wd = 1: the decay factor reaches 0, still allowed
    with pytest.raises(ConfigError, match="= 1.5 > 1"):
        check_decoupled_decay(3.0, 0.5)


def test_knn_votes_stay_right_at_temperatures_where_exp_overflows_float32():
    """Against the definition in float64 (where exp(s / T) does not overflow at these T): the same top-1."""
    from simpool.evaluation.knn import knn_predict

    generator = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(60, 8, generator=generator), dim=1)
    test = torch.nn.functional.normalize(torch.randn(20, 8, generator=generator), dim=1)
    labels = torch.randint(0, 4, (60,), generator=generator)
    sims = test.double() @ train.double().T
    top, idx = sims.topk(10, dim=1)
    for T in (0.07, 0.005, 0.002):
        expected = torch.zeros(20, 4, dtype=torch.float64).scatter_add_(1, labels[idx], (top / T).exp())
        assert torch.isfinite(expected).all()
        predicted = knn_predict(train, labels, test, 10, T, num_classes=4)[:, 0]
        assert torch.equal(predicted, expected.argmax(dim=1)), T


def test_yaml_scalars_for_list_flags_read_like_the_command_line(tmp_path):
    from simpool.dino.config import parse_args

    config = tmp_path / "c.yaml"
    config.write_text("data_path: fashion-mnist\narch: vit_tiny\nnb_knn: 5\nmodel_overrides: depth=2\n")
    args = parse_args(["--config", str(config)])
    assert args.nb_knn == [5] and args.model_overrides == {"depth": 2}


def test_weights_that_overflow_are_never_saved_over_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from simpool.dino.step import DINOStep
    from simpool.distributed import unwrap

    data = photo_folder(tmp_path / "photos")  # 3 steps an epoch
    out = tmp_path / "run"
    calls = []
    real_step = DINOStep.__call__

    def step_that_overflows(self, crops, schedule):  # a finite loss whose update overflows, in epoch 1
        stats = real_step(self, crops, schedule)
        calls.append(1)
        if len(calls) == 4:
            next(unwrap(self.student).parameters()).data.fill_(float("inf"))
        return stats

    monkeypatch.setattr(DINOStep, "__call__", step_that_overflows)
    assert main([*TINY, "--data_path", str(data), "--epochs", "2", "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "weights are no longer finite at iteration 6" in err and f"Last good checkpoint: {out}" in err, err
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["student"].values())
