"""``magicstudio toyworld table``: the paper's Table 1 in miniature, on held-out toy identities and styles.

Pair ``i`` = held-out identity ``i`` (5 pictures in pretraining styles) x held-out style ``i`` (5 pretraining
people in that style), written as prepared folders (masks and landmarks from the generator). Every method is
trained, sampled with the composed prompt and scored by the real benchmark harness (``experiments/bench.py``) with the
toy encoders plugged into ``evaluate_images`` (``face_backend="toyworld"`` -> toy-CSIM, ``clip_model="toyworld"``
-> toy-Style). On top, per generated image, the identity token's **attention spill**: the share of its
cross-attention (conditional branch, layers at 1/2 of the latent resolution = 8x8, averaged over heads, layers and
steps) that falls outside the face, where the face is the un-jittered face ellipse of the world (faces of this
world sit within ~2.5 px of it). Two reference rows frame the numbers: ``ideal`` = fresh renders of the held-out
person in the held-out style (the ceiling), ``base`` = the pretrained model with "a photo of a person" (chance).

Layout: ``OUT/pairs/pair-<i>/{source,reference}``, ``OUT/bench/`` (the harness's cells and report),
``OUT/spill/<pair>/<method>.json``, ``OUT/table.md``, ``OUT/table.json``, ``OUT/grids/<method>.png``, ``OUT/grid.png``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ...data import toyworld as world
from ...errors import UserError
from ...io import atomic_write, write_json

DEFAULT_METHODS = ("magicapture", "magicapture-no-ar-cp", "dreambooth", "textual-inversion", "custom-diffusion")
N_PAIRS = len(world.HELD_OUT_IDENTITIES)
SPILL_LAYERS = "res:2"

#: per-method settings of the toy experiment (on top of each method's ``smoke`` preset)
TOY_SETTINGS: dict[str, dict] = {
    "*": dict(model="toyworld", deterministic=True),  # one thread: the published figures are bit-reproducible
    # colour is identity (skin, hair) and style (palette) in this world: no colour jitter (baselines have none)
    "magicapture": dict(ti_steps=150, lora_steps=450, face_encoder="toyworld", ar_layers=SPILL_LAYERS,
                        color_jitter=0.0, checkpoint_every=200, sample_steps=10,
                        decode_precision="fp32"),  # results must not depend on the CPU's bf16 support
    "dreambooth": dict(steps=400, lr=5e-5, num_class_images=20, class_steps=20, checkpoint_every=200),
    "textual-inversion": dict(steps=600, lr=5e-3, checkpoint_every=200),
    "custom-diffusion": dict(steps=400, lr=5e-4, num_class_images=20, class_steps=20, checkpoint_every=200),
}
QUICK_SETTINGS: dict[str, dict] = {
    "*": dict(model="toyworld"),
    "magicapture": dict(ti_steps=4, lora_steps=8, face_encoder="toyworld", ar_layers=SPILL_LAYERS, checkpoint_every=50),
    "dreambooth": dict(steps=6, num_class_images=2, class_steps=4, checkpoint_every=50),
    "textual-inversion": dict(steps=6, checkpoint_every=50),
    "custom-diffusion": dict(steps=6, checkpoint_every=50),
}


def _method_settings(method: str, table: dict[str, dict]) -> dict:
    """``table``'s settings for ``method``: those of its family (a method and its ablations), then its own."""
    from ...methods import get_method

    family = get_method(method).family
    return dict(table.get(family, {})) | (dict(table.get(method, {})) if method != family else {})


