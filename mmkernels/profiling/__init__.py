"""What swapping the layers does to a whole model: time, peak memory and where the time goes,
stock against mmkernels, with the outputs checked to agree.

    mmkernels.profile(model, inputs)  # or: from mmkernels.profiling import profile
    print(profile(model, inputs))                       # a table; the result also has the numbers

Ready-made models (random weights, no downloads) are in mmkernels.profiling.recipes, and the
command line is `mmkernels profile --recipe ... --size tiny|real`.
"""
from mmkernels.profiling.core import profile
from mmkernels.profiling.report import ModeResult, ModuleRow, ProfileResult, speedup_text

__all__ = ["ModeResult", "ModuleRow", "ProfileResult", "profile", "speedup_text"]
