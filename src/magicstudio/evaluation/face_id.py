"""Face-recognition embedders for CSIM: dlib (ships its weights, works offline), ArcFace IResNet and insightface
ONNX models (user weights).

Faces are found by the project's :class:`~magicstudio.data.faces.FaceAnalyzer` (or come from a prepared folder);
each backend then aligns the main face its own way: ArcFace and insightface with the 5-point similarity warp onto
the ArcFace template (:func:`magicstudio.models.face_align.align_faces`, insightface's ``norm_crop``), dlib with its
own 5-point shape predictor and 150 px face chip (the alignment its ResNet was trained with).

Backend specs: ``dlib``; ``arcface:PATH`` (an arcface_torch ``backbone.pth`` or ``.safetensors``; ``arcface:tiny``
for tests); ``insightface:PATH`` (an insightface recognition ``.onnx``, e.g. ``w600k_r50.onnx``); a bare path picks
``insightface`` for ``.onnx`` files and ``arcface`` otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from ..data.faces import Face
from ..errors import UserError

BACKENDS = ("dlib", "arcface", "insightface", "toyworld")


class FaceEmbedder(ABC):
    """``embed(rgb uint8 (H, W, 3), face) -> (D,) float64 unit vector``."""

    name: str = "face"
    weights: str | None = None  # the weights file, for the "is this the training network?" check

    @abstractmethod
    def embed(self, image: np.ndarray, face: Face) -> np.ndarray: ...


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def dlib_model_files() -> tuple[Path, Path]:
    """Paths of the 5-point shape predictor and the ResNet face-recognition model in ``face_recognition_models``
    (found without importing it: its ``__init__`` needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise UserError("the dlib face backend needs its models: pip install 'magicstudio[eval]' "
                        "(dlib-bin, face-recognition-models)")
    folder = Path(spec.origin).parent / "models"
    files = (folder / "shape_predictor_5_face_landmarks.dat", folder / "dlib_face_recognition_resnet_model_v1.dat")
    for f in files:
        if not f.is_file():
            raise UserError(f"{f} is missing: reinstall face-recognition-models")
    return files


class DlibEmbedder(FaceEmbedder):
    """dlib's ResNet (128-d, LFW 99.38%). Its descriptors are not zero-mean: unrelated people still score a cosine
    of ~0.85-0.9 (dlib's own same-person rule, euclidean distance < 0.6, is a cosine above ~0.91 at their usual
    norm of ~1.4), so compare dlib CSIM only with dlib CSIM."""

    name = "dlib-resnet-v1"

    def __init__(self) -> None:
        try:
            import dlib
        except ImportError:
            raise UserError("the dlib face backend needs dlib: pip install 'magicstudio[eval]' "
                            "(dlib-bin, face-recognition-models)") from None
        predictor, recognizer = dlib_model_files()
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(predictor))
        self._rec = dlib.face_recognition_model_v1(str(recognizer))
        self.weights = str(recognizer)

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        x0, y0, x1, y1 = (int(round(float(v))) for v in face.box)
        arr = np.ascontiguousarray(image, dtype=np.uint8)
        shape = self._shape(arr, self._dlib.rectangle(x0, y0, x1, y1))
        return _unit(np.array(self._rec.compute_face_descriptor(arr, shape, 0)))


def _aligned(image: np.ndarray, face: Face, size: int) -> torch.Tensor:
    """The face warped onto the ArcFace template, ``[1, 3, size, size]`` in ``[-1, 1]``."""
    from ..models.face_align import align_faces

    t = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    lm = torch.as_tensor(np.asarray(face.landmarks5, dtype=np.float32))[None]
    return align_faces(t, lm, size=size)


class ArcFaceEmbedder(FaceEmbedder):
    """An insightface ``arcface_torch`` IResNet (see :mod:`magicstudio.models.face_encoder`)."""

    def __init__(self, spec: str) -> None:
        from ..models.face_encoder import load_face_encoder

        self.encoder = load_face_encoder(spec)
        self.name = self.encoder.name
        self.weights = spec

    @torch.no_grad()
    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        aligned = _aligned(image, face, self.encoder.input_size)
        return _unit(self.encoder.embed(aligned)[0].cpu().numpy())


