"""The toy world: procedural 64x64 portraits whose identity and style are known by construction.

An **identity** is a fixed choice of six attributes (face shape, skin tone, hair colour, hair style, eye colour,
accessory); every picture of it gets a small jitter (position, scale, lighting). A **style** is a background
pattern, a palette and a kind of clothing (with a random pattern phase per picture). Every picture comes with
its face / head / person masks and the five ArcFace landmarks, so the world needs no face detector, and with a
caption in Stable-Diffusion-like language ("a portrait of a person with red hair in a dotted teal style").

Twelve identities and twelve styles are **held out**: pretraining never draws them (as whole combinations; every
single attribute value does occur), and they are what the toy experiment personalises. ``write_concept_set``
writes a set of pictures as a ``magicstudio prepare`` folder (images, masks, manifest with landmarks), which
every method trains on directly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_SS = 4  # supersampling for anti-aliased edges

# --------------------------------------------------------------------------------------------------------------
# Attributes (order = class index of the toy encoders' heads)
# --------------------------------------------------------------------------------------------------------------

FACE_SHAPES = {"round": (0.19, 0.21), "oval": (0.165, 0.225), "long": (0.145, 0.245)}
SKIN_TONES = {"pale": (255, 224, 196), "light": (241, 194, 155), "tan": (224, 172, 125),
              "olive": (198, 134, 90), "brown": (141, 85, 54), "dark": (95, 60, 40)}
HAIR_COLOURS = {"black": (30, 30, 30), "brown": (101, 67, 33), "blonde": (232, 200, 110),
                "red": (185, 60, 30), "grey": (170, 170, 170), "blue": (40, 80, 210)}
HAIR_STYLES = ("short", "long", "bun", "spiky")
EYE_COLOURS = {"brown": (110, 60, 20), "blue": (40, 110, 230), "green": (40, 160, 60), "grey": (120, 130, 140)}
ACCESSORIES = ("none", "glasses", "earrings")

PATTERNS = ("striped", "diagonal", "dotted", "checkered", "wavy", "plain")
PALETTES = {"pink": ((250, 200, 220), (220, 110, 160), (150, 40, 90)),
            "teal": ((180, 232, 225), (40, 150, 140), (20, 80, 85)),
            "orange": ((255, 222, 170), (240, 140, 50), (140, 60, 10)),
            "purple": ((222, 205, 250), (130, 90, 205), (70, 30, 120)),
            "green": ((212, 240, 190), (100, 172, 70), (40, 90, 30)),
            "grey": ((236, 236, 236), (120, 120, 120), (40, 40, 40))}
CLOTHES = ("shirt", "collared shirt", "suit")

IDENTITY_ATTRS = {"face": tuple(FACE_SHAPES), "skin": tuple(SKIN_TONES), "hair": tuple(HAIR_COLOURS),
                  "hairstyle": HAIR_STYLES, "eyes": tuple(EYE_COLOURS), "accessory": ACCESSORIES}
STYLE_ATTRS = {"pattern": PATTERNS, "palette": tuple(PALETTES), "clothes": CLOTHES}


@dataclass(frozen=True)
class Identity:
    face: str
    skin: str
    hair: str
    hairstyle: str
    eyes: str
    accessory: str

    def labels(self) -> list[int]:
        return [IDENTITY_ATTRS[k].index(getattr(self, k)) for k in IDENTITY_ATTRS]

    def describe(self) -> str:
        acc = {"none": "", "glasses": ", glasses", "earrings": ", earrings"}[self.accessory]
        return f"{self.face} face, {self.skin} skin, {self.hair} {self.hairstyle} hair, {self.eyes} eyes{acc}"


@dataclass(frozen=True)
class Style:
    pattern: str
    palette: str
    clothes: str

    def labels(self) -> list[int]:
        return [STYLE_ATTRS[k].index(getattr(self, k)) for k in STYLE_ATTRS]

    def describe(self) -> str:
        return f"{self.pattern} {self.palette} background, {self.clothes}"


def _combos(attrs: dict, rng: np.random.Generator, n: int, picked: list[tuple] | None = None) -> list[tuple]:
    """``n`` distinct random attribute combinations (continuing ``picked``)."""
    sizes = [len(v) for v in attrs.values()]
    picked = list(picked or [])
    while len(picked) < n:
        c = tuple(int(rng.integers(s)) for s in sizes)
        if c not in picked:
            picked.append(c)
    return picked


N_HELD_OUT = 12  # (identity, style) pairs the toy experiments personalise (the shipped model excludes exactly these)


def _held_out() -> tuple[list[Identity], list[Style]]:
    """The held-out people and styles: the first six are the ones of the first shipped model (drawn in the same
    order), the next six were added with the second."""
    rng = np.random.default_rng(20240917)
    ids = _combos(IDENTITY_ATTRS, rng, 6)
    styles = _combos(STYLE_ATTRS, rng, 6)
    ids, styles = _combos(IDENTITY_ATTRS, rng, N_HELD_OUT, ids), _combos(STYLE_ATTRS, rng, N_HELD_OUT, styles)
    return ([Identity(*[v[i] for v, i in zip(IDENTITY_ATTRS.values(), c)]) for c in ids],
            [Style(*[v[i] for v, i in zip(STYLE_ATTRS.values(), c)]) for c in styles])


HELD_OUT_IDENTITIES, HELD_OUT_STYLES = _held_out()


def random_identity(rng: np.random.Generator, held_out: bool = False) -> Identity:
    """A random identity outside the held-out set (``held_out=True``: one of the held-out ones)."""
    if held_out:
        return HELD_OUT_IDENTITIES[int(rng.integers(len(HELD_OUT_IDENTITIES)))]
    while True:
        ident = Identity(*[v[int(rng.integers(len(v)))] for v in IDENTITY_ATTRS.values()])
        if ident not in HELD_OUT_IDENTITIES:
            return ident


def random_style(rng: np.random.Generator, held_out: bool = False) -> Style:
    if held_out:
        return HELD_OUT_STYLES[int(rng.integers(len(HELD_OUT_STYLES)))]
    while True:
        style = Style(*[v[int(rng.integers(len(v)))] for v in STYLE_ATTRS.values()])
        if style not in HELD_OUT_STYLES:
            return style


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Portrait:
    image: np.ndarray  # uint8 [64, 64, 3]
    masks: dict[str, np.ndarray]  # face / head / person: uint8 0/255 [64, 64]
    landmarks5: np.ndarray  # (5, 2) pixel coordinates, centres at integers (ArcFace order)
    face_box: np.ndarray  # xyxy
    identity: Identity
    style: Style


def _shade(c, f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(v * f)))) for v in c)


def _background(draw: ImageDraw.ImageDraw, style: Style, phase: float, s: int) -> None:
    c1, c2, _ = PALETTES[style.palette]
    draw.rectangle([0, 0, s, s], fill=c1)
    period = s / 8
    off = phase * period
    if style.pattern == "striped":
        for k in range(-1, 10):
            y = k * period + off
            draw.rectangle([0, y, s, y + period / 2], fill=c2)
    elif style.pattern == "diagonal":
        for k in range(-10, 12):
            x = k * period * 1.2 + off
            draw.polygon([(x, 0), (x + period * 0.6, 0), (x + period * 0.6 + s, s), (x + s, s)], fill=c2)
    elif style.pattern == "dotted":
        step, r = s / 6, s / 26
        for i in range(-1, 8):
            for j in range(-1, 8):
                x, y = i * step + off + (step / 2 if j % 2 else 0), j * step + off
                draw.ellipse([x - r, y - r, x + r, y + r], fill=c2)
    elif style.pattern == "checkered":
        for i in range(-1, 10):
            for j in range(-1, 10):
                if (i + j) % 2 == 0:
                    x, y = i * period + off, j * period + off
                    draw.rectangle([x, y, x + period, y + period], fill=c2)
    elif style.pattern == "wavy":
        amp, wl = s / 24, s / 4
        for k in range(-1, 6):
            base = k * s / 5 + off
            pts = [(x, base + amp * math.sin(2 * math.pi * x / wl)) for x in np.linspace(0, s, 33)]
            pts += [(x, y + s / 16) for x, y in reversed(pts)]
            draw.polygon(pts, fill=c2)
    elif style.pattern == "plain":
        for k in range(16):  # vertical gradient c1 -> c2
            t = k / 15
            col = tuple(int(a + (b - a) * t * 0.7) for a, b in zip(c1, c2))
            draw.rectangle([0, k * s / 16, s, (k + 1) * s / 16 + 1], fill=col)


def render(identity: Identity, style: Style, rng: np.random.Generator | None = None, jitter: bool = True) -> Portrait:
    """Draw one portrait (with random jitter from ``rng``; ``jitter=False``: the canonical pose)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    if jitter:
        dx, dy = rng.uniform(-0.04, 0.04), rng.uniform(-0.03, 0.03)
        scale, light, phase = rng.uniform(0.93, 1.07), rng.uniform(0.9, 1.1), rng.uniform(0, 1)
    else:
        dx = dy = 0.0
        scale, light, phase = 1.0, 1.0, 0.0
    s = SIZE * _SS
    img = Image.new("RGB", (s, s))
    d = ImageDraw.Draw(img)
    _background(d, style, phase, s)
    layers = {k: Image.new("L", (s, s), 0) for k in ("face", "head", "person")}
    md = {k: ImageDraw.Draw(v) for k, v in layers.items()}

    cx, cy = (0.5 + dx) * s, (0.42 + dy) * s
    a, b = (v * scale * s for v in FACE_SHAPES[identity.face])
    skin = SKIN_TONES[identity.skin]
    hair = HAIR_COLOURS[identity.hair]
    cloth = PALETTES[style.palette][2]

    def ell(draw_, x0, y0, x1, y1, fill):
        draw_.ellipse([x0, y0, x1, y1], fill=fill)

    # body: shoulders + neck
    top = cy + b * 0.8
    body = [(cx - 0.42 * s, s + 2), (cx - 0.36 * s, top + 0.13 * s), (cx - 0.2 * s, top + 0.05 * s),
            (cx + 0.2 * s, top + 0.05 * s), (cx + 0.36 * s, top + 0.13 * s), (cx + 0.42 * s, s + 2)]
    if identity.hairstyle == "long":  # hair behind the head and onto the shoulders
        d.rounded_rectangle([cx - a * 1.3, cy - b * 0.9, cx + a * 1.3, cy + b * 1.45], radius=a * 0.6, fill=hair)
        md["head"].rounded_rectangle([cx - a * 1.3, cy - b * 0.9, cx + a * 1.3, cy + b * 1.45], radius=a * 0.6, fill=255)
    d.rectangle([cx - a * 0.38, cy + b * 0.5, cx + a * 0.38, top + 0.08 * s], fill=_shade(skin, 0.9))
    d.polygon(body, fill=cloth)
    md["person"].polygon(body, fill=255)
    md["person"].rectangle([cx - a * 0.38, cy + b * 0.5, cx + a * 0.38, top + 0.08 * s], fill=255)
    if style.clothes == "collared shirt":
        for sgn in (-1, 1):
            d.polygon([(cx, top + 0.16 * s), (cx + sgn * 0.11 * s, top + 0.03 * s), (cx + sgn * 0.13 * s, top + 0.12 * s)],
                      fill=(245, 245, 245))
        # the button placket runs down to the bottom edge, so the shirt is told apart below the head window too
        d.rectangle([cx - 0.018 * s, top + 0.14 * s, cx + 0.018 * s, s], fill=(245, 245, 245))
        for k in range(1, 5):
            y = top + 0.14 * s + k * (s - top - 0.14 * s) / 5
            d.ellipse([cx - 0.01 * s, y - 0.01 * s, cx + 0.01 * s, y + 0.01 * s], fill=(60, 60, 60))
    elif style.clothes == "suit":
        d.polygon([(cx - 0.07 * s, top + 0.05 * s), (cx + 0.07 * s, top + 0.05 * s), (cx, s + 2)], fill=(245, 245, 245))
        d.polygon([(cx - 0.015 * s, top + 0.07 * s), (cx + 0.015 * s, top + 0.07 * s), (cx + 0.02 * s, s),
                   (cx - 0.02 * s, s)], fill=(150, 20, 30))
    # hair behind/around the top of the head
    cap = [cx - a * 1.12, cy - b * 1.18, cx + a * 1.12, cy + b * 0.35]
    ell(d, *cap, fill=hair)
    ell(md["head"], *cap, fill=255)
    if identity.hairstyle == "bun":
        r = a * 0.5
        bun = [cx - r, cy - b * 1.1 - 1.6 * r, cx + r, cy - b * 1.1 + 0.4 * r]
        ell(d, *bun, fill=hair)
        ell(md["head"], *bun, fill=255)
    elif identity.hairstyle == "spiky":
        for k in range(5):
            x = cx + (k - 2) * a * 0.45
            spike = [(x - a * 0.28, cy - b * 0.95), (x + a * 0.28, cy - b * 0.95), (x, cy - b * 1.55)]
            d.polygon(spike, fill=hair)
            md["head"].polygon(spike, fill=255)
    # ears, face
    for sgn in (-1, 1):
        ell(d, cx + sgn * a - a * 0.16, cy - b * 0.12, cx + sgn * a + a * 0.16, cy + b * 0.2, fill=_shade(skin, 0.92))
        ell(md["head"], cx + sgn * a - a * 0.16, cy - b * 0.12, cx + sgn * a + a * 0.16, cy + b * 0.2, fill=255)
    face_box = [cx - a, cy - b, cx + a, cy + b]
    ell(d, *face_box, fill=skin)
    ell(md["face"], *face_box, fill=255)
    ell(md["head"], *face_box, fill=255)
    # fringe over the forehead (all styles)
    d.chord([cx - a * 1.02, cy - b * 1.08, cx + a * 1.02, cy - b * 0.2], 180, 360, fill=hair)
    md["face"].chord([cx - a * 1.02, cy - b * 1.08, cx + a * 1.02, cy - b * 0.2], 180, 360, fill=0)
    # eyes, nose, mouth
    ey, ex = cy + b * 0.02, a * 0.42
    er = a * 0.2
    eyes = []
    for sgn in (-1, 1):
        x = cx + sgn * ex
        ell(d, x - er * 1.25, ey - er * 0.8, x + er * 1.25, ey + er * 0.8, fill=(250, 250, 250))
        ell(d, x - er * 0.7, ey - er * 0.7, x + er * 0.7, ey + er * 0.7, fill=EYE_COLOURS[identity.eyes])
        ell(d, x - er * 0.3, ey - er * 0.3, x + er * 0.3, ey + er * 0.3, fill=(10, 10, 10))
        eyes.append((x, ey))
    ny = cy + b * 0.3
    d.polygon([(cx, ny - b * 0.14), (cx - a * 0.1, ny), (cx + a * 0.1, ny)], fill=_shade(skin, 0.75))
    my, mw = cy + b * 0.58, a * 0.36
    d.chord([cx - mw, my - b * 0.12, cx + mw, my + b * 0.12], 0, 180, fill=(150, 40, 50))
    if identity.accessory == "glasses":
        w = max(2, int(s / 90))
        for x, y in eyes:
            d.ellipse([x - er * 1.7, y - er * 1.5, x + er * 1.7, y + er * 1.5], outline=(20, 20, 20), width=w)
        d.line([(eyes[0][0] + er * 1.7, ey), (eyes[1][0] - er * 1.7, ey)], fill=(20, 20, 20), width=w)
    elif identity.accessory == "earrings":
        for sgn in (-1, 1):
            x, y = cx + sgn * a * 1.02, cy + b * 0.32
            ell(d, x - a * 0.1, y - a * 0.1, x + a * 0.1, y + a * 0.1, fill=(240, 190, 20))

    small = img.resize((SIZE, SIZE), Image.BOX)
    arr = np.asarray(small, dtype=np.float32) * light
    image = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    masks = {}
    for k, layer in layers.items():
        m = np.asarray(layer.resize((SIZE, SIZE), Image.BOX)) >= 128
        masks[k] = (m.astype(np.uint8) * 255)
    masks["head"] = np.maximum(masks["head"], masks["face"])
    masks["person"] = np.maximum(masks["person"], masks["head"])
    k = SIZE / s
    mouth = [(cx - mw * 0.9, my), (cx + mw * 0.9, my)]
    pts = np.array(eyes + [(cx, ny)] + mouth, dtype=np.float64) * k - 0.5
    box = np.array(face_box, dtype=np.float64) * k - np.array([0.5, 0.5, 0.5, 0.5])
    return Portrait(image, masks, pts, box, identity, style)


