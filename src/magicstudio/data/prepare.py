"""Turn a folder of user photos into a prepared training set: crops, masks, a manifest and a preview.

Layout of a prepared folder ``DIR``::

    DIR/images/<stem>.png            the crop, size x size RGB
    DIR/masks/{face,head,person}/<stem>.png   uint8 masks, 0/255, same size as the crop
    DIR/manifest.json                role, size, kept items (boxes/landmarks in crop pixels), rejected files
    DIR/preview.png                  every crop with its face (green) and head (orange) masks

Source photos (the person) are cropped square around the main face so the face is about 45% of the
crop (more in close-ups, and the square is moved inside the photo rather than padded where possible);
reference photos (the style) keep their composition (centre crop). Boxes and landmarks use pixel
centres at integers, like ``magicstudio.models.face_align``. A photo is rejected, with the
reason recorded, when it cannot be read, is tiny, (source only) shows no face, or its user mask is
missing or has the wrong size. Other photos are unaffected.

User masks (``masks_dir``): ``<stem>.<ext>`` or ``face/<stem>.<ext>`` replaces the automatic face mask,
``head/<stem>.<ext>`` and ``person/<stem>.<ext>`` the other kinds (a ``face/`` file wins over a top-level
one), where ``<stem>`` is the photo's file name without its extension. They are drawn on the original
photo (same size, after EXIF rotation) and follow it through the crop. When ``masks_dir`` is given,
every photo needs at least one mask there; kinds it does not give stay automatic.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .. import __version__
from ..errors import UserError
from ..io import TEMP_PREFIX, TEMP_SUFFIX, atomic_write, write_json
from .faces import FaceAnalyzer, MediapipeFaceAnalyzer, choose_main
from .images import IMAGE_EXTENSIONS, Crop, center_crop, list_images, load_image, square_around
from .masks import load_mask, mask_stats, overlay, save_mask

Role = Literal["source", "reference"]
ROLES: tuple[str, ...] = ("source", "reference")
MASK_KINDS: tuple[str, ...] = ("face", "head", "person")
MANIFEST = "manifest.json"
PREVIEW = "preview.png"
MANIFEST_VERSION = 1
SOURCE_MARGIN = 2.2  # crop side / face-box side: the face fills ~45% of a source crop, like a selfie
MIN_SOURCE_MARGIN = 1.4  # close-ups: the crop may shrink to this margin rather than pad past the photo
MIN_SIDE = 64  # smaller photos are rejected
RECOMMENDED_IMAGES = 4  # the papers use 4-6 photos per concept
PREVIEW_THUMB = 256


@dataclass
class PreparedItem:
    """One kept photo. Paths are absolute; ``face_box`` (xyxy) and ``landmarks5`` ((5, 2), ArcFace order)
    are in the prepared image's pixels (centres at integers), None when it has no face; ``crop_box`` is the
    integer window ``[x0, x1) x [y0, y1)`` of the original photo (it may extend past its borders)."""

    stem: str
    image: Path
    masks: dict[str, Path]
    source: str
    original_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    face_box: np.ndarray | None = None
    landmarks5: np.ndarray | None = None
    n_faces: int = 0
    chosen: int | None = None
    user_masks: list[str] = field(default_factory=list)
    mask_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def load_image(self) -> Image.Image:
        return load_image(self.image)

    def load_mask(self, kind: str = "face") -> np.ndarray:
        """A mask of this item (``uint8`` 0/255, the image's size)."""
        return load_mask(self.masks[kind])

    def to_manifest(self, root: Path) -> dict[str, Any]:
        def rounded(a: np.ndarray | None) -> list | None:
            return None if a is None else np.round(np.asarray(a, dtype=np.float64), 2).tolist()

        return {
            "stem": self.stem,
            "source": self.source,
            "image": self.image.relative_to(root).as_posix(),
            "masks": {k: p.relative_to(root).as_posix() for k, p in self.masks.items()},
            "original_size": list(self.original_size),
            "crop_box": list(self.crop_box),
            "face_box": rounded(self.face_box),
            "landmarks5": rounded(self.landmarks5),
            "n_faces": self.n_faces,
            "chosen": self.chosen,
            "user_masks": self.user_masks,
            "mask_stats": self.mask_stats,
            "warnings": self.warnings,
        }

    @classmethod
    def from_manifest(cls, root: Path, d: dict[str, Any]) -> "PreparedItem":
        def array(v: Any, shape: tuple[int, ...]) -> np.ndarray | None:
            return None if v is None else np.asarray(v, dtype=np.float64).reshape(shape)

        return cls(
            stem=d["stem"], image=root / d["image"], masks={k: root / v for k, v in d["masks"].items()},
            source=d["source"], original_size=tuple(d["original_size"]), crop_box=tuple(d["crop_box"]),
            face_box=array(d.get("face_box"), (4,)), landmarks5=array(d.get("landmarks5"), (5, 2)),
            n_faces=d.get("n_faces", 0), chosen=d.get("chosen"), user_masks=list(d.get("user_masks", [])),
            mask_stats=d.get("mask_stats", {}), warnings=list(d.get("warnings", [])),
        )


@dataclass
class Rejected:
    """A photo that was not used, and why."""

    path: str
    reason: str


@dataclass
class PrepareReport:
    """What ``prepare_folder`` did: kept ``items``, ``rejected`` photos, set-level ``warnings``."""

    out_dir: Path
    role: str
    size: int
    items: list[PreparedItem]
    rejected: list[Rejected]
    warnings: list[str]
    manifest: Path
    preview: Path | None


@dataclass
class PreparedSet:
    """A prepared folder as read back by training code."""

    root: Path
    role: str
    size: int
    items: list[PreparedItem]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, i: int) -> PreparedItem:
        return self.items[i]


