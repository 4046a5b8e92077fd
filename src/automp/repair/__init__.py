"""Repair a quantized model by training, ending in the same formats and bytes.

``methods.py`` is the entry point (``repair_``); ``reconstruct.py`` trains block by block (Block-AP,
sign rounding) on ``trainable.py``'s parametrisations; ``e2e.py`` tunes scales end to end;
``schedules.py`` shares training out over the blocks; ``selfgen.py`` samples training text from the
full-precision model itself.
"""

from automp.repair.e2e import E2EConfig
from automp.repair.methods import METHODS, RepairConfig, RepairReport, parse_methods, repair_
from automp.repair.reconstruct import ReconstructConfig

__all__ = ["METHODS", "E2EConfig", "ReconstructConfig", "RepairConfig", "RepairReport", "parse_methods", "repair_"]
