"""Photos from the browser: checked by decoding, stored under server-made names, prepared with their masks.

A client's file name is only ever shown back (shortened, in a rejection line); it never becomes part of a path.
Everything a session writes is under ``DATA/sessions/<32 hex digits>/``:

    source-photos/photo-00.png ...      the uploads re-encoded as PNG (EXIF rotation applied)
    reference-photos/...
    source/  reference/                 the prepared sets (``data.prepare`` layout; the toy world writes them directly)
    tiles/<role>-<stem>.png             each crop with its face (green) and head (orange) masks
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

MAX_FILES = 12  # per set
MAX_BYTES = 15 * 1024 * 1024  # per photo
MAX_PIXELS = 40_000_000
MIN_SIDE = 64
SESSION_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class PreparedView:
    """What the Studio shows for one prepared set."""

    folder: Path | None
    tiles: list[tuple[str, str]] = field(default_factory=list)  # (picture, caption)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (shown name, reason)
    warnings: list[str] = field(default_factory=list)


def new_session(data: Path) -> str:
    sid = secrets.token_hex(16)
    (Path(data) / "sessions" / sid).mkdir(parents=True)
    return sid


def session_dir(data: Path, sid: str) -> Path:
    if not isinstance(sid, str) or not SESSION_RE.match(sid):
        raise UserError("this page's session is not valid; reload the page")
    folder = Path(data) / "sessions" / sid
    if not folder.is_dir():
        raise UserError("this page's session has expired; reload the page")
    return folder


def shown_name(name: str) -> str:
    """A client's file name as shown back: its last component, printable, at most 60 characters."""
    base = re.split(r"[\\/]", str(name))[-1]
    base = "".join(c if c.isprintable() else "?" for c in base)
    return base if len(base) <= 60 else base[:28] + "..." + base[-29:]