#: the window every head of the world falls inside (rows, cols of a 64x64 picture; all jitter and hairstyles)
HEAD_WINDOW = (slice(0, 48), slice(8, 56))


def head_window_mask(size: int = SIZE) -> np.ndarray:
    """uint8 0/255 mask of :data:`HEAD_WINDOW` at ``size`` px (the region the style encoder never sees)."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[HEAD_WINDOW] = 255
    if size != SIZE:
        m = np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST))
    return m


@functools.lru_cache(maxsize=1)
def canonical_portrait() -> Portrait:
    """The un-jittered pose (rendered once; do not modify its arrays): where a face of this world is when nothing
    else is known."""
    return render(HELD_OUT_IDENTITIES[0], HELD_OUT_STYLES[0], jitter=False)


def canonical_face(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Face box (xyxy) and 5 landmarks of :func:`canonical_portrait` at ``size`` px (the toy world's "face detector"
    for generated pictures)."""
    p = canonical_portrait()
    k = size / SIZE
    return (p.face_box + 0.5) * k - 0.5, (p.landmarks5 + 0.5) * k - 0.5


# --------------------------------------------------------------------------------------------------------------
# Captions and datasets
# --------------------------------------------------------------------------------------------------------------

_PREFIXES = ("a photo of", "a portrait of", "a painting of", "an image of", "a picture of")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe_person(identity: Identity) -> str:
    """Every identity attribute in words: "a person with blonde spiky hair, blue eyes, dark skin and a round face,
    wearing glasses" (the prompts that measure the base model, and half of the ``described`` captions)."""
    acc = "" if identity.accessory == "none" else f", wearing {identity.accessory}"
    return (f"a person with {identity.hair} {identity.hairstyle} hair, {identity.eyes} eyes, {identity.skin} skin "
            f"and {_article(identity.face)} {identity.face} face{acc}")