def table_overrides(methods, table: dict[str, dict], extra: dict[str, dict] | None = None) -> dict[str, dict]:
    """The harness's per-method settings: the toy ones (``table``), then the user's ``extra`` (``"*"``: every
    method that has the setting; a family, e.g. ``"magicapture"``: MagiCapture and its ablations; or a method
    name), which win."""
    from ...methods import get_method
    from ..bench import method_settings

    extra = dict(extra or {})
    families = {get_method(m).family for m in methods}
    stray = [k for k in extra if k != "*" and k not in families and k not in methods]
    if stray:
        raise UserError(f"--set names {', '.join(stray)}, which is not among the methods ({', '.join(methods)})")
    star = extra.get("*", {})
    overrides: dict[str, dict] = {"*": dict(table["*"]) | star}  # the harness refuses keys no method knows
    for m in methods:
        known = method_settings(m)
        overrides[m] = (_method_settings(m, table) | {k: v for k, v in star.items() if k in known}
                        | _method_settings(m, extra))
    return overrides


def write_pairs(out: Path, pairs: list[int], n_images: int = 5) -> list:
    """Held-out pairs as prepared folders; returns bench ``Pair``s."""
    from ..bench import Pair

    result = []
    for i in pairs:
        root = out / "pairs" / f"pair-{i}"
        src, ref = root / "source", root / "reference"
        for kind, folder in (("identity", src), ("style", ref)):
            if not (folder / "manifest.json").is_file():
                world.write_concept_set(world.concept_set(kind, i, n_images), folder,
                                        "source" if kind == "identity" else "reference")
        result.append(Pair(f"pair-{i}", src, ref))
    return result


# --------------------------------------------------------------------------------------------------------------
# Attention spill of the identity token during generation
# --------------------------------------------------------------------------------------------------------------


def face_region(size: int) -> torch.Tensor:
    """The un-jittered face ellipse as a float mask [1, 1, size, size]."""
    m = torch.from_numpy(world.canonical_portrait().masks["face"].astype(np.float32) / 255.0)[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(m, size) if size != m.shape[-1] else m


@torch.no_grad()
def generation_spill(run_dir: Path, prompt: str, n: int, seed: int, steps: int, guidance: float) -> list[float]:
    """Per image (seeds ``seed..seed+n-1``, as the harness generated them): share of the identity token's attention
    outside the face region, at :data:`SPILL_LAYERS`."""
    from ...losses.attention import attention_spill
    from ...training.generate import load_run_pipeline
    from ...training.sampling import AttentionRecorder

    pipe, cfg, tokens = load_run_pipeline(run_dir, "ddim")
    tid = pipe.tokenizer.convert_tokens_to_ids(cfg["v1"])
    size = int(cfg.get("resolution") or 64)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    face = None
    values = []
    for i in range(n):
        rec = AttentionRecorder(pipe, [tid], SPILL_LAYERS)
        rec.set_prompt_ids(ids, n_uncond=1 if guidance > 1 else 0)
        with rec:
            pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                 generator=torch.Generator().manual_seed(seed + i), callback_on_step_end=rec.callback)
        heat = rec.maps()[0][..., 0]  # (S, S)
        maps = heat[None, None, None, :, :]  # (L=1, B=1, heads=1, S, S)
        face = face if face is not None else face_region(heat.shape[-1])
        values.append(float(attention_spill(maps, face)[0]))
    return values


