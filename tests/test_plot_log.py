"""utils/plot_log.py: curves.png from the logs a run writes (RunLogger's own files), several runs overlaid."""

from __future__ import annotations

from PIL import Image

from simpool.cli.run_plot_log import main, read_run
from simpool.run.log import RunLogger


def fake_run(folder, loss_scale=1.0):
    """A run's logs written by RunLogger, as train_dino.py writes them (args.yaml gives K)."""
    folder.mkdir()
    (folder / "args.yaml").write_text("out_dim: 1024\n")
    logger = RunLogger(folder)
    logger.log_epoch({"knn_baselines": {"random_init": {"10": [60.8, 90.0]}, "raw_pixels": {"10": [79.1, 95.0]}},
                      "epoch": -1})
    for epoch in range(2):
        for it in range(1, 4):
            step = epoch * 3 + it
            logger.progress(it, 3, epoch, {"loss": loss_scale * 7 / step, "lr": 1e-3, "img/s": 100.0, "data%": 5.0,
                                           "entropy": 6.0, "KL": 1.0 / step, "prototypes": 50.0 + step},
                            step=step, record={"wd": 0.04, "momentum": 0.99 + step / 1000})
        logger.log_epoch({"train_loss": 2.0, "train_entropy": 6.0, "train_KL_div": 0.5, "train_lr": 1e-3,
                          "train_wd": 0.04, "epoch": epoch, "knn": {"10": [65.0 + epoch, 90.0]}})
    return folder


def test_curves_png_of_one_and_of_two_runs(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", loss_scale=2.0)
    capsys.readouterr()  # RunLogger's progress lines, printed when an earlier test set up logging
    run = read_run(a)
    assert run["out_dim"] == 1024 and len(run["steps"]) == 6 and len(run["epochs"]) == 2
    assert run["baselines"]["raw_pixels"]["10"][0] == 79.1
    assert main([str(a)]) == 0
    assert capsys.readouterr().out.strip() == f"curves: {a / 'curves.png'}"
    single = Image.open(a / "curves.png")
    assert single.size[0] > 1000 and len(single.convert("L").getcolors(maxcolors=10**6)) > 20  # drawn, not blank
    assert main([str(a), str(b), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").is_file()


def test_folder_without_logs_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path} has neither log.txt nor progress.jsonl: pass the --output_dir of a train_dino.py run"]