class InsightFaceEmbedder(FaceEmbedder):
    """An insightface recognition model in ONNX (``w600k_r50.onnx``, ``glint360k_r100.onnx`` ...) via onnxruntime.

    Input as insightface's ``ArcFaceONNX``: the aligned RGB face, ``(x - 127.5) / 127.5``, unless the graph starts
    by normalising itself (Sub/Mul nodes; checked when the ``onnx`` package is installed), then raw ``0..255``.
    """

    def __init__(self, path: str) -> None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"insightface model not found: {p}")
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("the insightface backend needs onnxruntime: pip install 'magicstudio[eval]'") from None
        try:
            self.session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UserError(f"{p}: not a loadable ONNX model ({exc.__class__.__name__})") from None
        inp = self.session.get_inputs()[0]
        shape = inp.shape
        if len(shape) != 4 or not isinstance(shape[2], int) or shape[2] != shape[3]:
            raise UserError(f"{p}: input shape {shape} is not a square face crop [N, 3, S, S]")
        self.input_name, self.size = inp.name, int(shape[2])
        self.raw_pixels = self._normalises_itself(p)
        self.name, self.weights = f"insightface:{p.name}", str(p)

    @staticmethod
    def _normalises_itself(path: Path) -> bool:
        try:  # onnx is optional (its recent releases need a protobuf that mediapipe 0.10 refuses)
            import onnx

            ops = [n.op_type for n in onnx.load(str(path)).graph.node[:8]]
        except Exception:
            return False
        return "Sub" in ops and "Mul" in ops

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        x = _aligned(image, face, self.size)
        if self.raw_pixels:
            x = (x + 1.0) * 127.5
        out = self.session.run(None, {self.input_name: x.numpy().astype(np.float32)})[0]
        return _unit(out[0])


class ToyworldEmbedder(FaceEmbedder):
    """The toy world's identity encoder (``magicstudio.models.toyworld``): CSIM of the toy experiment. It reads the
    fixed head window of the picture, so it needs no face detector and ignores ``face``."""

    def __init__(self, weights: str | None = None) -> None:
        from ..models.toyworld import ToyEmbedder, load_toy_encoders, toyworld_weights, ENCODERS_FILE

        self.weights = str(weights or toyworld_weights(ENCODERS_FILE)) + "#identity"
        self._embedder = ToyEmbedder("identity", load_toy_encoders(weights)["identity"])
        self.name = "toyworld-identity"

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        return _unit(self._embedder.image_embeddings([image])[0].numpy())


def parse_backend(spec: str) -> tuple[str, str | None]:
    """``"dlib"`` / ``"arcface:PATH"`` / ``"insightface:PATH"`` / a bare path -> (backend, weights)."""
    spec = str(spec).strip()
    name, sep, rest = spec.partition(":")
    if name in BACKENDS and (sep or name == spec):
        return name, (rest or None)
    if spec.endswith(".onnx"):
        return "insightface", spec
    if Path(spec).suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt") or Path(spec).is_file():
        return "arcface", spec
    raise UserError(f"unknown face backend {spec!r}: use dlib, arcface:PATH, insightface:PATH.onnx")


def load_face_embedder(spec: str) -> FaceEmbedder:
    backend, weights = parse_backend(spec)
    if backend == "dlib":
        return DlibEmbedder()
    if backend == "toyworld":
        return ToyworldEmbedder(weights)
    if not weights:
        example = "arcface:/path/backbone.pth" if backend == "arcface" else "insightface:/path/w600k_r50.onnx"
        raise UserError(f"the {backend} backend needs weights (none ship with any package): --face-backend {example}")
    return ArcFaceEmbedder(weights) if backend == "arcface" else InsightFaceEmbedder(weights)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_network(eval_weights: str | None, training_weights: str | os.PathLike | None) -> bool:
    """True when the evaluation face network is the training identity-loss network (same file, by path or
    content, or both the same ``tiny`` spec)."""
    if not eval_weights or not training_weights:
        return False
    a, b = str(eval_weights), str(training_weights)
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if not (pa.is_file() and pb.is_file()):
        return False
    if pa.resolve() == pb.resolve():
        return True
    return pa.stat().st_size == pb.stat().st_size and _digest(pa) == _digest(pb)