def unique_stems(files: list[Path]) -> list[str]:
    """File-system-safe output stems, unique even on case-insensitive disks (``a.jpg``, ``a.png`` ->
    ``a``, ``a_png``)."""
    used: set[str] = set()
    stems = []
    for path in files:
        base = re.sub(r"[^\w.-]+", "_", path.stem).strip("._") or "image"
        stem, n = base, 2
        if stem.lower() in used:
            stem = f"{base}_{path.suffix.lstrip('.').lower()}"
        while stem.lower() in used:
            stem, n = f"{base}_{n}", n + 1
        used.add(stem.lower())
        stems.append(stem)
    return stems


def _reason(exc: UserError, path: Path) -> str:
    """A UserError's message without the ``<file>: `` prefix the loaders put in front of it."""
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


class _UserMasks:
    """A user mask folder, indexed once: ``load(stem, size)`` -> {kind: mask} for one photo."""

    def __init__(self, root: Path) -> None:
        if root.exists() and not root.is_dir():
            raise UserError(f"{root}: is a file, not a mask folder")
        if not root.is_dir():
            raise UserError(f"{root}: mask folder not found")
        self.root = root
        self.index: dict[str, dict[str, Path]] = {k: {} for k in MASK_KINDS}
        for kind, folder in [("face", root), *((k, root / k) for k in MASK_KINDS)]:
            by_stem: dict[str, Path] = {}
            for path in list_images(folder) if folder.is_dir() else []:
                by_stem.setdefault(path.stem, path)  # a.png before a.tif: the first by name
            self.index[kind].update(by_stem)  # face/<stem> overrides <stem>

    def load(self, stem: str, size: tuple[int, int]) -> dict[str, np.ndarray]:
        found = {kind: paths[stem] for kind, paths in self.index.items() if stem in paths}
        if not found:
            raise UserError(f"no user mask in {self.root} (expected {stem}.png or face/{stem}.png, head/, person/)")
        masks = {}
        for kind, path in found.items():
            mask = load_mask(path)
            if mask.shape[::-1] != size:
                raise UserError(
                    f"user {kind} mask {path.name} is {mask.shape[1]}x{mask.shape[0]} but the photo is "
                    f"{size[0]}x{size[1]} (masks must match the original photo)")
            masks[kind] = mask
        return masks


