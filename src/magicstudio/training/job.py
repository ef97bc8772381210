"""The whole personalisation job, the same for every method: open the run, set the method up, train.

``run_method`` = ``personalize.open_run`` (refuse to overwrite, resume with the saved settings, base model,
prepared photo folders), then the method's ``setup`` (what it loads besides: MagiCapture's face encoder, the
baselines' class images), the run's ``config.yaml``, and ``loop.train`` with the config's loop settings.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .runs import RunDir

#: ``setup(run, cfg, comps, source_set, reference_set, device) -> (build, extra)``: ``build()`` makes the
#: ``TrainableMethod`` (after config.yaml is written); ``extra``: more keys for config.yaml
Setup = Callable[..., tuple[Callable[[], object], dict]]


def run_method(source: str | Path, reference: str | Path, out: str | Path, cfg, setup: Setup, *,
               resume: bool = False, progress: bool = True, device=None, named: dict | None = None) -> RunDir:
    """Train the method ``setup`` makes into the run folder ``out`` (``resume`` continues an unfinished one).

    ``named`` ({name: folder}) instead of ``source`` / ``reference``: a method with other photo sets (see
    ``personalize.open_run``); ``setup`` then gets ``{name: ConceptSet}`` in place of the source set and None."""
    from functools import partial

    from .loop import train
    from .distributed import is_main_process, open_run_everywhere
    from .personalize import held_run, open_run, process_device

    if progress and is_main_process():  # before the first step, which may be half a minute away
        print(f"loading the base model ({cfg.model}) and the photos, then the method's own models ...",
              file=sys.stderr, flush=True)
    # only the main process checks, locks and writes the run folder; the other ranks get the same inputs
    opened = open_run_everywhere(partial(open_run, named=named), source, reference, out, cfg, resume, progress)
    if opened is None:
        return RunDir(out)
    run, cfg, comps, source_set, reference_set = opened
    with held_run(run):  # the run folder's lock, held until the outputs are written
        device = device or process_device()
        build, extra = setup(run, cfg, comps, source_set, reference_set, device)
        if is_main_process():
            run.write_config(asdict(cfg) | run.inputs | {"tokens": cfg.tokens()} | dict(extra))
        method = build()
        train(method, run, grad_accum=cfg.grad_accum, checkpoint_every=cfg.checkpoint_every,
              keep_checkpoints=cfg.keep_checkpoints, sample_every=cfg.sample_every, resume=resume,
              mixed_precision=cfg.mixed_precision, log_every=cfg.log_every, progress=progress,
              deterministic=cfg.deterministic)
    return run
