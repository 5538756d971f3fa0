"""Side-by-side benchmarks: the agent against the floor and its peers, as ratios from one run.

``make bench`` (``python -m bench``) runs them all, prints a table and writes
``bench/results.json``. Benchmarks are not tests: nothing here is collected by pytest.
"""
