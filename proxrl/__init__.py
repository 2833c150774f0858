"""proxrl: Proximal Policy Optimization from theory to practice."""
import os as _os

# PyTorch's OpenMP threads busy-wait by default; on a shared 2-core machine that made small ops ~90x
# slower. Passive waiting costs nothing measurable here and must be set before torch is imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
