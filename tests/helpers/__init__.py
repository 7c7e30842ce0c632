"""Shared test helpers: finished trial folders built and read through the trial store, and the
tiny grids several test modules (and benchmarks/probe_faults.py) run.

Every call into ``privdom_ray.store`` that a test needs goes through :mod:`helpers.trials` (to
write) or :mod:`helpers.folders` (to read, or to edit a record on purpose), so a change to the
store's signatures or record types touches these modules, not the tests. Tests whose point is
the file layout itself, or damage to specific files, keep their raw file access.

Import the submodules (``from helpers.trials import write_trial``): this package imports
nothing itself, so ``helpers.grids`` stays cheap for the benchmarks that use it.
"""