def describe_style(style: Style) -> str:
    """Every style attribute in words: "in a dotted teal style wearing a suit"."""
    return f"in a {style.pattern} {style.palette} style wearing a {style.clothes}"


def _identity_phrases(identity: Identity) -> list[str]:
    """One phrase per identity attribute ("with red hair", ...; the accessory only when there is one)."""
    phrases = [f"with {identity.hair} hair", f"with {identity.hairstyle} hair", f"with {identity.eyes} eyes",
               f"with {identity.skin} skin", f"with {_article(identity.face)} {identity.face} face"]
    if identity.accessory != "none":
        phrases.append(f"wearing {identity.accessory}")
    return phrases


def _some_phrases(phrases: list[str], n: int, rng: np.random.Generator) -> str:
    """"a person" and ``n`` of ``phrases`` in random order."""
    return " ".join(["a person"] + [phrases[i] for i in rng.permutation(len(phrases))[:n]])


def _style_tail(style: Style, r: float, cuts: tuple[float, float, float]) -> str:
    """The style part of a caption, chosen by ``r`` in [0, 1): none below ``cuts[0]``, pattern and palette below
    ``cuts[1]``, the pattern alone below ``cuts[2]``, else the palette alone."""
    if r < cuts[0]:
        return ""
    if r < cuts[1]:
        return f" in a {style.pattern} {style.palette} style"
    if r < cuts[2]:
        return f" in a {style.pattern} style"
    return f" in a {style.palette} style"


