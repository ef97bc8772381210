"""``evaluate_images``: the paper's Table 1 metrics (CSIM, Style, Aesthetic) and the usual extras (CLIP-T,
CLIP-I, DINO, Face-sim, DreamSim) on folders of generated, source and reference images.

- ``csim`` (alias ``face_sim``): cosine between each generated face's embedding and the mean of the source
  faces' embeddings (unit vectors). A generated image without a detectable face is a miss (value None).
- ``style``: CLIP image-embedding cosine between generated and reference images with the faces blanked out in
  both (face mask filled with CLIP's mean colour, which normalises to zero), averaged over the references.
- ``aesthetic``: LAION aesthetic head on the generated image's normalised CLIP embedding.
- ``clip_t``: CLIP cosine of image and prompt (placeholder tokens such as ``<v1>`` removed from the prompt;
  prompts from the argument, else from the PNG ``parameters`` text magicstudio writes).
- ``clip_i`` / ``dino``: CLIP / DINO ``[CLS]`` cosine between generated and reference images (unmasked), averaged
  over the references. ``dreamsim``: DreamSim distance, likewise (only where its package and weights exist).

A metric whose model is missing gets ``summary[metric] = {"error": "<one line>"}``; the others still run.
Inputs may be plain image folders, folders made by ``magicstudio prepare`` (their stored masks and landmarks are
used), single files, or lists of files/folders.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..data.faces import Face
from ..data.images import list_generated, list_images, load_image
from ..errors import UserError
from .report import summarise

log = logging.getLogger(__name__)

METRICS = ("csim", "face_sim", "style", "aesthetic", "clip_t", "clip_i", "dino", "dreamsim")
DEFAULT_METRICS = ("csim", "style", "aesthetic", "clip_t", "clip_i", "dino")
_NEEDS = {"csim": "source", "face_sim": "source", "style": "reference", "clip_i": "reference", "dino": "reference",
          "dreamsim": "reference"}
_PLACEHOLDER = re.compile(r"<[^<>\s]+>")


@dataclass
class _Item:
    """One input image, its face (None: none found) and face mask, filled in on first need."""

    path: Path
    image: Image.Image | None = None
    error: str | None = None
    prepared: Any = None  # a PreparedItem when the image comes from a prepared folder
    analysed: bool = False
    face: Face | None = None
    face_mask: np.ndarray | None = None


def _collect(spec: Any, role: str) -> list[_Item] | None:
    """The images of one role: a folder (plain or prepared), an image file, or a list of those."""
    if spec is None:
        return None
    from ..data.prepare import is_prepared, load_prepared

    entries = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not entries:
        raise UserError(f"no {role} images given")
    items: list[_Item] = []
    for entry in entries:
        p = Path(entry).expanduser()
        if p.is_dir():
            if is_prepared(p):
                items += [_Item(it.image, prepared=it) for it in load_prepared(p).items]
            else:
                listed = list_generated(p) if role == "generated" else list_images(p)  # heatmaps are no samples
                items += [_Item(f) for f in listed]
        elif p.is_file():
            items.append(_Item(p))
        else:
            raise UserError(f"{role} images: {p} not found")
    if not items:
        raise UserError(f"no {role} images in {', '.join(str(e) for e in entries)}")
    for it in items:
        try:
            it.image = load_image(it.path)
        except UserError as exc:
            it.error = str(exc)
    if all(it.image is None for it in items):
        raise UserError(f"none of the {len(items)} {role} images could be read (first: {items[0].error})")
    return items


def _prompt_from_png(path: Path) -> str | None:
    """The prompt in a PNG's A1111 ``parameters`` text (what magicstudio's generators write), if any."""
    try:
        with Image.open(path) as im:
            text = im.info.get("parameters")
    except Exception:
        return None
    if not isinstance(text, str) or not text.strip():
        return None
    if "\nNegative prompt:" in text:
        return text.split("\nNegative prompt:", 1)[0].strip()
    lines = text.strip().split("\n")
    if len(lines) > 1 and lines[-1].startswith("Steps:"):
        lines = lines[:-1]
    return "\n".join(lines).strip() or None


def clean_prompt(prompt: str) -> str:
    """The prompt CLIP-T scores: placeholder tokens (``<v1>``, ``<v2>``...) removed, spaces collapsed."""
    return " ".join(_PLACEHOLDER.sub(" ", prompt).split())


def load_prompts(path: str | os.PathLike) -> dict[str, str] | str:
    """Prompts from a file. ``.json``: a string (one prompt for every image) or ``{file name or stem: prompt}``.
    ``.txt``: one line = one prompt for every image; otherwise one ``NAME<TAB>PROMPT`` line per image."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{p}: not valid JSON ({exc})") from None
        if isinstance(data, str) or (isinstance(data, dict) and all(isinstance(v, str) for v in data.values())):
            return data
        raise UserError(f"{p}: expected a prompt string or an object {{\"file name\": \"prompt\"}}")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"{p}: no prompt in the file")
    if len(lines) == 1 and "\t" not in lines[0]:
        return lines[0].strip()
    out = {}
    for i, ln in enumerate(lines, 1):
        name, tab, prompt = ln.partition("\t")
        if not tab or not name.strip() or not prompt.strip():
            raise UserError(f"{p}:{i}: expected NAME<TAB>PROMPT (or a single line: one prompt for every image)")
        out[name.strip()] = prompt.strip()
    return out


