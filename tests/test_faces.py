"""Face analysis on the bundled real photos with the default mediapipe backend."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from magicstudio.data.faces import Face, FaceAnalysis, MediapipeFaceAnalyzer, choose_main
from magicstudio.data.images import crop_square_around, load_image
from magicstudio.data.samples import sample_photos

# Where the faces are (eyes/mouth region) in the bundled photos, checked by eye: catches swapped axes or
# a wrong scale, which the self-consistency checks below would not.
EXPECTED_FACE_CENTRE = {"astronaut.jpg": (225, 120), "grace_hopper.jpg": (265, 235)}


@pytest.fixture(scope="module")
def analyzer():
    with MediapipeFaceAnalyzer() as fa:
        yield fa


@pytest.fixture(scope="module")
def analyses(analyzer) -> dict[str, tuple[Image.Image, FaceAnalysis]]:
    out = {}
    for path in sample_photos():
        img = load_image(path)
        out[path.name] = (img, analyzer.analyze(img))
    return out


def _inside(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    xy = np.round(points).astype(int)
    return mask[xy[:, 1], xy[:, 0]] > 0


@pytest.mark.parametrize("name", list(EXPECTED_FACE_CENTRE))
def test_face_landmarks_and_masks_on_real_photos(analyses, name):
    img, a = analyses[name]
    w, h = img.size
    assert (a.width, a.height) == (w, h) and len(a.faces) == 1 and a.main == 0 and a.notes == []
    face = a.face
    assert face.refined and face.mesh.shape == (478, 2) and 0.5 < face.score <= 1
    lm = face.landmarks5
    assert lm.shape == (5, 2)
    x0, y0, x1, y1 = face.box
    eyes_mouth = lm[[0, 1, 3, 4]]
    assert np.all((eyes_mouth[:, 0] > x0) & (eyes_mouth[:, 0] < x1) & (eyes_mouth[:, 1] > y0) & (eyes_mouth[:, 1] < y1))
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # image-left first
    assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1])  # eyes above nose above mouth
    centre = lm.mean(axis=0)
    assert np.linalg.norm(centre - EXPECTED_FACE_CENTRE[name]) < 25

    for m in (a.face_mask, a.head_mask, a.person_mask):
        assert m.shape == (h, w) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    assert _inside(a.face_mask, lm).all()
    face_area = (a.face_mask > 0).mean()
    assert 0.02 < face_area < 0.4
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]])
    clothes = np.array([[w / 2, h - 5], [w / 2, y1 + 0.8 * (y1 - y0)]])  # bottom centre, chest
    assert not _inside(a.face_mask, np.vstack([corners, clothes])).any()

    face, head, person = a.face_mask > 0, a.head_mask > 0, a.person_mask > 0
    assert head[face].all() and head.mean() > 1.3 * face.mean()
    above = np.array([[centre[0], y0 - 0.15 * (y1 - y0)]])  # hair or headwear just above the face box
    assert _inside(a.head_mask, above).all() and not _inside(a.face_mask, above).any()
    assert not _inside(a.head_mask, clothes).any()
    assert person[face].mean() > 0.99 and person.mean() > head.mean()
    assert not _inside(a.person_mask, corners[:2]).any()  # top corners are background


def test_no_face_in_blank_or_noise(analyzer):
    rng = np.random.default_rng(0)
    for arr in (np.full((240, 320, 3), 128, np.uint8), rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)):
        assert analyzer.detect(arr) == [] and analyzer.main_face(arr) is None
        a = analyzer.analyze(arr)
        assert a.face is None and a.main is None and a.faces == []
        assert a.face_mask.max() == 0 and a.head_mask.max() == 0 and a.face_mask.shape == arr.shape[:2]


def test_several_faces_main_is_largest_and_reported(analyzer):
    small, large = (load_image(p) for p in sample_photos())  # astronaut's face is half Grace Hopper's
    both = Image.new("RGB", (1024, 600), "white")
    both.paste(small, (0, 44))
    both.paste(large, (512, 0))
    a = analyzer.analyze(both)
    assert len(a.faces) == 2 and a.faces[0].box[0] < a.faces[1].box[0]  # sorted left to right
    assert a.main == 1 and any("2 faces" in n for n in a.notes)
    assert _inside(a.face_mask, a.face.landmarks5).all()
    assert a.face_mask[:, :512].max() == 0  # the mask is the chosen face's only
    assert a.head_mask[:, :512].max() == 0


def test_choose_main_prefers_central_over_slightly_larger_border_face():
    def face(x0, y0, side):
        return Face(np.array([x0, y0, x0 + side, y0 + side], float), 0.9, np.zeros((5, 2)))

    central, border = face(450, 250, 100), face(0, 0, 110)
    assert choose_main([border, central], 1000, 600) == 1
    assert choose_main([border, face(450, 250, 40)], 1000, 600) == 0
    assert choose_main([], 100, 100) is None


def test_face_follows_a_crop_and_mesh_runs_on_small_faces(analyzer, analyses):
    img, a = analyses["astronaut.jpg"]
    crop_img, crop = crop_square_around(img, a.face.box, 2.5, 256)
    moved = a.face.transformed(crop.matrix)
    assert np.allclose(moved.landmarks5, crop.map_points(a.face.landmarks5))
    again = analyzer.main_face(crop_img)
    assert again is not None and np.abs(again.landmarks5 - moved.landmarks5).max() < 6

    tiny = img.resize((128, 128), Image.Resampling.LANCZOS)  # face about 24 px wide
    face = analyzer.main_face(tiny)
    assert face is not None and face.refined
    assert np.abs(face.landmarks5 - (a.face.landmarks5 + 0.5) / 4 + 0.5).max() < 3


def test_analyzer_can_close_and_be_reused():
    fa = MediapipeFaceAnalyzer()
    img = load_image(sample_photos()[1])
    first = fa.main_face(img)
    fa.close()
    second = fa.main_face(img)
    fa.close()
    assert first is not None and second is not None and np.allclose(first.landmarks5, second.landmarks5)
