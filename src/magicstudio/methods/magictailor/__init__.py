"""MagicTailor: component-controllable personalisation, a concept ``<v0>`` with components ``<v1>``, ... from other
pictures (arXiv 2410.13370; DM-Deg + DS-Bal).

``run_training`` is the whole job as the CLI uses it: prepare the concept and component folders (cached in the
run), make the training masks (concept AND NOT component; the component), then train into a run folder with the
shared loop. Registry entries: the full method and the paper's ablations (no DM-Deg, no DS-Bal, fixed DM-Deg).
"""

from __future__ import annotations

from pathlib import Path

from ...errors import UserError
from ...training.registry import MethodSpec, register
from ...training.runs import RunDir
from .config import PRESETS, TailorConfig, make_config

CONCEPT = "concept"


def component_name(word: str) -> str:
    """The name of a component's photo set (its key in the run's config.yaml)."""
    return f"component_{word}"


def run_training(concept_dir: str | Path, component_dirs: list[str | Path], out: str | Path, cfg: TailorConfig,
                 resume: bool = False, progress: bool = True) -> RunDir:
    """Train MagicTailor on ``concept_dir`` (class word ``cfg.concept_class``) and ``component_dirs`` (one per word of
    ``cfg.component_classes``, in order) into the run folder ``out``."""
    from ...io import atomic_write
    from ...training.job import run_method
    from .masks import build_training_sets, mask_preview
    from .train import MagicTailor

    words = cfg.component_words()
    if len(component_dirs) != len(words):
        raise UserError(f"{len(component_dirs)} component folder(s) for {len(words)} component word(s) "
                        f"({', '.join(words)})")
    named = {CONCEPT: Path(concept_dir), **{component_name(w): Path(d) for w, d in zip(words, component_dirs)}}
    set_words = {CONCEPT: cfg.concept_class.strip(), **{component_name(w): w for w in words}}

    def setup(run, cfg, comps, sets, _unused, device):
        train_sets, left_out = build_training_sets(sets, set_words, CONCEPT, cfg.masks_dir)
        preview = mask_preview(train_sets)
        atomic_write(run.path / "masks-preview.png", lambda p: preview.save(p, format="PNG"))
        extra = {"left_out": left_out, "images": {ts.name: ts.images.names for ts in train_sets}}
        return lambda: MagicTailor(cfg, comps, train_sets, device=device), extra

    return run_method(None, None, out, cfg, setup, resume=resume, progress=progress, named=named)


def _entry(name: str, doc: str, **switches) -> MethodSpec:
    def train(source, reference, out, preset: str = "paper", seed: int = 0, *, resume: bool = False,
              progress: bool = False, **overrides) -> Path:
        """``source``: the concept's folder; ``reference``: the component's folder (or a list, one per word of
        the ``component_classes`` setting)."""
        cfg = make_config(preset, seed=seed, **{**overrides, **switches})
        dirs = list(reference) if isinstance(reference, (list, tuple)) else [reference]
        return run_training(source, dirs, out, cfg, resume=resume, progress=progress).path

    return register(MethodSpec(name, TailorConfig, PRESETS, train,
                               lambda preset="paper", **kw: make_config(preset, **{**kw, **switches}),
                               family="magictailor", switches=switches, doc=doc))


#: the full method and the ablations of the paper (Table 3: w/o DM-Deg, w/o DS-Bal; Fig. 7: fixed intensity)
_entry("magictailor", "full method")
_entry("magictailor-no-dmdeg", "without Dynamic Masked Degradation", use_dmdeg=False)
_entry("magictailor-no-dsbal", "without Dual-Stream Balancing (joint training in the second stage)", use_dsbal=False)
_entry("magictailor-fixed-dmdeg", "DM-Deg with a fixed (not decaying) intensity", dmdeg_dynamic=False)

__all__ = ["TailorConfig", "make_config", "run_training", "component_name", "CONCEPT"]
