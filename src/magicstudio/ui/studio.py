"""What the page does, without the page: start a training job, describe a job, estimate its time, generate from a
run, zip a run's exports, list runs. ``DATA`` (``--data``) holds everything the server writes:

    DATA/jobs.sqlite            the job store (``ui.jobs``)
    DATA/runs/<name>/           run folders (``training.runs``), names made by the server
    DATA/inputs/<name>/         the prepared photo sets a run trained on (copied: a later upload cannot change them)
    DATA/logs/job-<id>.log      each job's output
    DATA/sessions/<id>/         each page's uploads (``ui.uploads``)
    DATA/exports/<name>.zip     a run's exports, made on request
    DATA/.gradio/               Gradio's own upload cache (GRADIO_TEMP_DIR)
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..training.runs import RunDir
from .jobs import DONE, QUEUED, JobStore, Runner, progress_of

PRESET_STEPS = {"smoke": (60, 240), "paper": (1200, 1500)}  # (textual-inversion, LoRA) steps: methods.magicapture
EXPORTS = ("config.yaml", "pytorch_lora_weights.safetensors", "embeddings", "a1111")


@dataclass
class Studio:
    data: Path
    model: str
    store: JobStore
    runner: Runner

    def __post_init__(self):
        self._generating = threading.Lock()

    @classmethod
    def open(cls, data: str | Path, model: str = "toyworld", env: dict | None = None, start: bool = True) -> "Studio":
        data = Path(data).resolve()
        data.mkdir(parents=True, exist_ok=True)
        store = JobStore(data / "jobs.sqlite")
        runner = Runner(store, env=env)
        if start:
            runner.start()
        return cls(data, model, store, runner)

    # -- training
    def steps_of(self, preset: str, steps: int = 0) -> tuple[int, int]:
        if preset not in PRESET_STEPS:
            raise UserError(f"unknown preset {preset!r}; choose {' or '.join(PRESET_STEPS)}")
        if steps:
            if not 2 <= int(steps) <= 100_000:
                raise UserError(f"steps must be between 2 and 100000, not {steps}")
            return max(1, int(steps) // 4), int(steps) - max(1, int(steps) // 4)  # the demo's 1:3 split
        return PRESET_STEPS[preset]

    def train(self, source: Path | None, reference: Path | None, preset: str, steps: int = 0) -> int:
        """Queue a MagiCapture training on the prepared sets; returns the job id."""
        if source is None or reference is None:
            raise UserError("prepare the selfies and the style photos first (or use the bundled samples)")
        ti, lora = self.steps_of(preset, steps)
        name = time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        inputs = self.data / "inputs" / name
        for role, folder in (("source", source), ("reference", reference)):
            shutil.copytree(folder, inputs / role)
        args = ["--source", str(inputs / "source"), "--reference", str(inputs / "reference"), "--model", self.model,
                "--preset", preset, "--ti-steps", str(ti), "--lora-steps", str(lora)]
        if self.model == "toyworld":
            args += ["--face-encoder", "toyworld"]  # the toy world's own identity encoder
        settings = {"model": self.model, "preset": preset, "ti_steps": ti, "lora_steps": lora}
        log = self.data / "logs" / f"{name}.log"
        return self.runner.submit(self.data / "runs" / name, args, settings, log)

    def seconds_per_step(self) -> float | None:
        """Measured on this server: the latest finished job of the same model (None before the first)."""
        for job in self.store.all():
            if job["state"] == DONE and job["settings"].get("model") == self.model and job["started_at"]:
                steps = progress_of(job)["total"] - int(job["start_step"] or 0)
                if steps > 0:
                    return (job["finished_at"] - job["started_at"]) / steps
        return None

    def estimate(self, preset: str, steps: int = 0) -> str:
        try:
            ti, lora = self.steps_of(preset, steps)
        except UserError as exc:
            return str(exc)
        rate = self.seconds_per_step()
        when = (f"about {_duration(rate * (ti + lora))} (measured on this server: {rate:.2f} s/step)" if rate
                else "the time is measured by the first training on this server")
        return f"{ti} textual-inversion + {lora} LoRA steps on {self.model}: {when}"

    def describe(self, job_id: int) -> dict:
        """Everything the progress panel shows about a job."""
        job = self.store.get(job_id)
        p = progress_of(job)
        line = f"job {job['id']} ({Path(job['run']).name}): **{job['state']}**"
        if job["state"] == QUEUED:
            line += f", position {self.store.position(job['id'])} in the queue"
        if p["total"]:
            line += f" - step {p['step']}/{p['total']}"
        if p["phase"]:
            line += f", phase {p['phase']}"
        if p["loss"] is not None:
            line += f", loss {p['loss']:.4f}"
        if p["eta"] is not None:
            line += f", about {_duration(p['eta'])} left"
        if job["reason"]:
            line += f"\n\n{job['state']}: {job['reason']}"
        return {"job": job, "progress": p, "text": line, "log": tail(job["log"])}

    def jobs(self) -> list[dict]:
        return self.store.all()

    # -- runs
    def run_dir(self, name: str) -> RunDir:
        """A run of this server by its name (only names the server made: no path from the client)."""
        names = {Path(j["run"]).name: Path(j["run"]) for j in self.store.all()}
        if name not in names:
            raise UserError(f"no run named {name!r} on this server")
        return RunDir(names[name])

    def done_runs(self) -> list[str]:
        return [Path(j["run"]).name for j in self.store.all() if j["state"] == DONE]

    def generate(self, name: str, prompt: str, seed: int, n: int, steps: int = 25, guidance: float = 5.0,
                 attention: bool = False, upscale: tuple[int, str] = (0, "lanczos")) -> list[Path]:
        """Images (PNG, parameters inside) into ``RUN/generated``; one generation at a time on this server.
        ``upscale`` (factor, super-resolution): also a post-processed ``-post.png`` beside each image."""
        from ..training.generate import generate

        run = self.run_dir(name)
        if not run.is_done():
            raise UserError(f"{name} has not finished training")
        if not 1 <= int(n) <= 8:
            raise UserError("number of images: 1 to 8")
        with self._generating:
            paths = generate(run.path, run.path / "generated", prompt or None, num_images=int(n), seed=int(seed),
                             steps=int(steps), guidance=float(guidance), save_attention=attention,
                             upscale=upscale[0], sr=upscale[1])
        extra = [p.with_name(p.stem + "-post.png") for p in paths] if upscale[0] else []
        extra += [p.with_name(p.stem + "-attention.png") for p in paths] if attention else []
        return list(paths) + [m for m in extra if m.is_file()]

    def export_zip(self, name: str) -> Path:
        """``DATA/exports/<run>.zip``: the diffusers LoRA, the embeddings, the A1111/ComfyUI files, config.yaml."""
        run = self.run_dir(name)
        if not run.is_done():
            raise UserError(f"{name} has not finished training: it has no exports yet")
        out = self.data / "exports" / f"{name}.zip"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for entry in EXPORTS:
                src = run.path / entry
                for f in ([src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else []):
                    z.write(f, f"{name}/{f.relative_to(run.path).as_posix()}")
        tmp.replace(out)
        return out

    # -- MagicFace (training-free: runs in the server, one at a time like generation)
    def magicface(self, concepts: list[tuple[str, Path, Path | None]], prompt: str, seed: int = 0, n: int = 1,
                  steps: int = 25, guidance: float = 5.0) -> tuple[list[Path], list[Path]]:
        """``concepts``: (prompt word, image, optional mask) with server-side paths; returns (images, the
        references with their masks and the per-step segmentation pictures)."""
        from ..methods.magicface import parse_concept, run_magicface

        if not concepts:
            raise UserError("give at least one concept: a word of the prompt and its photo")
        if not 1 <= int(n) <= 4:
            raise UserError("number of images: 1 to 4")
        parsed = []
        for word, image, mask in concepts:
            c = parse_concept(f"{word}={image}")  # the word's rules, one line each
            c.mask = mask
            parsed.append(c)
        out = self.data / "magicface" / (time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2))
        with self._generating:
            images = run_magicface(parsed, prompt, out, self.model, num_images=int(n), seed=int(seed),
                                   steps=int(steps), guidance=float(guidance), save_masks=True)
        pictures = sorted(out.glob("references*.png")) + sorted(out.glob("*-masks.png"))
        return list(images), pictures

    def close(self) -> None:
        self.runner.stop()
        self.store.close()


def tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"

