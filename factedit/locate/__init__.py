"""The locate-then-edit family: `alphaedit`, with `memit` and `rome` as configurations of the same code.

keys (positions.py, reads.py), values (values.py), the solve spread over blocks (method.py); the config
in config.py. The shared machinery (context prefixes, key statistics, null-space and covariance
solves) lives in the core (factedit/core, model, scoring, safety).
"""