def decode_photo(path: Path, max_bytes: int = MAX_BYTES) -> Image.Image:
    """The photo as RGB, or a UserError with the reason (too big, not an image, truncated, too small)."""
    size = path.stat().st_size
    if size > max_bytes:
        raise UserError(f"{size / 2**20:.1f} MB is over the {max_bytes / 2**20:.0f} MB limit")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise UserError(f"{im.width}x{im.height} pixels is over the {MAX_PIXELS // 10**6} megapixel limit")
            im.verify()
        with Image.open(path) as im:
            im.load()
            image = ImageOps.exif_transpose(im).convert("RGB")
    except UnidentifiedImageError:
        raise UserError("not an image (it could not be decoded as one)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"a damaged image ({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__})") from None
    if min(image.size) < MIN_SIDE:
        raise UserError(f"{image.width}x{image.height} is too small (at least {MIN_SIDE} px a side)")
    return image


def store_photos(files: list[tuple[str, str]], folder: Path, max_files: int = MAX_FILES) -> tuple[list[Path], list[tuple[str, str]]]:
    """``files``: (server path of the upload, client's name). Good photos become ``folder/photo-NN.png``; the rest
    are returned as (shown name, reason). The folder is replaced: it holds exactly this upload."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    stored, rejected, names = [], [], {}
    for i, (path, name) in enumerate(files):
        shown = shown_name(name)
        if i >= max_files:
            rejected.append((shown, f"over the limit of {max_files} photos per set"))
            continue
        try:
            image = decode_photo(Path(path))
        except UserError as exc:
            rejected.append((shown, str(exc)))
            continue
        target = folder / f"photo-{len(stored):02d}.png"
        image.save(target, format="PNG")
        names[target.name] = shown
        stored.append(target)
    (folder / "names.json").write_text(json.dumps(names))
    return stored, rejected


def prepare_uploads(files: list[tuple[str, str]], role: str, session: Path, size: int = 512) -> PreparedView:
    """Store, then prepare one set (face crops and masks; photos without a face are rejected with the reason)."""
    from ..data.prepare import prepare_folder

    raw = session / f"{role}-photos"
    stored, rejected = store_photos(files, raw)
    out = session / role
    if out.exists():
        shutil.rmtree(out)
    if not stored:
        return PreparedView(None, [], rejected, [f"no usable {role} photo"] if files else [])
    names = json.loads((raw / "names.json").read_text())
    report = prepare_folder(raw, role, out, size=size, progress=False)
    rejected += [(names.get(Path(r.path).name, Path(r.path).name), r.reason) for r in report.rejected]
    view = _view(out, role, session)
    view.rejected, view.warnings = rejected, list(report.warnings)
    return view


def sample_sets(session: Path, model: str) -> tuple[PreparedView, PreparedView]:
    """The bundled samples: the toy world's held-out person and style (model ``toyworld``), else the demo's
    photo sets made from the bundled public-domain portraits, prepared like uploads."""
    if model == "toyworld":
        from ..data import toyworld as tw

        views = []
        for role, kind in (("source", "identity"), ("reference", "style")):
            out = session / role
            if out.exists():
                shutil.rmtree(out)
            tw.write_concept_set(tw.concept_set(kind, 0, 5), out, role)
            views.append(_view(out, role, session))
        return views[0], views[1]
    from ..data.images import list_images
    from ..data.samples import make_demo_sets

    src, ref = make_demo_sets(session / "samples")
    return tuple(prepare_uploads([(str(p), p.name) for p in list_images(d)], role, session)
                 for role, d in (("source", src), ("reference", ref)))


def _view(out: Path, role: str, session: Path) -> PreparedView:
    from ..data.prepare import load_prepared, render_preview

    tiles_dir = session / "tiles"
    tiles_dir.mkdir(exist_ok=True)
    for old in tiles_dir.glob(f"{role}-*.png"):
        old.unlink()
    tiles = []
    for item in load_prepared(out).items:
        tile = tiles_dir / f"{role}-{item.stem}.png"
        render_preview([item], thumb=192, columns=1).save(tile)
        face = item.mask_stats.get("face", {}).get("area")
        tiles.append((str(tile), f"{item.stem}: face mask {face:.0%} of the crop" if face is not None else item.stem))
    return PreparedView(out, tiles)


def store_concept(path: str, session: Path, index: int, kind: str = "image") -> Path:
    """One MagicFace upload (a concept's photo, or its mask), decoded and re-encoded as ``magicface/<kind>-N.png``."""
    folder = session / "magicface"
    folder.mkdir(exist_ok=True)
    try:
        image = decode_photo(Path(path))
    except UserError as exc:
        raise UserError(f"concept {index + 1}'s {kind}: {exc}") from None
    target = folder / f"{kind}-{index}.png"
    image.save(target, format="PNG")
    return target


def sample_concepts(session: Path, model: str) -> list[tuple[str, Path, Path | None]]:
    """MagicFace samples: in the toy world the held-out person's face and another person's hair (with its mask, as
    ``magicstudio demo`` does); otherwise a bundled portrait as "person" (automatic mask)."""
    import numpy as np

    folder = session / "magicface"
    folder.mkdir(exist_ok=True)
    if model != "toyworld":
        from ..data.samples import sample_photos

        target = folder / "sample-person.png"
        decode_photo(sample_photos()[1]).save(target)
        return [("person", target, None)]
    from ..data import toyworld as tw

    person = tw.concept_set("identity", 0, 1)[0]
    donor = tw.render(tw.HELD_OUT_IDENTITIES[1], tw.HELD_OUT_STYLES[1], np.random.default_rng(1))
    hair = np.where(donor.masks["face"] > 0, 0, donor.masks["head"]).astype(np.uint8)
    files = []
    for word, image, mask in (("person", person.image, person.masks["face"]), ("hair", donor.image, hair)):
        img, msk = folder / f"sample-{word}.png", folder / f"sample-{word}-mask.png"
        Image.fromarray(image).save(img)
        Image.fromarray(mask).save(msk)
        files.append((word, img, msk))
    return files
