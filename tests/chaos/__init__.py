"""The chaos suite: real dtfd processes under injected faults, checked for linearizability.

`python -m tests.chaos --profile ci|chaos --seed N` runs it; see tests/chaos/run.py.
"""
