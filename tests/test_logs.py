"""simpool.run.log.setup_logging: rank 0 prints INFO to stdout, other ranks only warnings, with their rank."""

import logging
import os
import subprocess
import sys

from simpool.run.log import setup_logging
from tests.helpers import REPO


def test_rank0_prints_info_other_ranks_only_warnings(capsys):
    log = logging.getLogger("simpool.some.module")
    setup_logging(rank=0)
    log.info("hello %s", "world")
    log.debug("not shown")
    assert capsys.readouterr().out == "hello world\n"
    setup_logging(rank=1)  # a second call replaces the handler instead of adding one
    log.info("hidden on rank 1")
    log.warning("disk almost full")
    assert capsys.readouterr().out == "[rank 1] disk almost full\n"
    setup_logging(rank=0)


def test_without_setup_library_logs_do_not_reach_stdout(capsys):
    logger = logging.getLogger("simpool")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = []
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    try:
        logging.getLogger("simpool.x").info("quiet")
        assert capsys.readouterr().out == ""
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def test_a_driver_run_with_python_m_prints_its_results():
    """``python -m simpool.evaluation.attention`` logs as ``__main__``: its table must still reach stdout."""
    command = [sys.executable, "-m", "simpool.evaluation.attention", "--random_init", "--arch", "vit_tiny",
               "--patch_size", "8", "--model_overrides", "depth=1", "--data_path", "fashion-on-photos:4",
               "--image_size", "32"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scoring the attention maps of vit_tiny" in result.stdout and "Jaccard" in result.stdout
