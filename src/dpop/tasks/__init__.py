"""Builtin tasks: synthetic data with exact answers, for demos, tests and `dpop data make`.

- `dpop.tasks.arithmetic`: multi-step arithmetic word problems, low- and high-edit-distance preference
  pairs built the way the DPOP paper built its MetaMath pairs, and an answer checker.
"""
