"""The kernel side of a run: start the worker processes and supervise them.

`run` (start_run, the supervisor) → `pool` (warm workers) → `launcher` (one host),
`cluster` (several hosts) or `slurm` (an srun step on a SLURM allocation) → `shipping` (the notebook's names, by value). `ops` builds
DeepSpeed's CPU ops once per machine (`python -m nbtrain.launch.ops`).
"""
