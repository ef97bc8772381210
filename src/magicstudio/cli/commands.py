"""Imports every command module so each registers its commands on ``main.app``."""

from . import prepare  # noqa: F401
from . import models  # noqa: F401
from . import capture  # noqa: F401
from . import demo  # noqa: F401
from . import face  # noqa: F401
from . import evaluate  # noqa: F401
from . import bench  # noqa: F401
from . import postprocess  # noqa: F401
from . import toyworld  # noqa: F401
from . import tailor  # noqa: F401