def described_caption(identity: Identity, style: Style, rng: np.random.Generator) -> str:
    """The ``described`` caption design: half of the time every identity attribute (:func:`describe_person`),
    otherwise 0-5 of them; the style in full, in part, or not at all. (Tried as a fine-tune of the shipped model,
    1500 steps: identity attributes stayed near chance; see docs/toyworld.md.)"""
    if rng.random() < 0.5:
        subject = describe_person(identity)
    else:
        phrases = _identity_phrases(identity)
        subject = _some_phrases(phrases, int(rng.integers(0, len(phrases))), rng)
    tail = _style_tail(style, rng.random(), (0.15, 0.65, 0.82))
    if tail and rng.random() < 0.4:
        tail += f" wearing a {style.clothes}"
    return f"{_PREFIXES[int(rng.integers(len(_PREFIXES)))]} {subject}{tail}"


CAPTIONS = {"alt-text": None, "described": described_caption}  # pretraining caption designs ("alt-text": caption)


def caption(identity: Identity, style: Style, rng: np.random.Generator) -> str:
    """A caption that names some of the attributes (never all), like web alt-text."""
    subject = _some_phrases(_identity_phrases(identity), int(rng.integers(0, 3)), rng)
    tail = _style_tail(style, rng.random(), (0.3, 0.65, 0.85))
    if rng.random() < 0.3:
        tail += f" wearing a {style.clothes}"
    return f"{_PREFIXES[int(rng.integers(len(_PREFIXES)))]} {subject}{tail}"


