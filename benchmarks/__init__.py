"""Speed and memory benchmarks of attnflow (probe cost, reducer speed, soak), run by `make bench`.

A plain folder beside the package, not installed with it: run from the repository root
(``python -m attnflow.benchmarks.run``). Every ratio is measured in one process with the methods
alternated, so that a busy machine slows all of them alike.
"""