def _prompts_for(items: list[_Item], prompts: dict[str, str] | str | None) -> list[str | None]:
    if isinstance(prompts, str):
        return [prompts] * len(items)
    if isinstance(prompts, dict):
        return [prompts.get(str(it.path), prompts.get(it.path.name, prompts.get(it.path.stem))) for it in items]
    return [_prompt_from_png(it.path) for it in items]


def parse_metrics(metrics: Sequence[str] | str | None) -> list[str]:
    if metrics is None:
        return list(DEFAULT_METRICS)
    if isinstance(metrics, str):
        metrics = [m for m in re.split(r"[,\s]+", metrics) if m]
    out: list[str] = []
    for m in metrics:
        key = m.strip().lower().replace("-", "_")
        if key not in METRICS:
            raise UserError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise UserError(f"no metric given; choose from {', '.join(METRICS)}")
    return out


_ANALYZER = None
#: models loaded by earlier calls, by (kind, spec): a benchmark evaluating many cells loads each model once
_MODEL_CACHE: dict[tuple[str, Any], Any] = {}


def _stamp(spec: Any) -> Any:
    """A model spec as a cache key: files also by modification time and size (a rewritten file is reloaded)."""
    if spec is None:
        return None
    text = str(spec)
    path = Path(text.partition(":")[2] if text.startswith(("arcface:", "insightface:")) else text)
    try:
        st = path.stat()
    except (OSError, ValueError):
        return text
    return (text, st.st_mtime_ns, st.st_size)


def clear_model_cache() -> None:
    """Drop the models kept between ``evaluate_images`` calls (frees their memory)."""
    _MODEL_CACHE.clear()


def _shared_analyzer():
    """One mediapipe analyzer per process (its graphs take ~1 s to build; calls are serialised by its lock)."""
    global _ANALYZER
    if _ANALYZER is None:
        from ..data.faces import MediapipeFaceAnalyzer

        _ANALYZER = MediapipeFaceAnalyzer()
    return _ANALYZER


