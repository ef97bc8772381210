"""Face detection, landmarks and face/head/person masks behind a backend-neutral interface.

Conventions (all backends):

- coordinates are pixels of the analysed image with pixel centres at integers, as in
  ``magicstudio.models.face_align`` (a fraction ``f`` of the width is ``f * W - 0.5``);
- ``Face.box`` is ``xyxy`` (may extend past the image border);
- ``Face.landmarks5`` is a float ``(5, 2)`` array in ArcFace order: left eye, right eye, nose tip, left
  mouth corner, right mouth corner, where "left" is image-left for an upright, unmirrored face (that is
  the subject's right eye);
- masks are ``uint8`` ``(H, W)`` arrays in {0, 255} (see ``magicstudio.data.masks``).

The default backend, :class:`MediapipeFaceAnalyzer`, uses the models bundled with mediapipe (offline). A
backend with user weights (RetinaFace, a face parser) implements ``detect``, ``refine`` and
``segment_person``, or overrides ``analyze`` entirely.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np
from PIL import Image

from .images import apply_affine, square_around
from .masks import binarize, dilate, ellipse_mask, empty_mask, polygon_mask

ImageLike = Image.Image | np.ndarray

# ArcFace template proportions: mouth corners sit at +-0.41 eye distance around the mouth centre.
_MOUTH_HALF_WIDTH = 0.41


def rgb_array(image: ImageLike) -> np.ndarray:
    """A contiguous ``uint8`` ``(H, W, 3)`` RGB array from a PIL image or an array."""
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB array (H, W, 3), got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def box_area(box: np.ndarray) -> float:
    return float(max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1]))


def box_intersection(a: np.ndarray, b: np.ndarray) -> float:
    """Area shared by two ``xyxy`` boxes."""
    return float(max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two ``xyxy`` boxes."""
    inter = box_intersection(a, b)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Face:
    """One detected face. ``outline`` is the polygon of the facial region (from a mesh) when known."""

    box: np.ndarray
    score: float
    landmarks5: np.ndarray
    mesh: np.ndarray | None = None
    outline: np.ndarray | None = None

    @property
    def center(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2])

    @property
    def size(self) -> float:
        """The larger side of the box."""
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    @property
    def refined(self) -> bool:
        """True when landmarks and outline come from a face mesh rather than the detector alone."""
        return self.outline is not None

    def face_mask(self, height: int, width: int) -> np.ndarray:
        """The facial region (skin, brows, eyes, nose, mouth up to the hairline): the filled convex outline,
        or the ellipse inscribed in the box when no outline is known."""
        if self.outline is not None:
            return polygon_mask(self.outline, height, width)
        return ellipse_mask(self.box, height, width)

    def transformed(self, matrix: np.ndarray) -> "Face":
        """This face in another image, given the 2x3 affine ``matrix`` (axis-aligned scale + shift)."""
        return Face(
            box=apply_affine(np.asarray(self.box).reshape(2, 2), matrix).reshape(4),
            score=self.score,
            landmarks5=apply_affine(self.landmarks5, matrix),
            mesh=None if self.mesh is None else apply_affine(self.mesh, matrix),
            outline=None if self.outline is None else apply_affine(self.outline, matrix),
        )


@dataclass
class FaceAnalysis:
    """Everything known about the faces of one image. ``main`` indexes ``faces`` (None: no face)."""

    width: int
    height: int
    faces: list[Face]
    main: int | None
    face_mask: np.ndarray
    head_mask: np.ndarray
    person_mask: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def face(self) -> Face | None:
        """The main face, or None when the image has no detectable face."""
        return None if self.main is None else self.faces[self.main]


def choose_main(faces: list[Face], width: int, height: int) -> int | None:
    """Index of the main face: the largest, favouring faces near the centre (a centred face of 80% of
    the size of an off-centre one is preferred when the other is near the border)."""
    if not faces:
        return None
    half_diag = float(np.hypot(width, height)) / 2
    centre = np.array([(width - 1) / 2, (height - 1) / 2])

    def priority(face: Face) -> float:
        off = float(np.linalg.norm(face.center - centre)) / half_diag
        return face.size * (1.0 - 0.5 * min(off, 1.0))

    return int(max(range(len(faces)), key=lambda i: priority(faces[i])))


def landmarks_from_keypoints(
    left_eye: np.ndarray, right_eye: np.ndarray, nose: np.ndarray, mouth: np.ndarray
) -> np.ndarray:
    """5 ArcFace-order landmarks from a detector's eye, nose and mouth-centre keypoints ("left" as in the
    module conventions); the mouth corners are estimated with ArcFace template proportions."""
    left_eye, right_eye, nose, mouth = (np.asarray(p, dtype=np.float64) for p in (left_eye, right_eye, nose, mouth))
    half_mouth = _MOUTH_HALF_WIDTH * (right_eye - left_eye)
    return np.stack([left_eye, right_eye, nose, mouth - half_mouth, mouth + half_mouth])


