"""A guard against silent breakage (issue 11): the demo's MagiCapture path on the toy world must personalise.

It trains exactly what ``magicstudio demo`` trains (held-out pair 0, the toy settings, ``deterministic=True``) for two
seeds and scores the composed prompt's images with the toy metrics against the un-personalised base model. A library
update or a refactor that stops the placeholder tokens or the LoRA from learning brings toy-Style back to the base
model's level and fails here.

Measured on the locked stack (2026-12-02, 4 images per seed, base model 0.216 toy-Style / 0.373 toy-CSIM):
seed 0: toy-Style 0.328, toy-CSIM 0.343; seed 1: 0.864 / 0.302 (seeds 2, 3: 0.892 / 0.431, 0.815 / 0.423).
With every learning rate set to 0 (nothing learned) toy-Style equals the base model's level and this test fails.
Identity is NOT asserted: in the current toy world the personalised toy-CSIM does not beat the base model's on
average (issue 12: the base model does not draw the identities it is asked for); the figures are printed so the
gap is visible, and the CSIM margin is to be added here once the toy world can show it.
"""

from __future__ import annotations

import pytest

STYLE_MARGIN = 0.2  # mean over seeds 0, 1 measured 0.596 vs 0.216: a margin of 0.38, minus noise


def _scores(paths, src, ref):
    from magicstudio.evaluation import evaluate_images

    s = evaluate_images(paths, src, ref, metrics=["csim", "style"], face_backend="toyworld",
                        clip_model="toyworld")["summary"]
    return s["csim"]["mean"], s["style"]["mean"]


def personalised_scores(root, seeds=(0, 1), **extra):
    from magicstudio.data import toyworld as tw
    from magicstudio.experiments.toyworld.table import TOY_SETTINGS, base_images
    from magicstudio.methods.magicapture import make_config, run_training
    from magicstudio.training.generate import generate

    src = tw.write_concept_set(tw.concept_set("identity", 0, 5), root / "source", "source")
    ref = tw.write_concept_set(tw.concept_set("style", 0, 5), root / "reference", "reference")
    base = _scores(base_images(root / "base", 4, steps=25, guidance=5.0), src, ref)
    runs = []
    for seed in seeds:
        settings = {**TOY_SETTINGS["*"], **TOY_SETTINGS["magicapture"], "seed": seed, "deterministic": True, **extra}
        run = run_training(src, ref, root / f"run-{seed}", make_config("smoke", **settings), progress=False)
        paths = generate(run.path, root / f"gen-{seed}", num_images=4, steps=25, guidance=5.0)
        runs.append(_scores(paths, src, ref))
    return base, runs


@pytest.mark.slow
def test_the_demo_path_personalises_the_style(tmp_path):
    base, runs = personalised_scores(tmp_path)
    style = sum(r[1] for r in runs) / len(runs)
    csim = sum(r[0] for r in runs) / len(runs)
    print(f"base toy-CSIM {base[0]:.3f} toy-Style {base[1]:.3f}; personalised (mean of {len(runs)} seeds) "
          f"toy-CSIM {csim:.3f} toy-Style {style:.3f}; per seed {runs}")
    assert style >= base[1] + STYLE_MARGIN, (f"personalisation no longer learns the style: toy-Style {style:.3f} vs "
                                             f"the base model's {base[1]:.3f}")
