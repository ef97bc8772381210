"""An evaluator for the real-Ray bench test (tests/test_baselines.py::test_ray_backend_on_a_local_cluster).

It runs inside Ray workers, which import it by module name (the test puts tests/ on the workers' PYTHONPATH).
It writes the worker's pid into the cell (to prove the cell ran in another process) and fails the custom-diffusion
cell while a file ``FAIL`` exists next to the sweep's ``cells/`` folder."""

from __future__ import annotations

import os
from pathlib import Path


def evaluate(generated, source, reference, prompts=None, metrics=None, face_backend="dlib", **kw):
    cell = Path(generated[0]).parent.parent
    (cell / "evaluated-by.txt").write_text(str(os.getpid()))
    if cell.name == "custom-diffusion" and (cell.parents[2] / "FAIL").exists():
        raise RuntimeError("deliberate evaluation failure")
    n = len(generated)
    summary = {"csim": {"mean": 0.5, "std": 0.0, "n": n, "misses": 0},
               "style": {"mean": 0.5, "std": 0.0, "n": n, "misses": 0},
               "aesthetic": {"error": "no aesthetic head given"}}
    return {"summary": {k: v for k, v in summary.items() if k in metrics},
            "images": [{"file": str(p)} for p in generated], "config": {"prompt": prompts}}