def pretraining_batch(rng: np.random.Generator, n: int, masks: list | None = None, captions: str = "alt-text",
                      faces: list | None = None) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """``n`` pretraining pictures: images uint8 [n, 64, 64, 3], captions (design ``captions``: a key of
    :data:`CAPTIONS`), identity labels [n, 6], style labels [n, 3] (``masks`` / ``faces``: lists that receive each
    picture's head / face mask)."""
    make_caption = CAPTIONS[captions] or caption
    imgs, caps, ids, sts = [], [], [], []
    for _ in range(n):
        ident, style = random_identity(rng), random_style(rng)
        p = render(ident, style, rng)
        imgs.append(p.image)
        if masks is not None:
            masks.append(p.masks["head"])
        if faces is not None:
            faces.append(p.masks["face"])
        caps.append(make_caption(ident, style, rng))
        ids.append(ident.labels())
        sts.append(style.labels())
    return np.stack(imgs), caps, np.array(ids), np.array(sts)


def concept_set(kind: str, index: int, n: int = 5, seed: int = 0) -> list[Portrait]:
    """Held-out personalisation set ``index``: ``kind="identity"`` = the held-out person in ``n`` pretraining styles;
    ``kind="style"`` = ``n`` pretraining people in the held-out style."""
    rng = np.random.default_rng([seed, index, 0 if kind == "identity" else 1])
    if kind == "identity":
        ident = HELD_OUT_IDENTITIES[index]
        return [render(ident, random_style(rng), rng) for _ in range(n)]
    if kind == "style":
        style = HELD_OUT_STYLES[index]
        return [render(random_identity(rng), style, rng) for _ in range(n)]
    raise ValueError(f"kind must be 'identity' or 'style', not {kind!r}")