def _process(
    path: Path, stem: str, role: str, size: int, out: Path, analyzer: FaceAnalyzer, user_masks: _UserMasks | None,
    subject: str = "person",
) -> tuple[PreparedItem, Image.Image, dict[str, np.ndarray]]:
    """Crop one photo and compute its masks; raises UserError when it must be rejected."""
    img = load_image(path)
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise UserError(f"too small ({w}x{h}); photos need at least {MIN_SIDE} px per side")
    user = user_masks.load(path.stem, img.size) if user_masks else {}
    warnings: list[str] = []
    if role == "source" and subject == "object":
        # general objects (MagiCapture supplement): the "face" mask is the subject's foreground, from the user's
        # mask (face/ or person/) or else the person segmentation; no face is needed
        crop = center_crop(w, h, size)
        result = crop.apply(img)
        analysis = analyzer.analyze(result)
        given = user.get("face", user.get("person"))
        fg = crop.apply_mask(given) if given is not None else analysis.person_mask
        if not fg.any():
            raise UserError("no foreground found (the person segmentation is empty); give the object's mask "
                            "with --masks")
        if given is None:
            warnings.append("object: the foreground mask is the person segmentation (give --masks for an object)")
        masks = {"face": fg, "head": fg, "person": fg}
        item = PreparedItem(
            stem=stem, image=out / "images" / f"{stem}.png",
            masks={k: out / "masks" / k / f"{stem}.png" for k in MASK_KINDS},
            source=str(path.resolve()), original_size=(w, h), crop_box=crop.box, face_box=None, landmarks5=None,
            n_faces=len(analysis.faces), chosen=None, user_masks=sorted(user),
            mask_stats={k: mask_stats(m).to_dict() for k, m in masks.items()}, warnings=warnings + analysis.notes)
        return item, result, masks
    if role == "source":
        faces = analyzer.detect(img)
        main = choose_main(faces, w, h)
        if main is not None:
            box = faces[main].box
        elif "face" in user and user["face"].any():
            box = np.asarray(mask_stats(user["face"]).bbox, dtype=np.float64) - 0.5  # pixel edges -> centres
            warnings.append("no face detected; cropped around the user face mask")
        else:
            raise UserError("no face found (both detectors tried); use a photo where the face is clearly visible")
        crop = _source_crop(box, w, h, size)
        warnings += _crop_warnings(crop, w, h, size)
        result = crop.apply(img, pad="edge")
        analysis = analyzer.analyze(result, faces=[f.transformed(crop.matrix) for f in faces], main=main)
    else:
        crop = center_crop(w, h, size)
        result = crop.apply(img)
        analysis = analyzer.analyze(result)
        if analysis.face is None and "face" not in user:
            warnings.append("no face found: the face mask is empty (the whole image counts as style)")
    warnings += analysis.notes
    masks = {"face": analysis.face_mask, "head": analysis.head_mask, "person": analysis.person_mask}
    for kind, mask in user.items():
        masks[kind] = crop.apply_mask(mask)
        if not masks[kind].any():
            warnings.append(f"user {kind} mask is empty inside the crop")
    face = analysis.face
    item = PreparedItem(
        stem=stem, image=out / "images" / f"{stem}.png",
        masks={k: out / "masks" / k / f"{stem}.png" for k in MASK_KINDS},
        source=str(path.resolve()), original_size=(w, h), crop_box=crop.box,
        face_box=None if face is None else face.box, landmarks5=None if face is None else face.landmarks5,
        n_faces=len(analysis.faces), chosen=analysis.main, user_masks=sorted(user),
        mask_stats={k: mask_stats(m).to_dict() for k, m in masks.items()}, warnings=warnings,
    )
    return item, result, masks


def _source_crop(box: np.ndarray, w: int, h: int, size: int) -> Crop:
    """Square around the face: ``SOURCE_MARGIN`` x its box, smaller for close-ups (down to
    ``MIN_SOURCE_MARGIN``) so it fits in the photo, and shifted inside the photo rather than padded."""
    face_side = max(box[2] - box[0], box[3] - box[1])
    margin = min(SOURCE_MARGIN, max(MIN_SOURCE_MARGIN, min(w, h) / face_side))
    return square_around(box, margin, size).shifted_inside(w, h)


