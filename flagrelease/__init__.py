"""flagrelease: ship a large language model onto a new AI chip, verified.

The library is plain Python; Prefect lives only in ``tasks/`` and ``flows/``.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