class FaceAnalyzer(ABC):
    """Backend-neutral face analysis. Subclasses supply detection, per-face refinement and person
    segmentation; ``analyze`` combines them into a :class:`FaceAnalysis`. Use as a context manager, or call
    ``close()``, to release the backend's models."""

    #: how far the hair region reaches, in face-mask sizes: sideways (upper half of the face), above the
    #: face region, and sideways next to the jaw (lower half)
    head_side: float = 0.5
    head_top: float = 0.6
    head_jaw: float = 0.12

    @abstractmethod
    def detect(self, image: ImageLike) -> list[Face]:
        """All faces in the image, with boxes, scores and (possibly rough) landmarks5; no mesh needed."""

    @abstractmethod
    def refine(self, image: ImageLike, face: Face) -> Face:
        """The same face with precise landmarks5 and an ``outline`` (facial-region polygon) when the backend
        can find them; the face unchanged otherwise."""

    @abstractmethod
    def segment_person(self, image: ImageLike) -> np.ndarray:
        """The mask of the people in the image (body, hair, clothes, headwear)."""

    def close(self) -> None:
        """Release models; the analyzer may be used again afterwards (models are then rebuilt)."""

    def __enter__(self) -> "FaceAnalyzer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def main_face(self, image: ImageLike) -> Face | None:
        """The main face (largest, most central), refined, or None when there is no face."""
        arr = rgb_array(image)
        faces = self.detect(arr)
        main = choose_main(faces, arr.shape[1], arr.shape[0])
        return None if main is None else self.refine(arr, faces[main])

    def head_mask(self, face_mask: np.ndarray, person_mask: np.ndarray) -> np.ndarray:
        """Face plus hair (and headwear): person pixels in a box around and above the upper half of the face
        region, and person pixels hugging the lower half (within ``head_jaw`` face widths: hair and ears,
        not shoulders or collars), joined to the face region."""
        ys, xs = np.nonzero(face_mask)
        if xs.size == 0:
            return face_mask.copy()
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        fw, fh = x1 - x0, y1 - y0
        h, w = face_mask.shape
        region = np.zeros_like(face_mask)
        ym = y0 + fh // 2
        region[max(0, int(y0 - self.head_top * fh)):ym,
               max(0, int(x0 - self.head_side * fw)):min(w, int(np.ceil(x1 + self.head_side * fw)))] = 255
        region[ym:y1] |= dilate(face_mask, max(1, round(self.head_jaw * fw)))[ym:y1]
        head = face_mask | (person_mask & region)
        # keep only what touches the face: drops other people and stray segmentation blobs
        _, labels = cv2.connectedComponents((head > 0).astype(np.uint8), connectivity=8)
        touching = np.unique(labels[(face_mask > 0) & (labels > 0)])
        return np.where(np.isin(labels, touching), 255, 0).astype(np.uint8)

    def analyze(self, image: ImageLike, faces: list[Face] | None = None, main: int | None = None) -> FaceAnalysis:
        """Detect (unless ``faces`` is given), choose the main face (unless ``main`` is given), refine it and
        build the face, head and person masks. Without a face, face and head masks are empty."""
        arr = rgb_array(image)
        h, w = arr.shape[:2]
        faces = list(self.detect(arr) if faces is None else faces)
        if main is None:
            main = choose_main(faces, w, h)
        notes: list[str] = []
        if len(faces) > 1 and main is not None:
            notes.append(f"{len(faces)} faces found; using the largest, most central one")
        person = binarize(self.segment_person(arr))
        if main is None:
            return FaceAnalysis(w, h, faces, None, empty_mask(h, w), empty_mask(h, w), person, notes)
        faces[main] = self.refine(arr, faces[main])
        if not faces[main].refined:
            notes.append("face landmarks not found; face mask is an ellipse in the face box")
        face_mask = faces[main].face_mask(h, w)
        person = person | face_mask
        return FaceAnalysis(w, h, faces, main, face_mask, self.head_mask(face_mask, person), person, notes)


