"""Shared fixtures. Tests run offline: no hub, tiny models, bundled photos."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def _tiny_master():
    from magicstudio.models import load_base

    return load_base("tiny")


@pytest.fixture
def tiny(_tiny_master):
    """A fresh copy of the tiny model (tests may add tokens or adapters to it)."""
    return copy.deepcopy(_tiny_master)


@pytest.fixture(scope="session")
def demo_sets(tmp_path_factory):
    """Prepared source and reference folders made from the bundled photos (256 px)."""
    from magicstudio.data.prepare import prepare_folder
    from magicstudio.data.samples import make_demo_sets

    root = tmp_path_factory.mktemp("demo")
    src_raw, ref_raw = make_demo_sets(root / "photos")
    prepare_folder(src_raw, "source", root / "source", size=256, progress=False)
    prepare_folder(ref_raw, "reference", root / "reference", size=256, progress=False)
    return root / "source", root / "reference"