def _crop_warnings(crop: Crop, w: int, h: int, size: int) -> list[str]:
    x0, y0, x1, y1 = crop.box
    side = x1 - x0
    notes = []
    if side < size / 2:
        notes.append(f"low resolution: the face crop is {side} px, upscaled {size / side:.1f}x to {size} px")
    inside = max(0, min(x1, w) - max(x0, 0)) * max(0, min(y1, h) - max(y0, 0))
    padded = 1 - inside / (side * side)
    if padded > 0.1:
        notes.append(f"face near the photo border: {padded:.0%} of the crop is padding")
    return notes


def _check_folders(input_dir: Path, out: Path, masks_dir: Path | None) -> None:
    if not input_dir.exists():
        raise UserError(f"{input_dir}: folder not found")
    if not input_dir.is_dir():
        raise UserError(f"{input_dir}: not a folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: the output path exists and is not a folder")
    managed = [(out / "images").resolve(), (out / "masks").resolve()]
    for given, what in ((input_dir, "input"), (masks_dir, "mask")):
        if given is None:
            continue
        g = given.resolve()
        if g == out.resolve() or any(g == m or m in g.parents for m in managed):
            raise UserError(f"the output folder {out} must not be the {what} folder or contain it as images/ or masks/")


def _is_manifest(data: Any) -> bool:
    """True for a manifest that ``prepare_folder`` wrote (finished or, with ``writing``, interrupted)."""
    return (isinstance(data, dict) and data.get("version") == MANIFEST_VERSION and "magicstudio" in data
            and data.get("role") in ROLES and isinstance(data.get("items"), list))


def _owned(out: Path) -> set[Path]:
    """Files (resolved, inside ``out``) an earlier run wrote: its manifest, its preview, the files the manifest
    lists, and those an interrupted run was about to write. Empty when ``out`` holds no manifest of ours."""
    try:
        old = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    if not _is_manifest(old):
        return set()
    rels = [MANIFEST, PREVIEW] if old["items"] or "writing" in old else [MANIFEST]
    try:
        rels += list(old.get("writing", [])) + [
            rel for item in old["items"] for rel in [item["image"], *item["masks"].values()]]
    except (KeyError, TypeError, AttributeError):
        pass
    root = out.resolve()
    paths = {(out / rel).resolve() for rel in rels if isinstance(rel, str)}
    return {p for p in paths if root in p.parents}


def _refuse_theirs(out: Path, targets: list[Path], owned: set[Path]) -> None:
    """UserError when a file this run would write is already there and no earlier run made it."""
    theirs = [p for p in targets if (p.exists() or p.is_symlink()) and p.resolve() not in owned]
    if theirs:
        more = f" (and {len(theirs) - 1} more)" if len(theirs) > 1 else ""
        raise UserError(
            f"{out} already holds {theirs[0].relative_to(out).as_posix()}{more}, which `magicstudio prepare` did not "
            "write; choose another output folder or move those files away")


