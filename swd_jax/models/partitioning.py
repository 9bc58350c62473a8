"""Mesh arithmetic the models need under a mesh (the trainer's sharding builds on it)."""
from __future__ import annotations

import numpy as np


def axes_size(mesh, axes) -> int:
    """Devices along mesh axes given as one name, a tuple of names or None (works for abstract meshes too)."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in names]))
