"""Statistics over the flow tables: experiments of replicates, critical exponents, universality.

Everything here reads the parquet tables of `flowscan analyze` (from this or an earlier run)
and returns polars frames; nothing rereads checkpoints.
"""

from flowscan.stats.aggregate import aggregate
from flowscan.stats.compare import compare, sigma_table
from flowscan.stats.critical import CriticalFit, fit_scaling, scaling_function
from flowscan.stats.groups import Grouping

__all__ = ["Grouping", "aggregate", "compare", "sigma_table", "CriticalFit", "fit_scaling", "scaling_function"]