class _Context:
    """Loads each model once (remembering a failure, so a missing model is reported once and not retried) and
    caches face analyses and embeddings shared by several metrics."""

    def __init__(self, face_backend: str, clip_model: str | None, dino_model: str | None,
                 aesthetic_head: str | None) -> None:
        self.face_backend, self.clip_model, self.dino_model = face_backend, clip_model, dino_model
        self.aesthetic_head = aesthetic_head
        self._models: dict[str, Any] = {}
        self._embeddings: dict[tuple[str, str, int], torch.Tensor] = {}

    def model(self, key: str, load: Callable[[], Any]) -> Any:
        if key not in self._models:
            specs = {"clip": [self.clip_model], "dino": [self.dino_model], "face": [self.face_backend],
                     "aesthetic": [self.aesthetic_head, self.clip_model]}.get(key, [])
            spec = (key, *(_stamp(v) for v in specs))
            try:
                if spec not in _MODEL_CACHE:
                    _MODEL_CACHE[spec] = load()
                self._models[key] = _MODEL_CACHE[spec]
            except UserError as exc:
                self._models[key] = exc
        value = self._models[key]
        if isinstance(value, UserError):
            raise value
        return value

    def clip(self):
        from .clip import load_clip

        return self.model("clip", lambda: load_clip(self.clip_model))

    def dino(self):
        from .clip import load_dino

        return self.model("dino", lambda: load_dino(self.dino_model))

    def face_embedder(self):
        from .face_id import load_face_embedder

        return self.model("face", lambda: load_face_embedder(self.face_backend))

    def aesthetic(self):
        from .aesthetic import load_aesthetic_head, tiny_head

        def load():
            if not self.aesthetic_head:
                raise UserError("no aesthetic head given: pass --aesthetic-head PATH to the LAION predictor "
                                "(sac+logos+ava1-l14-linearMSE.pth or sa_0_4_vit_l_14_linear.pth)")
            dim = self.clip().dim
            if str(self.aesthetic_head) == "tiny":
                return tiny_head(dim)
            return load_aesthetic_head(self.aesthetic_head, dim)

        return self.model("aesthetic", load)

    def analyse(self, item: _Item) -> None:
        """Fill ``item.face`` and ``item.face_mask``: from the prepared folder, else with the face analyzer."""
        if item.analysed or item.image is None:
            return
        item.analysed = True
        w, h = item.image.size
        prep = item.prepared
        if prep is not None:
            if prep.face_box is not None and prep.landmarks5 is not None:
                item.face = Face(box=np.asarray(prep.face_box, float), score=1.0,
                                 landmarks5=np.asarray(prep.landmarks5, float))
            item.face_mask = prep.load_mask("face") if "face" in prep.masks else np.zeros((h, w), np.uint8)
            return
        if str(self.face_backend).startswith("toyworld"):  # the toy world has no detector: its fixed head window
            from ..data.toyworld import canonical_face, head_window_mask

            box, landmarks = canonical_face(w)
            item.face = Face(box=box, score=1.0, landmarks5=landmarks)
            item.face_mask = head_window_mask(w) if w == h else None
            return
        analysis = _shared_analyzer().analyze(item.image)
        item.face, item.face_mask = analysis.face, analysis.face_mask

    def embed_images(self, key: str, embedder: Any, items: list[_Item], masked: bool = False) -> torch.Tensor:
        """``[N, D]`` embeddings of the readable ``items`` (masked: face region filled with the neutral colour)."""
        keys = [(key, str(it.path), int(masked)) for it in items]
        todo = [(k, it) for k, it in zip(keys, items) if k not in self._embeddings]
        if todo:
            images = [self.masked(it, embedder.preprocess.fill_colour) if masked else it.image for _, it in todo]
            for (k, _), e in zip(todo, embedder.image_embeddings(images)):
                self._embeddings[k] = e
        return torch.stack([self._embeddings[k] for k in keys]) if keys else torch.zeros(0, embedder.dim)

    def masked(self, item: _Item, fill: tuple[int, int, int]) -> Image.Image:
        self.analyse(item)
        arr = np.array(item.image)
        mask = item.face_mask
        if mask is not None and mask.shape == arr.shape[:2] and mask.any():
            arr[mask > 0] = fill
        return Image.fromarray(arr)


def _describe(spec: Any) -> str | None:
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        return str(spec[0]) if len(spec) == 1 else f"{len(spec)} paths, first {spec[0]}" if spec else "[]"
    return str(spec)


def _readable(items: list[_Item] | None) -> list[_Item]:
    return [it for it in (items or []) if it.image is not None]


def _per_generated(gen: list[_Item], values: dict[int, float | None]) -> list[float | None]:
    return [values.get(i) for i in range(len(gen))]


def _mean_cosine_to_refs(e_gen: torch.Tensor, e_ref: torch.Tensor) -> list[float]:
    return (e_gen @ e_ref.T).mean(dim=1).tolist()