def _merge_detections(faces: list[Face]) -> list[Face]:
    """Merge the two detectors' findings: boxes overlapping by IoU > 0.4, or one mostly inside the other
    (the detectors frame the same face differently), are one face; the higher score is kept. Sorted
    left to right."""
    kept: list[Face] = []

    def same(a: np.ndarray, b: np.ndarray) -> bool:
        return box_iou(a, b) > 0.4 or box_intersection(a, b) > 0.6 * min(box_area(a), box_area(b))

    for face in sorted(faces, key=lambda f: -f.score):
        if not any(same(face.box, k.box) for k in kept):
            kept.append(face)
    return sorted(kept, key=lambda f: (f.box[0], f.box[1]))


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence the C++ start-up chatter (TFLite/absl INFO and W0000 lines) that mediapipe prints on the
    process's stderr descriptor the first time each graph runs."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr descriptor: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class MediapipeFaceAnalyzer(FaceAnalyzer):
    """Mediapipe's bundled models: both BlazeFace detectors (short- and full-range, merged), the 478-point
    face mesh (with irises) on a crop around the chosen face, and selfie segmentation for people.

    Models are created on first use and kept until ``close()``. Calls are serialised by a lock; mediapipe
    graphs are not re-entrant.
    """

    def __init__(self, min_confidence: float = 0.5, person_threshold: float = 0.5, mesh_crop: int = 384) -> None:
        self.min_confidence = min_confidence
        self.person_threshold = person_threshold
        self.mesh_crop = mesh_crop
        self._models: dict[str, Any] = {}
        self._oval: list[int] = []  # FACEMESH_FACE_OVAL indices, set with the mesh model
        self._lock = threading.RLock()

    def _model(self, name: str) -> Any:
        if name not in self._models:
            import mediapipe as mp

            s = mp.solutions
            if name.startswith("detector"):
                self._models[name] = s.face_detection.FaceDetection(
                    model_selection=int(name[-1]), min_detection_confidence=self.min_confidence)
            elif name == "mesh":
                self._models[name] = s.face_mesh.FaceMesh(
                    static_image_mode=True, max_num_faces=3, refine_landmarks=True, min_detection_confidence=0.3)
                self._oval = sorted({i for edge in s.face_mesh.FACEMESH_FACE_OVAL for i in edge})
            else:
                self._models[name] = s.selfie_segmentation.SelfieSegmentation(model_selection=0)
        return self._models[name]

    def _run(self, name: str, arr: np.ndarray) -> Any:
        """Run one model (its first run with native logging silenced, every run without protobuf's
        deprecation warning)."""
        with self._lock, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*GetPrototype.*")
            first = name not in self._models
            with _quiet_native_stderr() if first else contextlib.nullcontext():
                return self._model(name).process(arr)

    def close(self) -> None:
        with self._lock:
            for model in self._models.values():
                model.close()
            self._models.clear()

    def detect(self, image: ImageLike) -> list[Face]:
        arr = rgb_array(image)
        h, w = arr.shape[:2]
        found: list[Face] = []
        results = [self._run(f"detector{i}", arr) for i in (0, 1)]
        for result in results:
            for det in result.detections or []:
                rb = det.location_data.relative_bounding_box
                box = np.array([rb.xmin * w, rb.ymin * h, (rb.xmin + rb.width) * w, (rb.ymin + rb.height) * h]) - 0.5
                # mediapipe's keypoints: the subject's right eye (image-left), left eye, nose tip, mouth centre
                kp = np.array([[k.x * w, k.y * h] for k in det.location_data.relative_keypoints]) - 0.5
                found.append(Face(box, float(det.score[0]), landmarks_from_keypoints(kp[0], kp[1], kp[2], kp[3])))
        return _merge_detections(found)

    def refine(self, image: ImageLike, face: Face) -> Face:
        arr = rgb_array(image)
        crop = square_around(face.box, 2.0, self.mesh_crop)
        window = np.asarray(crop.apply(Image.fromarray(arr)))
        result = self._run("mesh", np.ascontiguousarray(window))
        if not result.multi_face_landmarks:
            return face
        size = float(self.mesh_crop)
        meshes = [np.array([[p.x * size, p.y * size] for p in lms.landmark]) - 0.5
                  for lms in result.multi_face_landmarks]
        centre = (size - 1) / 2
        mesh = min(meshes, key=lambda m: float(np.linalg.norm(m.mean(axis=0) - centre)))
        if np.linalg.norm(mesh.mean(axis=0) - centre) > size / 4:  # the mesh found some other face
            return face
        mesh = apply_affine(mesh, cv2.invertAffineTransform(crop.matrix))
        if len(mesh) >= 478:  # iris centres
            eyes = [mesh[468], mesh[473]]
        else:  # eye-corner midpoints
            eyes = [(mesh[33] + mesh[133]) / 2, (mesh[362] + mesh[263]) / 2]
        landmarks = np.stack([eyes[0], eyes[1], mesh[1], mesh[61], mesh[291]])
        return replace(face, landmarks5=landmarks, mesh=mesh, outline=mesh[self._oval])

    def segment_person(self, image: ImageLike) -> np.ndarray:
        arr = rgb_array(image)
        result = self._run("segmenter", arr)
        if result.segmentation_mask is None:
            return empty_mask(*arr.shape[:2])
        return binarize(result.segmentation_mask >= self.person_threshold)
