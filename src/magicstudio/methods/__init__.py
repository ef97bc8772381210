"""Methods as peers: MagiCapture, MagicFace, the baselines, MagicTailor, each one folder read top to
bottom, over the shared training layer (``magicstudio.training``). No method imports another.

Importing this package registers every trainable method (``training.registry``); ``METHODS`` / ``get_method``
are that registry, for bench, the toy world and the CLI.
"""

from ..training.registry import METHODS, get_method, shared_presets
from . import magicapture  # noqa: F401,I001  (each peer registers its entries; MagiCapture's first)
from . import baselines  # noqa: F401
from . import magictailor  # noqa: F401

__all__ = ["METHODS", "get_method", "shared_presets"]
