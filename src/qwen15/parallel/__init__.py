"""Scale-out: the parallel layout and its device mesh, tensor parallel (with sequence parallel), a vocabulary-
parallel loss, pipeline stages and schedules, tensor-parallel inference, and per-GPU memory estimates.

Everything is applied from outside an unchanged `qwen15.model.Qwen` (the model holds no parallelism code).
"""

from qwen15.parallel.layout import LayoutError, ParallelLayout, RunMesh, build_mesh

__all__ = ["LayoutError", "ParallelLayout", "RunMesh", "build_mesh"]
