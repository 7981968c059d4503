"""Tools beside the four entry points (train, evaluate, predict, export), each run as
`python -m mixer_jax.tools.NAME`: summary (parameters and FLOPs of a variant), memory
(the compiled step's device memory for a config and device count), benchmark (step and
input-pipeline throughput) and plot (training curves from metrics.jsonl to a PNG)."""
