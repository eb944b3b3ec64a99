"""The demo kit: what the example scripts, the notebook, the tests and the benchmarks train and measure with.

None of it is needed to train with [`PBSDTrainer`] on your own model and data. It holds the built-in tasks' data
(`data`), their tiny base models, shipped and checksummed (`tiny`, `base_models`), model and tokenizer loading
(`models`), Avg@k evaluation (`evaluate`), the before/after report (`report`) and the example scripts' shared
arguments and run (`example_args`, `task_example`).
"""