def prepare_folder(
    input_dir: str | os.PathLike,
    role: Role,
    out_dir: str | os.PathLike,
    size: int = 512,
    masks_dir: str | os.PathLike | None = None,
    analyzer: FaceAnalyzer | None = None,
    progress: bool = True,
    subject: str = "person",
) -> PrepareReport:
    """Prepare every photo of ``input_dir`` as a ``role`` ("source" or "reference") set in ``out_dir``.

    Bad photos are rejected with their reason (in the report and manifest) while the others are kept.
    Re-running into the same ``out_dir`` overwrites its own outputs and removes the outputs of photos that
    the previous manifest listed and this run does not keep; input files are never modified, and neither are
    files in ``out_dir`` that prepare did not write (a run that would overwrite one is refused before it starts).
    Raises UserError for a bad role/size, a missing or empty input folder, overlapping folders, or an output
    folder that holds such files or cannot be written.
    """
    if role not in ROLES:
        raise UserError(f"role must be 'source' or 'reference', not {role!r}")
    if subject not in ("person", "object"):
        raise UserError(f"subject must be 'person' or 'object', not {subject!r}")
    if not isinstance(size, int) or not 64 <= size <= 2048 or size % 8:
        raise UserError(f"size must be a multiple of 8 between 64 and 2048, not {size!r}")
    input_dir, out = Path(input_dir), Path(out_dir)
    user_dir = Path(masks_dir) if masks_dir is not None else None
    _check_folders(input_dir, out, user_dir)
    files = list_images(input_dir)
    if not files:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS)[:6])
        raise UserError(f"{input_dir}: no photos found (looked for {exts}, ...)")
    user_masks = _UserMasks(user_dir) if user_dir is not None else None
    stems = unique_stems(files)
    folders = ["images", *(f"masks/{k}" for k in MASK_KINDS)]
    rels = [f"{folder}/{stem}.png" for stem in stems for folder in folders]
    owned = _owned(out)
    _refuse_theirs(out, [out / rel for rel in [*rels, MANIFEST, PREVIEW]], owned)
    header = {
        "version": MANIFEST_VERSION, "magicstudio": __version__, "role": role, "size": size,
        "input_dir": str(input_dir.resolve()), "masks_dir": None if user_dir is None else str(user_dir.resolve()),
    }
    root = out.resolve()
    writing = sorted({*rels, PREVIEW, *(p.relative_to(root).as_posix() for p in owned)} - {MANIFEST})
    try:  # marks every file this run may write as ours, so an interrupted run can be re-run
        for folder in folders:
            (out / folder).mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out, folders)
        write_json(out / MANIFEST, {**header, "items": [], "rejected": [], "warnings": [], "writing": writing})
    except OSError as exc:
        raise UserError(f"cannot write to {exc.filename or out}: {exc.strerror or exc}") from None
    own = analyzer is None
    analyzer = analyzer or MediapipeFaceAnalyzer()
    items: list[PreparedItem] = []
    rejected: list[Rejected] = _not_photos(input_dir, files)
    try:
        for path, stem in _progress(list(zip(files, stems)), progress, f"preparing {role} photos"):
            try:
                item, image, masks = _process(path, stem, role, size, out, analyzer, user_masks, subject)
            except UserError as exc:
                rejected.append(Rejected(str(path), _reason(exc, path)))
                continue
            atomic_write(item.image, lambda p, im=image: im.save(p, format="PNG"))
            for kind, mask in masks.items():
                atomic_write(item.masks[kind], lambda p, m=mask: save_mask(m, p))
            items.append(item)
    finally:
        if own:
            analyzer.close()
    written = {p.resolve() for item in items for p in [item.image, *item.masks.values()]}
    for path in owned - written - {(out / MANIFEST).resolve(), (out / PREVIEW).resolve()}:
        if path.is_file():
            path.unlink()
    warnings = _duplicates(items)
    if 0 < len(items) < RECOMMENDED_IMAGES:
        warnings.append(f"only {len(items)} usable photo(s); 4-6 are recommended")
    preview = out / PREVIEW
    if items:
        atomic_write(preview, lambda p: render_preview(items).save(p, format="PNG"))
    elif preview.exists():
        preview.unlink()
    manifest = out / MANIFEST
    write_json(manifest, {
        **header,
        "items": [item.to_manifest(out) for item in items],
        "rejected": [{"path": r.path, "reason": r.reason} for r in rejected],
        "warnings": warnings,
    })
    return PrepareReport(out, role, size, items, rejected, warnings, manifest, preview if items else None)


def _duplicates(items: list[PreparedItem]) -> list[str]:
    """A warning per group of kept photos that are the same photo: the same file bytes, or the same prepared
    pixels (one photo saved twice under other names or formats). Duplicates weigh one picture more in training."""
    seen: dict[str, int] = {}  # hash -> group
    groups: list[list[str]] = []
    for item in items:
        keys = [hashlib.sha256(Path(item.source).read_bytes()).hexdigest(),
                hashlib.sha256(np.asarray(Image.open(item.image).convert("RGB")).tobytes()).hexdigest()]
        g = next((seen[k] for k in keys if k in seen), None)
        if g is None:
            g = len(groups)
            groups.append([])
        groups[g].append(Path(item.source).name)
        seen.update({k: g for k in keys})
    return [f"{', '.join(names)} are the same photo (keep one: a duplicate counts twice in training)"
            for names in groups if len(names) > 1]


