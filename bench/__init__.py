"""Benchmarks of the contacts service on the embedded stack (``make bench``).

Each benchmark measures a figure and, in the same run on the same machine, the ceiling it
is judged against, then compares the ratio or the latency with a goal. See
docs/BENCHMARKS.md for the figures and what they mean.
"""
