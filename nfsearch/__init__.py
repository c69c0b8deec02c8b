"""nfsearch: an offline auto-search compiler for nano-batch pipelines (after NanoFlow, OSDI 2025).

Planning (`models`, `bound`, `solve`) imports no torch; profiling and benchmarks need a GPU.
"""

from __future__ import annotations

__version__ = "0.1.0"
