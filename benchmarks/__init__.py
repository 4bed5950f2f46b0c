"""asv benchmarks for fastsce (``asv run``; see asv.conf.json at the repository root).

Each ``bench_<family>.py`` times fastsce beside the NumPy code a user would otherwise
write, on the shapes of the performance targets. The default parameter set is small so
that ``asv run --quick`` of the whole suite, compilation included, stays under 5 minutes
on two cores; ``FASTSCE_ASV_FULL=1`` selects every shape and dtype.
"""