@torch.no_grad()
def picture_spill(run_dir: Path, source_dir: Path, prompt: str, timesteps=(100, 300, 500, 700), seed: int = 0
                  ) -> list[float]:
    """Per source picture (true face masks from the generator): share of the identity token's attention outside the
    face when the run's UNet denoises that picture noised to each of ``timesteps`` (fixed noise) under ``prompt``;
    averaged over the timesteps. The same quantity as training's ``attn_spill_v1``, on every method alike."""
    from ...attention.capture import AttentionStore, install_capture, restore_processors, select_layers, stack_token_maps
    from ...data.prepare import load_prepared
    from ...losses.attention import attention_spill
    from ...training.generate import load_run_pipeline
    from ...training.personalize import encode_prompt

    pipe, cfg, _ = load_run_pipeline(run_dir, "ddim")
    emb, positions = encode_prompt(pipe, prompt, [pipe.tokenizer.convert_tokens_to_ids(cfg["v1"])])
    if int(positions[0, 0]) < 0:
        return []
    store = AttentionStore()
    previous = install_capture(pipe.unet, store, select_layers(pipe.unet, SPILL_LAYERS))
    vae, sched = pipe.vae, pipe.scheduler
    alphas = sched.alphas_cumprod
    values = []
    try:
        for k, item in enumerate(load_prepared(source_dir)):
            x = torch.from_numpy(np.array(item.load_image())).permute(2, 0, 1)[None].float() / 127.5 - 1
            z0 = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            mask = torch.from_numpy(item.load_mask("face").astype(np.float32) / 255.0)[None, None]
            per_t = []
            for t in timesteps:
                noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + 1000 * k + t))
                a = alphas[t]
                zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
                store.reset()
                store.token_index = positions
                pipe.unet(zt, torch.tensor([t]), emb)
                maps = stack_token_maps(store)[..., 0]  # (L, 1, heads, S, S)
                per_t.append(float(attention_spill(maps, mask)[0]))
            values.append(float(np.mean(per_t)))
    finally:
        restore_processors(pipe.unet, previous)
    return values


# --------------------------------------------------------------------------------------------------------------
# Reference rows
# --------------------------------------------------------------------------------------------------------------


def _write_images(images: list[np.ndarray], folder: Path) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = folder / f"{i:03d}.png"
        Image.fromarray(im).save(p)
        paths.append(p)
    return paths


def base_images(folder: Path, n: int, seed: int = 0, steps: int = 25, guidance: float = 5.0) -> list[Path]:
    """The pretrained toy model without personalisation ("a photo of a person", seeds ``seed..seed+n-1``): the
    chance-level comparison row. Images already in ``folder`` are reused."""
    from ...models.base import load_base

    paths = [Path(folder) / f"{k:03d}.png" for k in range(n)]
    if not all(p.is_file() for p in paths):
        comps = load_base("toyworld")
        pipe = comps.pipeline(scheduler=comps.inference_scheduler("ddim"))
        imgs = [np.asarray(pipe(prompt="a photo of a person", num_inference_steps=steps, guidance_scale=guidance,
                                height=64, width=64, generator=torch.Generator().manual_seed(seed + k)).images[0])
                for k in range(n)]
        _write_images(imgs, Path(folder))
    return paths


def reference_rows(out: Path, pairs: list, n: int, seed: int, steps: int, guidance: float) -> dict[str, dict]:
    """``ideal`` (renders of the held-out person in the held-out style) and ``base`` (the pretrained model,
    "a photo of a person": the same images for every pair) scored like the methods."""
    from ...evaluation import evaluate_images

    rows: dict[str, dict] = {"ideal": {}, "base": {}}
    base = base_images(out / "reference-rows" / "base", n, seed, steps, guidance)
    for pair in pairs:
        i = int(pair.name.split("-")[1])
        rng = np.random.default_rng([seed, i, 7])
        ideal = [world.render(world.HELD_OUT_IDENTITIES[i], world.HELD_OUT_STYLES[i], rng).image for _ in range(n)]
        ideal_paths = _write_images(ideal, out / "reference-rows" / pair.name / "ideal")
        for name, images in (("ideal", ideal_paths), ("base", base)):
            rep = evaluate_images(images, pair.source, pair.reference, metrics=["csim", "style"],
                                  face_backend="toyworld", clip_model="toyworld")
            rows[name][pair.name] = {m: [im[m] for im in rep["images"]] for m in ("csim", "style")}
    return rows


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------