def evaluate_images(
    generated: Any,
    source: Any,
    reference: Any,
    prompts: dict[str, str] | str | None = None,
    metrics: Sequence[str] | str | None = None,
    face_backend: str = "dlib",
    clip_model: str | None = None,
    dino_model: str | None = None,
    aesthetic_head: str | None = None,
    training_face_encoder: str | None = None,
) -> dict[str, Any]:
    """Score ``generated`` images against ``source`` (identity) and ``reference`` (style) images.

    Returns ``{"summary": {metric: {mean, std, n, misses} | {"error": reason}}, "images": [{"file", "face_found",
    metric: value | None}], "config": {...}}``. Raises :class:`UserError` only for bad input (missing folders, no
    readable images, unknown metric); a metric that cannot run (model missing) gets an ``error`` entry.
    ``face_backend``: ``dlib`` | ``arcface:PATH`` | ``insightface:PATH.onnx``; ``clip_model`` / ``dino_model``:
    hub id, folder or ``"tiny"``; ``aesthetic_head``: LAION head file or ``"tiny"``; ``training_face_encoder``:
    the identity-loss weights used in training (a warning when CSIM would use the same network).
    """
    wanted = parse_metrics(metrics)
    if generated is None:
        raise UserError("no generated images given")
    gen = _collect(generated, "generated") or []
    src = _collect(source, "source")
    ref = _collect(reference, "reference")
    sets = {"source": src, "reference": ref}
    ctx = _Context(face_backend, clip_model, dino_model, aesthetic_head)
    warnings: list[str] = [f"{Path(it.path).name}: unreadable ({it.error})" for it in (gen + (src or []) + (ref or []))
                           if it.image is None]
    notes: dict[str, str] = {}
    config: dict[str, Any] = {
        "magicstudio": __version__, "metrics": wanted, "generated": _describe(generated),
        "source": _describe(source), "reference": _describe(reference), "n_generated": len(gen),
        "n_source": len(src or []), "n_reference": len(ref or []), "face_backend": face_backend,
        "clip_model": clip_model or "openai/clip-vit-large-patch14", "dino_model": dino_model or "facebook/dino-vits16",
        "aesthetic_head": aesthetic_head, "training_face_encoder": training_face_encoder,
    }
    results: dict[str, list[float | None]] = {}
    summary: dict[str, dict[str, Any]] = {}
    readable_gen = [i for i, it in enumerate(gen) if it.image is not None]

    def run_csim() -> list[float | None]:
        embedder = ctx.face_embedder()
        config["face_network"] = embedder.name
        from .face_id import same_network

        if same_network(embedder.weights, training_face_encoder):
            msg = (f"CSIM uses the identity-loss network of training ({embedder.name}): it is biased upwards; "
                   "evaluate with another face network (e.g. --face-backend dlib)")
            warnings.append(msg)
            log.warning(msg)
        src_embs, src_misses = [], []
        for it in _readable(src):
            ctx.analyse(it)
            if it.face is None:
                src_misses.append(it.path.name)
            else:
                src_embs.append(embedder.embed(np.asarray(it.image), it.face))
        config["source_faces"] = len(src_embs)
        if src_misses:
            config["source_face_misses"] = src_misses
            warnings.append(f"no face found in {len(src_misses)} source image(s): {', '.join(src_misses[:5])}")
        if not src_embs:
            raise UserError(f"no face found in any of the {len(src or [])} source images")
        mean = np.mean(src_embs, axis=0)
        mean /= max(float(np.linalg.norm(mean)), 1e-12)
        values: dict[int, float | None] = {}
        for i in readable_gen:
            ctx.analyse(gen[i])
            if gen[i].face is not None:
                values[i] = float(embedder.embed(np.asarray(gen[i].image), gen[i].face) @ mean)
        if embedder.name.startswith("dlib"):
            notes["csim"] = ("dlib descriptors are not zero-mean: unrelated people typically score 0.85-0.90 "
                             "and the same person 0.95-1.0; compare dlib CSIM with dlib CSIM only")
        return _per_generated(gen, values)

    def run_reference_cosine(key: str, embedder: Any, masked: bool) -> list[float | None]:
        refs = _readable(ref)
        e_ref = ctx.embed_images(key, embedder, refs, masked=masked)
        e_gen = ctx.embed_images(key, embedder, [gen[i] for i in readable_gen], masked=masked)
        return _per_generated(gen, dict(zip(readable_gen, _mean_cosine_to_refs(e_gen, e_ref))))

    def run_style() -> list[float | None]:
        values = run_reference_cosine("clip", ctx.clip(), masked=True)
        faceless = sum(1 for i in readable_gen if gen[i].face_mask is None or not gen[i].face_mask.any())
        if faceless:
            notes["style"] = f"{faceless} generated image(s) had no detectable face and were compared unmasked"
        return values

    def run_aesthetic() -> list[float | None]:
        head, clip = ctx.aesthetic(), ctx.clip()
        e_gen = ctx.embed_images("clip", clip, [gen[i] for i in readable_gen])
        return _per_generated(gen, dict(zip(readable_gen, head(e_gen).tolist())))

    def run_clip_t() -> list[float | None]:
        clip = ctx.clip()
        texts = _prompts_for(gen, prompts)
        have = [i for i in readable_gen if texts[i]]
        if not have:
            raise UserError("no prompts: pass --prompts FILE (or a prompt string); magicstudio's PNGs carry "
                            "their prompt, other images do not")
        cleaned = [clean_prompt(texts[i]) for i in have]
        e_txt = clip.text_embeddings(cleaned)
        e_img = ctx.embed_images("clip", clip, [gen[i] for i in have])
        notes["clip_t"] = "prompts scored without placeholder tokens, e.g. " + repr(cleaned[0])
        return _per_generated(gen, dict(zip(have, (e_img * e_txt).sum(-1).tolist())))

    def run_dreamsim() -> list[float | None]:
        import importlib.util

        if importlib.util.find_spec("dreamsim") is None:
            raise UserError("the dreamsim package is not installed (pip install dreamsim; it downloads its weights)")

        def load():
            try:
                from dreamsim import dreamsim

                model, preprocess = dreamsim(pretrained=True, device="cuda" if torch.cuda.is_available() else "cpu")
            except Exception as exc:
                raise UserError(f"DreamSim weights are not available ({exc.__class__.__name__}: "
                                f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
            return model, preprocess

        model, preprocess = ctx.model("dreamsim", load)
        device = next(model.parameters()).device
        with torch.no_grad():
            refs = [preprocess(it.image).to(device) for it in _readable(ref)]
            values = {}
            for i in readable_gen:
                g = preprocess(gen[i].image).to(device)
                values[i] = float(np.mean([float(model(g, r)) for r in refs]))
        return _per_generated(gen, values)

    runners: dict[str, Callable[[], list[float | None]]] = {
        "csim": run_csim, "style": run_style, "aesthetic": run_aesthetic, "clip_t": run_clip_t,
        "clip_i": lambda: run_reference_cosine("clip", ctx.clip(), masked=False),
        "dino": lambda: run_reference_cosine("dino", ctx.dino(), masked=False), "dreamsim": run_dreamsim,
    }
    failed: dict[str, str] = {}
    for metric in wanted:
        base = "csim" if metric == "face_sim" else metric
        needs = _NEEDS.get(base)
        if needs and not _readable(sets[needs]):
            summary[metric] = {"error": f"needs {needs} images (--{needs} DIR)"}
            continue
        if base not in results and base not in failed:
            try:
                results[base] = runners[base]()
            except UserError as exc:
                failed[base] = str(exc)
        if base in failed:
            summary[metric] = {"error": failed[base]}
            continue
        results[metric] = results[base]
        summary[metric] = summarise(results[metric])
    for name in ("clip", "dino", "aesthetic"):
        model = ctx._models.get(name)
        if model is not None and not isinstance(model, UserError):
            config[f"{name}_network"] = getattr(model, "name", name)
    config["warnings"] = warnings
    config["notes"] = notes
    images = []
    for i, it in enumerate(gen):
        row: dict[str, Any] = {"file": str(it.path)}
        if it.analysed:
            row["face_found"] = it.face is not None
        for metric in wanted:  # a metric that could not run is None for every image
            v = results[metric][i] if metric in results else None
            row[metric] = None if v is None else float(v)
        images.append(row)
    return {"summary": summary, "images": images, "config": config}
