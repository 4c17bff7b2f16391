"""The in-process grid, installed with fedseal as :mod:`fedseal.simulations.local_grid` (``fedseal
audit`` drives a site with it); this name stays for the tests and benchmarks that import it."""

from fedseal.simulations.local_grid import RUN_ID, LocalGrid

__all__ = ["LocalGrid", "RUN_ID"]
