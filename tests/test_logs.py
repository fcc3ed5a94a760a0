"""simpool.logs: rank 0 prints INFO to stdout, other ranks only warnings, with their rank."""

import logging

from simpool.logs import setup_logging


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
