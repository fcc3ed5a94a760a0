"""The run layer: what every command-line driver shares (below ``dino/``, ``finetune/`` and ``evaluation/``).

* :mod:`simpool.run.config`: ``FlagParser``, ``--config`` YAML, ``check_ranges`` and the named ranges (``EPOCHS``,
  ``LEARNING_RATE``, ``TEMPERATURE``, ``IMAGE_SIDE``, ``WORKERS``, ``SEED``), the lr / schedule bounds, ``bad_input``
* :mod:`simpool.run.flags`: argument types, model / weights / data flags, ``backbone_parameters``
* :mod:`simpool.run.process`: ``start_process`` / ``end_process``, the ``driver`` wrapper of every ``main``
* :mod:`simpool.run.output` / :mod:`simpool.run.lock`: output folders checked before the work, one run per folder
* :mod:`simpool.run.model_check`: models built on the meta device (their values, their size), image size vs patch
* :mod:`simpool.run.stop`: signals (SIGTERM / SIGUSR1 / SIGINT), the agreed stop, ``exit_code``
* :mod:`simpool.run.state`: the run checkpoint; :mod:`simpool.run.resume_checks`: "same weights, same flags, same
  data" before a resume; :mod:`simpool.run.items`: per-item results of an evaluator, so that a rerun skips them

What a driver calls, in order (``simpool/evaluation/run_knn.py`` is a short example)::

    @driver                                           # Ctrl-C -> one line, exit 130; locks released at the end
    def main(argv=None) -> int:
        args = parse_over_config(parser, argv)        # or parser.parse_args: FlagParser errors are one line
        check_ranges(args, {"epochs": EPOCHS, "image_size": IMAGE_SIDE, "num_workers": WORKERS, ...})
        control = StopControl()                       # only drivers with a loop of steps that can save
        dist_info = start_process(args.dist_url)
        output = OutputFolder(args.output_dir, need_bytes=...).check()   # writable, room, locked if it exists
        backbone_parameters(args)                     # --model_overrides values, before data or weights
        ...                                           # data, model; check_image_size(model, args.image_size)
        output.claim()                                # creates + locks the folder; RunCheckpoint.prepare_folder()
        ...                                           # the work; loops agree through control.agree(...)
        end_process()
        return exit_code(run_end, dist_info.rank)     # 0, or 130 after Ctrl-C (writes the preemption marker)

Every ``ValueError`` raised before the work (``ConfigError``, ``DataError``, ``CheckpointError``, ``FolderInUse``)
goes through ``bad_input``: one ``error:`` line, exit 2.
"""

from simpool.run.items import ItemResults, shard
from simpool.run.resume_checks import changes, refuse_changes, weights_identity

__all__ = ["ItemResults", "changes", "refuse_changes", "shard", "weights_identity"]
