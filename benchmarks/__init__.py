"""asv benchmarks for fastsce (``asv run``; see asv.conf.json at the repository root).

Each ``bench_<family>.py`` times fastsce beside the NumPy code a user would otherwise
write, on the shapes of the performance targets. The default parameter set is small so
that ``asv run --quick`` of the whole suite stays under a few minutes;
``FASTSCE_ASV_FULL=1`` selects every shape and both dtypes.
"""
