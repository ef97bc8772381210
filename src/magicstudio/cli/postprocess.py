"""``magicstudio postprocess``: MagiCapture's optional post-processing (super-resolution + face restoration)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from .main import app

#: PNG text chunks Pillow reports in ``info`` that are not text to carry over
_NOT_TEXT = {"dpi", "gamma", "transparency", "aspect", "icc_profile", "exif", "srgb", "chromaticity", "interlace"}


def _gather(inputs: list[Path]) -> tuple[list[Path], list[str]]:
    """Files to process (folders expand to their images, not recursively) and one-line reasons for bad paths."""
    from ..data.images import list_generated

    files: list[Path] = []
    problems: list[str] = []
    for path in inputs:
        if path.is_dir():
            found = list_generated(path)  # not the heatmaps, mask strips or -post copies beside the images
            if not found:
                problems.append(f"{path}: no images in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path}: not found")
    unique: list[Path] = []
    seen: set[Path] = set()
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique, problems


def _output_names(src: Path, out: Path, taken: set[Path], inputs: set[Path]):
    """``<stem>.png``, ``<stem>-2.png``, ...: the candidate names in ``out`` for ``src``, skipping an output of this
    run or an input. Which one is free is decided when the file is written (``io.write_new``, exclusively), so
    nothing in ``out`` is overwritten, not even by another postprocess writing there at the same time."""
    n = 1
    while True:
        name = f"{src.stem}.png" if n == 1 else f"{src.stem}-{n}.png"
        n += 1
        candidate = (out / name).resolve()
        if candidate not in taken and candidate not in inputs:
            yield name


def _quote(value: str) -> str:
    """A value for A1111's ``key: value, key: value`` line (quoted when it contains a comma or colon)."""
    return f'"{value}"' if ("," in value or ":" in value) else value


def _with_postprocess(parameters: str, summary: str) -> str:
    """The A1111 ``parameters`` text with ``Postprocess: <summary>`` appended to its settings line."""
    text = parameters.rstrip("\n")
    return f"{text}, Postprocess: {_quote(summary)}" if text else f"Postprocess: {_quote(summary)}"


def _save(image, out: Path, names, texts: dict[str, str], icc: bytes | None) -> Path:
    from PIL import PngImagePlugin

    from ..io import write_new

    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    kwargs = {"pnginfo": info}
    if icc:
        kwargs["icc_profile"] = icc
    return write_new(out, names, lambda tmp: image.save(tmp, format="PNG", **kwargs))


@app.command("postprocess")
def postprocess_cmd(
    inputs: List[Path] = typer.Argument(..., help="Images, or folders of images (PNG metadata is carried over)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (PNG files; the inputs are never modified)."),
    scale: int = typer.Option(2, "--scale", help="Upscaling factor (1 = none; the authors use 2)."),
    sr: str = typer.Option("auto", "--sr", help="Super-resolution: auto (Real-ESRGAN when installed, else "
                           "Lanczos; says which), realesrgan (x4plus; needs the upscale extra) or lanczos."),
    restore_weights: Optional[Path] = typer.Option(None, "--restore-weights", help="codeformer.pth or "
                                                   "GFPGANv1.4.pth: restore faces (skipped without it)."),
    fidelity: float = typer.Option(0.5, "--fidelity", help="CodeFormer fidelity w: 0 = quality, 1 = faithful to the input."),
    restore_backend: str = typer.Option("auto", "--restore-backend", help="auto (from the weights), codeformer or gfpgan."),
    all_faces: bool = typer.Option(False, "--all-faces/--no-all-faces", help="Restore every detected face, not only the main one."),
    sr_device: str = typer.Option("auto", "--sr-device", help="Real-ESRGAN device: auto, cpu or a GPU number."),
    quiet: bool = typer.Option(False, "--quiet/--no-quiet", "-q", help="Print only problems."),
) -> None:
    """Upscale images (Real-ESRGAN or Lanczos) and restore their faces (CodeFormer/GFPGAN), like MagiCapture's authors."""
    from ..data.images import open_image, to_rgb
    from ..postprocess import postprocess
    from ..postprocess.restore import load_restorer
    from ..postprocess.upscale import SR_BACKENDS, best_sr_backend, realesrgan_status

    if sr not in ("auto", *SR_BACKENDS):
        raise UserError(f"--sr must be one of auto, {', '.join(SR_BACKENDS)}, got {sr!r}")
    sr, note = best_sr_backend(sr) if scale > 1 else (("lanczos", "") if sr == "auto" else (sr, ""))
    if note and not quiet:
        typer.echo(note)
    limit = 4 if sr == "realesrgan" else 8
    if not 1 <= scale <= limit:
        raise UserError(f"--scale must be between 1 and {limit} for {sr}, got {scale}")
    if not 0.0 <= fidelity <= 1.0:
        raise UserError(f"--fidelity must be between 0 and 1, got {fidelity}")
    if sr == "realesrgan" and scale > 1:
        ok, reason = realesrgan_status()
        if not ok:
            raise UserError(reason)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    restorer = load_restorer(restore_weights, restore_backend, fidelity) if restore_weights is not None else None

    files, problems = _gather(inputs)
    for problem in problems:
        typer.secho(f"skipped {problem}", err=True, fg=typer.colors.YELLOW)
    if not files:
        raise UserError("no images to process")
    out.mkdir(parents=True, exist_ok=True)
    inputs_resolved = {f.resolve() for f in files}
    taken: set[Path] = set()
    written, skipped = 0, len(problems)
    analyzer = None
    if restorer is not None:
        from ..data.faces import MediapipeFaceAnalyzer

        analyzer = MediapipeFaceAnalyzer()
    try:
        for src in files:
            start = time.perf_counter()
            try:
                image = open_image(src)
                texts = {k: v for k, v in image.info.items() if isinstance(v, str) and k.lower() not in _NOT_TEXT}
                icc = image.info.get("icc_profile") if isinstance(image.info.get("icc_profile"), bytes) else None
                if image.mode not in ("RGB", "RGBA", "L"):
                    image, icc = to_rgb(image), None  # to_rgb applies the ICC profile
                result, report = postprocess(image, scale, None, fidelity, sr, restorer=restorer, analyzer=analyzer,
                                             all_faces=all_faces, device=sr_device, return_report=True)
                summary = report.summary()
                if "parameters" in texts:
                    texts["parameters"] = _with_postprocess(texts["parameters"], summary)
                texts["postprocess"] = summary
                dest = _save(result, out, _output_names(src, out, taken, inputs_resolved), texts, icc)
                taken.add(dest.resolve())
            except (UserError, OSError, ValueError, RuntimeError, MemoryError) as exc:
                reason = str(exc) if isinstance(exc, UserError) else f"{exc.__class__.__name__}: {exc}"
                reason = " ".join(reason.split())  # one line
                prefix = "" if reason.startswith(str(src)) else f"{src}: "
                typer.secho(f"skipped {prefix}{reason}", err=True, fg=typer.colors.YELLOW)
                skipped += 1
                continue
            written += 1
            if not quiet:
                notes = f" [{'; '.join(report.notes)}]" if report.notes else ""
                typer.echo(f"wrote {dest} ({summary}, {time.perf_counter() - start:.1f}s){notes}")
    finally:
        if analyzer is not None:
            analyzer.close()
    if not quiet:
        typer.echo(f"{written} written, {skipped} skipped")
    if skipped:  # non-zero exit so scripts notice; the reasons are above
        raise UserError(f"{skipped} input(s) skipped, {written} written to {out}")