def pair_means(per_pair: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each pair's finite values (pairs without any are left out)."""
    out = {}
    for pair, vs in per_pair.items():
        good = [v for v in vs if v is not None and not math.isnan(v)]
        if good:
            out[pair] = float(np.mean(good))
    return out


def bootstrap_ci(values: list[float], n_boot: int = 4000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (here: per-pair means, so pairs are the unit that is
    resampled: the interval says how much the figure would move with other held-out people and styles)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float(v.mean())
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    boots = v[idx].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _stats(per_pair: dict[str, list[float]]) -> dict:
    """Mean over pairs of the per-pair means, its bootstrap 95 % interval (over pairs), and the std of all values."""
    means = pair_means(per_pair)
    if not means:
        return {"mean": None, "ci": None, "std": None, "pairs": 0}
    vals = [v for vs in per_pair.values() for v in vs if v is not None and not math.isnan(v)]
    m = list(means.values())
    return {"mean": float(np.mean(m)), "ci": bootstrap_ci(m), "std": float(np.std(vals)), "pairs": len(m)}


def compare(a: dict[str, list[float]], b: dict[str, list[float]], higher_is_better: bool = True) -> dict:
    """Paired comparison of two rows over the pairs both have: the mean per-pair difference a - b, its bootstrap
    95 % interval, and a verdict: ``"better"`` / ``"worse"`` (for a, given which direction is better) when the
    interval excludes 0, else ``"cannot tell"``."""
    ma, mb = pair_means(a), pair_means(b)
    common = sorted(set(ma) & set(mb))
    if len(common) < 2:
        return {"diff": None, "ci": None, "pairs": len(common), "verdict": "cannot tell"}
    d = [ma[p] - mb[p] for p in common]
    lo, hi = bootstrap_ci(d)
    if higher_is_better:
        verdict = "better" if lo > 0 else "worse" if hi < 0 else "cannot tell"
    else:
        verdict = "better" if hi < 0 else "worse" if lo > 0 else "cannot tell"
    return {"diff": float(np.mean(d)), "ci": (lo, hi), "pairs": len(common), "verdict": verdict}


def run_table(out: str | Path, n_pairs: int | None = None, methods: tuple[str, ...] = DEFAULT_METHODS,
              images: int = 8, steps: int = 25, guidance: float = 5.0, seed: int = 0, quick: bool = False,
              progress: bool = True, extra: dict[str, dict] | None = None) -> dict:
    """Run (or resume) the toy experiment and write ``table.md`` / ``table.json`` / grids into ``out``.

    ``extra``: settings on top of the toy ones, keyed ``"*"`` (every method), a method name, or ``"magicapture"``
    (MagiCapture and its ablations), e.g. ``{"magicapture": {"lora_lr": 5e-4}}`` (``--set magicapture.lora_lr=5e-4``).
    """
    from ...models.toyworld import ENCODERS_FILE, held_out_pairs, toyworld_weights
    from ...methods import METHODS
    from ..bench import BenchSettings, run_bench

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    for f in (toyworld_weights(), toyworld_weights(ENCODERS_FILE)):
        if not f.is_file():
            raise UserError(f"the toy world is not trained yet ({f} missing): run `magicstudio toyworld pretrain`")
    unseen = min(N_PAIRS, held_out_pairs())  # a pair the model saw in pretraining would flatter every method
    if n_pairs is None:
        n_pairs = unseen
    if not 1 <= n_pairs <= unseen:
        raise UserError(f"--pairs must be between 1 and {unseen} (the held-out pairs the toy model in use never saw)")
    out = Path(out)
    t0 = time.time()
    pairs = write_pairs(out, list(range(n_pairs)))
    overrides = table_overrides(methods, QUICK_SETTINGS if quick else TOY_SETTINGS, extra)
    settings = BenchSettings(methods=list(methods), images_per_pair=images, preset="smoke", seed=seed, steps=steps,
                             guidance=guidance, metrics=["csim", "style"], face_backend="toyworld",
                             eval_options={"clip_model": "toyworld"}, overrides=overrides)
    result = run_bench(pairs, settings, out / "bench", progress=progress)
    timings = {}

    # attention spill of the identity token, per cell (cached): during generation, and on the source pictures
    spill: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    pspill: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    sources = {p.name: p.source for p in pairs}
    for cell in result.cells:
        if cell.get("status") != "done":
            continue
        run_dir = out / "bench" / "cells" / cell["pair"] / cell["method"] / "run"
        for kind, store, fn in (("spill", spill, lambda: generation_spill(run_dir, cell["prompt"], images, seed, steps, guidance)),
                                ("picture-spill", pspill, lambda: picture_spill(run_dir, sources[cell["pair"]], cell["prompt"]))):
            path = out / kind / cell["pair"] / f"{cell['method']}.json"
            if path.is_file():
                got = json.loads(path.read_text())
            else:
                got = fn()
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json(path, got)
            store[cell["method"]][cell["pair"]] = got
        timings[f"{cell['pair']}/{cell['method']}"] = cell.get("timings", {})

    # per-image metric values from the harness's eval.json files
    values: dict[str, dict[str, dict[str, list]]] = {
        m: {"csim": {}, "style": {}, "spill": spill[m], "picture_spill": pspill[m]} for m in methods}
    for cell in result.cells:
        ev = out / "bench" / "cells" / cell["pair"] / cell["method"] / "eval.json"
        if cell.get("status") == "done" and ev.is_file():
            rep = json.loads(ev.read_text())
            for m in ("csim", "style"):
                values[cell["method"]][m][cell["pair"]] = [im.get(m) for im in rep["images"]]
    refs = reference_rows(out, pairs, images, seed, steps, guidance)
    for name, per_pair in refs.items():
        values[name] = {"csim": {p: v["csim"] for p, v in per_pair.items()},
                        "style": {p: v["style"] for p, v in per_pair.items()}, "spill": {}, "picture_spill": {}}

    rows = []
    for method, by_metric in values.items():
        row = {"method": method}
        for metric, per_pair in by_metric.items():
            row[metric] = _stats(per_pair)
        rows.append(row)
    claims = paper_claims(values)
    summary = {"pairs": [p.name for p in pairs], "methods": list(methods), "images_per_pair": images,
               "sampling_steps": steps, "guidance": guidance, "seed": seed, "quick": quick,
               "settings": overrides, "rows": rows, "claims": claims, "values": values, "failed": [
                   {"pair": c["pair"], "method": c["method"], "error": c.get("error")} for c in result.failed],
               "timings": timings, "total_s": round(time.time() - t0)}
    write_json(out / "table.json", summary)
    md = markdown(summary)
    atomic_write(out / "table.md", lambda p: p.write_text(md))
    write_grids(out, pairs, list(methods), images)
    return summary


#: the paper's claims as ordered comparisons (a, b, metric, higher is better): identity (Table 1's CSIM order),
#: style, and Attention Refocusing's purpose (the identity token's attention stays on the face)
PAPER_CLAIMS = (
    ("magicapture", "magicapture-no-ar-cp", "csim", True),
    ("magicapture-no-ar-cp", "custom-diffusion", "csim", True),
    ("custom-diffusion", "textual-inversion", "csim", True),
    ("textual-inversion", "dreambooth", "csim", True),
    ("magicapture", "dreambooth", "csim", True),
    ("magicapture", "custom-diffusion", "csim", True),
    ("magicapture", "magicapture-no-cp", "csim", True),
    ("magicapture", "magicapture-no-ar", "csim", True),
    ("magicapture", "custom-diffusion", "style", True),
    ("magicapture", "dreambooth", "style", True),
    ("magicapture", "textual-inversion", "style", True),
    ("magicapture", "magicapture-no-ar", "spill", False),
    ("magicapture", "magicapture-no-ar-cp", "spill", False),
)


def paper_claims(values: dict) -> list[dict]:
    """Each of :data:`PAPER_CLAIMS` whose two rows were run: the paired comparison and whether this world confirms
    the claim (interval on the claimed side of 0), contradicts it (on the other side) or cannot tell."""
    out = []
    for a, b, metric, higher in PAPER_CLAIMS:
        if a not in values or b not in values:
            continue
        c = compare(values[a][metric], values[b][metric], higher)
        c.update(a=a, b=b, metric=metric, higher_is_better=higher,
                 says={"better": "confirms", "worse": "contradicts"}.get(c["verdict"], "cannot tell"))
        out.append(c)
    return out


def _cell(stat: dict, digits: int = 3) -> str:
    if stat.get("mean") is None:
        return "-"
    lo, hi = stat["ci"]
    return f"{stat['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(summary: dict) -> str:
    lines = ["| method | toy-CSIM ↑ | toy-Style ↑ | <v1> spill, generation ↓ | <v1> spill, source pictures ↓ |",
             "|---|---:|---:|---:|---:|"]
    for row in summary["rows"]:
        name = {"ideal": "*ideal (renders of the target)*", "base": "*base model, no personalisation*"}.get(
            row["method"], row["method"])
        lines.append(f"| {name} | {_cell(row['csim'])} | {_cell(row['style'])} | {_cell(row['spill'])} | "
                     f"{_cell(row['picture_spill'])} |")
    lines += ["", f"mean over {len(summary['pairs'])} pair(s) of each pair's mean over {summary['images_per_pair']} "
              "images, with its 95 % bootstrap interval over pairs; composed prompt, {summary['sampling_steps']} DDIM steps, "
              f"guidance {summary['guidance']}, seeds {summary['seed']}..{summary['seed'] + summary['images_per_pair'] - 1}. "
              "Spill = share of the identity token's cross-attention (8x8 layers) outside the face: during generation "
              "(face = the world's un-jittered face ellipse), and on the 5 source pictures noised to t = 100/300/500/700 "
              "(their true face masks; the quantity training logs as attn_spill_v1). A face-blind token scores ~0.88."]
    if summary.get("claims"):
        lines += ["", "| the paper's claim | metric | difference, paired over pairs [95 % CI] | this world |",
                  "|---|---|---:|---|"]
        for c in summary["claims"]:
            op = ">" if c["higher_is_better"] else "<"
            diff = "-" if c["diff"] is None else f"{c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
            lines.append(f"| {c['a']} {op} {c['b']} | {c['metric']} | {diff} | {c['says']} |")
    if summary["failed"]:
        lines += ["", "Failed cells: " + "; ".join(f"{f['pair']}/{f['method']}: {f['error']}" for f in summary["failed"])]
    return "\n".join(lines) + "\n"


def write_grids(out: Path, pairs: list, methods: list[str], images: int, per_row: int = 4) -> None:
    """``grids/<method>.png`` (one row per pair) and ``grid.png``: per pair, 2 sources, 2 references, then
    ``per_row`` images of each method."""
    from PIL import Image

    def load(p: Path) -> np.ndarray:
        return np.asarray(Image.open(p).convert("RGB").resize((64, 64)))

    (out / "grids").mkdir(parents=True, exist_ok=True)
    blank = np.full((64, 64, 3), 255, np.uint8)
    for method in methods:
        tiles = []
        for pair in pairs:
            imgs = sorted((out / "bench" / "cells" / pair.name / method / "images").glob("*.png"))
            tiles += [load(p) for p in imgs[:images]] + [blank] * (images - len(imgs[:images]))
        if tiles:
            world.grid(tiles, images).save(out / "grids" / f"{method}.png")
    tiles = []
    for pair in pairs[:2]:
        tiles += [load(p) for p in sorted((pair.source / "images").glob("*.png"))[:2]]
        tiles += [load(p) for p in sorted((pair.reference / "images").glob("*.png"))[:2]]
        for method in methods:
            imgs = sorted((out / "bench" / "cells" / pair.name / method / "images").glob("*.png"))[:per_row]
            tiles += [load(p) for p in imgs] + [blank] * (per_row - len(imgs))
    if tiles:
        world.grid(tiles, 4 + per_row * len(methods)).save(out / "grid.png")
