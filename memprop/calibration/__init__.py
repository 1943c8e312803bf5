"""This machine's measured speed (rates, pointwise timings) and the cache file that keeps it:
below tracing, planning and distributing, which all price by it."""