def write_concept_set(portraits: list[Portrait], out: str | Path, role: str, size: int = SIZE) -> Path:
    """Write pictures as a prepared folder (``magicstudio.data.prepare`` layout) at ``size`` px; masks and
    landmarks come from the generator, so no face detector is involved."""
    from .. import __version__
    from ..io import write_json
    from .prepare import MANIFEST, MANIFEST_VERSION, PreparedItem, render_preview

    out = Path(out)
    for sub in ("images", "masks/face", "masks/head", "masks/person"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    k = size / SIZE
    items = []
    for i, p in enumerate(portraits):
        stem = f"{role}-{i:02d}"
        img_path = out / "images" / f"{stem}.png"
        Image.fromarray(p.image).resize((size, size), Image.BICUBIC).save(img_path)
        masks = {}
        for kind, m in p.masks.items():
            mp = out / "masks" / kind / f"{stem}.png"
            Image.fromarray(m).resize((size, size), Image.NEAREST).save(mp)
            masks[kind] = mp
        scale = lambda a: (np.asarray(a) + 0.5) * k - 0.5  # noqa: E731 - pixel centres at integers
        items.append(PreparedItem(stem=stem, image=img_path, masks=masks, source=f"toyworld:{stem}",
                                  original_size=(size, size), crop_box=(0, 0, size, size),
                                  face_box=scale(p.face_box), landmarks5=scale(p.landmarks5), n_faces=1, chosen=0))
    render_preview(items).save(out / "preview.png")
    write_json(out / MANIFEST, {"version": MANIFEST_VERSION, "magicstudio": __version__, "role": role, "size": size,
                                "input_dir": "toyworld", "masks_dir": None,
                                "items": [it.to_manifest(out) for it in items], "rejected": [], "warnings": []})
    return out


def grid(images: list[np.ndarray], columns: int) -> Image.Image:
    """Tile equal-size uint8 RGB images."""
    h, w = images[0].shape[:2]
    rows = math.ceil(len(images) / columns)
    canvas = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        canvas.paste(Image.fromarray(im), ((i % columns) * w, (i // columns) * h))
    return canvas