def _remove_stale_temps(out: Path, folders: list[str]) -> None:
    """Delete the temporary files (``io.atomic_write``'s ``.ms-<8 hex>.tmp``) a killed run left in ``out``."""
    pattern = re.compile(re.escape(TEMP_PREFIX) + r"[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))
    for folder in [out, *(out / f for f in folders)]:
        for path in folder.iterdir():
            if pattern.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                path.unlink()


def _not_photos(input_dir: Path, photos: list[Path]) -> list[Rejected]:
    """A manifest line for every other entry of ``input_dir`` (issue 18): why it is not one of the photos."""
    listed = set(photos)
    out = []
    for path in sorted(input_dir.iterdir(), key=lambda p: (p.name.lower(), p.name)):
        if path in listed:
            continue
        if path.is_symlink() and not path.exists():
            reason = f"a dangling symbolic link (its target {os.readlink(path)} does not exist)"
        elif path.is_dir():
            reason = "a folder (prepare does not look inside sub-folders)"
        elif path.name.startswith("."):
            reason = "a hidden file"
        elif path.suffix.lower() not in IMAGE_EXTENSIONS:
            reason = f"not a photo (extension {path.suffix or 'none'!r}; looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        else:
            reason = "not a regular file"
        out.append(Rejected(str(path), reason))
    return out


def _progress(seq: list, enabled: bool, label: str):
    """Iterate ``seq`` with a rich progress bar on an interactive stderr."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    if not enabled or not console.is_terminal or len(seq) < 2:
        yield from seq
        return
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(label, total=len(seq))
        for entry in seq:
            yield entry
            bar.advance(task)


def render_preview(items: list[PreparedItem], thumb: int = PREVIEW_THUMB, columns: int = 4) -> Image.Image:
    """A contact sheet: each crop with its face mask tinted green, head outlined orange, landmarks red."""
    label_h = 18
    cols = max(1, min(columns, len(items)))
    rows = (len(items) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + label_h)), "white")
    font = ImageFont.load_default(size=12)
    for i, item in enumerate(items):
        image = item.load_image()
        shown = overlay(image, load_mask(item.masks["face"]), (40, 200, 80))
        shown = overlay(shown, load_mask(item.masks["head"]), (255, 140, 0), outline=True, width=3)
        draw = ImageDraw.Draw(shown)
        r = max(2, image.width // 128)
        for x, y in [] if item.landmarks5 is None else item.landmarks5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(230, 30, 30))
        x, y = (i % cols) * thumb, (i // cols) * (thumb + label_h)
        sheet.paste(shown.resize((thumb, thumb), Image.Resampling.LANCZOS), (x, y))
        tag = "" if item.face_box is not None else "  (no face)"
        if item.n_faces > 1:
            tag = f"  ({item.n_faces} faces)"
        ImageDraw.Draw(sheet).text((x + 4, y + thumb + 2), f"{item.stem}{tag}"[:40], fill=(0, 0, 0), font=font)
    return sheet


def load_prepared(directory: str | os.PathLike) -> PreparedSet:
    """Read a prepared folder back. UserError if it is not one, is empty, or lost files."""
    root = Path(directory)
    try:
        data = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(f"{root}: not a prepared folder (no {MANIFEST}); run `magicstudio prepare` first") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{root / MANIFEST}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise UserError(f"{root / MANIFEST}: unsupported manifest version; re-run `magicstudio prepare`")
    if "writing" in data:
        raise UserError(f"{root}: `magicstudio prepare` did not finish there; run it again")
    try:
        items = [PreparedItem.from_manifest(root, d) for d in data["items"]]
        set_ = PreparedSet(root, data["role"], int(data["size"]), items)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{root / MANIFEST}: malformed manifest ({exc.__class__.__name__}: {exc})") from None
    if not items:
        raise UserError(f"{root}: the prepared set holds no usable photos")
    for item in items:
        for path in [item.image, *item.masks.values()]:
            if not path.is_file():
                raise UserError(f"{root}: {path.relative_to(root)} is missing; re-run `magicstudio prepare`")
    return set_


def is_prepared(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a complete, non-empty prepared set."""
    try:
        load_prepared(directory)
    except UserError:
        return False
    return True


__all__ = [
    "MASK_KINDS", "PrepareReport", "PreparedItem", "PreparedSet", "Rejected", "is_prepared", "load_prepared",
    "prepare_folder", "render_preview", "unique_stems",
]
