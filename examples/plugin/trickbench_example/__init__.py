"""An example trickbench plugin (``examples/plugin``): what a user's own task and tricks look like.

- :mod:`trickbench_example.task`: ``mlp_regression``, a student MLP fitting a fixed random teacher
  from a finite, noisy training set (seconds per run on a CPU);
- :mod:`trickbench_example.mixup`: ``mixup``, a task-role trick the task wires into its ``batch``;
- :mod:`trickbench_example.ema_copies`: ``example_ema``, an EMA of the weights written independently
  of ``tricks/ema.py``, and ``example_ema_buggy``, the same with a deliberate, subtle bug — for
  ``bench equiv`` (the equivalence check of re-implementations).

trickbench finds them through the entry points in ``pyproject.toml``; see ``docs/extending.md``.
"""
