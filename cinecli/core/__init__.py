"""The floor everything stands on: errors and exit codes (errors.py), cine's folders (dirs.py), the one timing
mechanism (timing.py) and the one place that chooses device and dtype and probes memory (devices.py).
Imports nothing else of cine's.
"""
