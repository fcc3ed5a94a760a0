"""``simpool-benchmark``: SimPool's tables for several weights from one suite YAML (the command line is
:mod:`simpool.evaluation.run_benchmark`).

* :mod:`~simpool.evaluation.benchmark.registry`: the evaluators the benchmark knows (a driver, its result file, its
  data flags, the table columns it fills); adding an evaluator is one entry there
* :mod:`~simpool.evaluation.benchmark.suite`: the suite YAML (which evaluators, their data under the root, their flags)
* :mod:`~simpool.evaluation.benchmark.rows`: a row per weights (and their random-init twins)
* :mod:`~simpool.evaluation.benchmark.cells`: a cell per (row, entry): skipped, done or run, resumable
* :mod:`~simpool.evaluation.benchmark.table`: ``benchmark.md`` and ``benchmark.json``
"""
