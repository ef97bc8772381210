"""The methods MagiCapture's paper compares with (Table 1), one module each, all trainable the same way.

- ``dreambooth``, ``textual-inversion``, ``custom-diffusion``: each module registers its ``MethodSpec``
  (``training.registry``); every run folder satisfies the run-folder contract (``training/runs.py``), so
  ``training.generate.generate`` samples all of them with the composed prompt.

Presets: ``paper`` (the papers' settings) and ``smoke`` (tiny model, a few dozen steps); settings are the fields of
``BaselineConfig`` (``common.py``).
"""

from __future__ import annotations

from . import custom_diffusion, dreambooth, textual_inversion

__all__ = ["custom_diffusion", "dreambooth", "textual_inversion"]
