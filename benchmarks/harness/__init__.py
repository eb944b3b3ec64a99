"""What the benchmark scripts share: one harness, imported as `harness` (a script's own folder is on Python's import
path, so `python benchmarks/<script>.py` finds it).

- `system`: the machine description, report headers and file names, peak memory, quiet logs, plots, display paths;
- `stats`: mean ± std over seeds, Welch's test, the beyond-seed-spread verdict;
- `budgets`: the training clock, the budget counter (tokens, training time, steps) and its trainer callback, and the
  settings every budgeted training run shares;
- `methods`: the methods the learning benchmarks compare (GRPO, OPSD, SDFT, the PBSD variants), how each is
  configured and built as a real TRL / pbsd-trl trainer, and PBSD's ablations;
- `runs`: run keys, the run cache, the identity of a base model, the smoke-run base model;
- `splits`: the validation and test halves of a task's held-out problems.

The harness uses the package only through its public API and the demo kit (`pbsd_trl.recipes`).
"""
