"""The prompt templates every personalisation method trains and samples with.

MagiCapture's (arXiv 2309.06895, Sec. Method; the authors' code for the wording): ``SOURCE`` for the identity
``<v1>``, ``REFERENCE`` for the style ``<v2>``, ``COMPOSED`` for both; ``OBJECT_*`` for the supplement's
general-object mode (``{cls}``: the class word). The baselines use the same ones (the first of each kind, or a
random one per example), so every run folder is sampled with the same composed prompt.
"""

from __future__ import annotations

SOURCE_TEMPLATES = [
    "a photo of a {v1} person",
    "a close-up photo of a {v1} person",
    "a portrait of a {v1} person",
    "a photo of the face of a {v1} person",
]
REFERENCE_TEMPLATES = [
    "a painting of a person in the style of {v2}",
    "a photo of a person in the style of {v2}",
    "a portrait of a person in the style of {v2}",
    "an image of a person in the {v2} style",
]
COMPOSED_TEMPLATES = [
    "a photo of a {v1} person in the style of {v2}",
    "a portrait of a {v1} person in the style of {v2}",
    "a painting of a {v1} person in the style of {v2}",
    "an image of a {v1} person in the {v2} style",
]
OBJECT_SOURCE_TEMPLATES = ["a photo of a {v1} {cls}", "a close-up photo of a {v1} {cls}"]
OBJECT_REFERENCE_TEMPLATES = ["a photo in the style of {v2}", "a picture in the {v2} style"]
OBJECT_COMPOSED_TEMPLATES = ["a photo of a {v1} {cls} in the style of {v2}", "a {v1} {cls} in the {v2} style"]


def composed_prompt(v1: str, v2: str, mode: str = "portrait", object_class: str = "object") -> str:
    """The first composed template: what a run is sampled with by default."""
    t = OBJECT_COMPOSED_TEMPLATES[0] if mode == "object" else COMPOSED_TEMPLATES[0]
    return t.format(v1=v1, v2=v2, cls=object_class)
