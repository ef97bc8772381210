"""The Gradio page: Studio (photos -> masks -> preset -> Train -> live progress), Gallery (generate from a run,
download its exports), Runs (every run with its status, settings and metrics). Every action is also an API
endpoint (``api_name``) so ``gradio_client`` can drive the same functions the page uses.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr

from ..errors import UserError
from .jobs import FINISHED, RESUMABLE
from .studio import PRESET_STEPS, Studio
from .uploads import new_session, prepare_uploads, sample_concepts, sample_sets, session_dir, store_concept

DEFAULT_PROMPT = "a photo of a <v1> person in the style of <v2>"
POLL_SECONDS = 1.0
#: the Gallery's post-processing choices -> (factor, super-resolution): lanczos needs nothing, Real-ESRGAN magicstudio[upscale]
UPSCALE = {"off": (0, "lanczos"), "2x (lanczos)": (2, "lanczos"), "4x (lanczos)": (4, "lanczos"),
           "2x (Real-ESRGAN)": (2, "realesrgan"), "4x (Real-ESRGAN)": (4, "realesrgan")}


def _named(files) -> list[tuple[str, str]]:
    """Gradio's uploads (paths in its cache, under --data) with the client's name, which is only shown back."""
    return [(str(f), Path(str(f)).name) for f in (files or [])]


def _rejections(views) -> str:
    lines = [f"- **{role}** {name}: {reason}" for role, v in views for name, reason in v.rejected]
    lines += [f"- **{role}**: {w}" for role, v in views for w in v.warnings]
    return ("**Not used:**\n" + "\n".join(lines)) if lines else "All photos were used."


def _job_id(value) -> int:
    if value in (None, ""):
        raise UserError("no job selected")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"no job {value!r}") from None


def one_line(fn):
    """A handler whose UserError (or file-system error) is shown in the page as its one line, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except UserError as exc:
            raise gr.Error(str(exc)) from None
        except OSError as exc:
            raise gr.Error(f"{exc.strerror or exc}" + (f": {Path(exc.filename).name}" if exc.filename else "")) from None
    return wrapper


def build_app(studio: Studio) -> gr.Blocks:
    def session_of(sid):
        """This page's upload folder (a new one on the first upload, or when the old one is gone)."""
        try:
            return sid, session_dir(studio.data, sid)
        except UserError:
            sid = new_session(studio.data)
            return sid, session_dir(studio.data, sid)

    @one_line
    def prepared(sid, selfies, styles):
        if not selfies or not styles:
            raise UserError("upload both sets: selfies of the person and photos of the style")
        sid, folder = session_of(sid)
        return show_sets(sid, [prepare_uploads(_named(selfies), "source", folder),
                               prepare_uploads(_named(styles), "reference", folder)])

    @one_line
    def samples(sid):
        sid, folder = session_of(sid)
        return show_sets(sid, list(sample_sets(folder, studio.model)))

    def show_sets(sid, views):
        src, ref = views
        sets = {"source": str(src.folder) if src.folder else None, "reference": str(ref.folder) if ref.folder else None}
        return sid, sets, src.tiles, ref.tiles, _rejections([("selfies", src), ("style", ref)])

    @one_line
    def train(sets, preset, steps):
        sets = sets or {}
        job = studio.train(Path(sets["source"]) if sets.get("source") else None,
                           Path(sets["reference"]) if sets.get("reference") else None, preset, int(steps or 0))
        return job_choices(job)

    def job_choices(selected=None):
        jobs = studio.jobs()
        choices = [(f"job {j['id']}: {Path(j['run']).name} ({j['state']})", j["id"]) for j in jobs]
        if selected is None and jobs:
            selected = jobs[0]["id"]
        return gr.update(choices=choices, value=selected)

    @one_line
    def progress(job_id):
        if job_id in (None, ""):
            return ("No training yet: prepare photos, choose a preset and press Train.", None, None, "",
                    gr.update(interactive=False), gr.update(interactive=False))
        d = studio.describe(_job_id(job_id))
        state = d["job"]["state"]
        return (d["text"], d["progress"]["sample"], _loss_frame(d["progress"]["losses"]), d["log"],
                gr.update(interactive=state not in FINISHED), gr.update(interactive=state in RESUMABLE))

    @one_line
    def cancel(job_id):
        studio.runner.cancel(_job_id(job_id))
        return progress(job_id)

    @one_line
    def resume(job_id):
        studio.runner.resume(_job_id(job_id))
        return progress(job_id)

    @one_line
    def generate(run, prompt, seed, n, steps, attention, upscale):
        if not run:
            raise UserError("choose a finished run")
        paths = studio.generate(run, prompt, int(seed), int(n), int(steps), attention=bool(attention),
                                upscale=UPSCALE[upscale])
        return [(str(p), p.name) for p in paths], f"{len(paths)} image(s) saved in the run's generated/ folder " \
            "(each PNG carries its prompt, seed and settings)"

    @one_line
    def export(run):
        if not run:
            raise UserError("choose a finished run")
        return str(studio.export_zip(run))

    def run_choices():
        done = studio.done_runs()
        return gr.update(choices=done, value=done[0] if done else None)

    def runs_table():
        rows = []
        for j in studio.jobs():
            p = studio.describe(j["id"])["progress"]
            s = j["settings"]
            rows.append([j["id"], Path(j["run"]).name, j["state"], s.get("model", ""), s.get("preset", ""),
                         f"{p['step']}/{p['total']}", "" if p["loss"] is None else round(p["loss"], 4), j["reason"]])
        return rows

    @one_line
    def run_details(name):
        if not name:
            return None, []
        run = studio.run_dir(name)
        cfg = run.read_config() if run.config_path.is_file() else {}
        samples = sorted(run.samples.glob("*.png")) if run.samples.is_dir() else []
        return cfg, [(str(p), p.stem) for p in samples]

    def all_runs():
        names = [Path(j["run"]).name for j in studio.jobs()]
        return gr.update(choices=names, value=names[0] if names else None)

    @one_line
    def face_samples(sid):
        sid, folder = session_of(sid)
        slots = sample_concepts(folder, studio.model) + [("", None, None)] * 2
        flat = [v for word, img, mask in slots[:2] for v in (word, str(img) if img else None, str(mask) if mask else None)]
        prompt = "a photo of a person with hair" if studio.model == "toyworld" else "a photo of a person in a garden"
        return [sid, *flat, prompt]

    @one_line
    def face_run(sid, w1, i1, m1, w2, i2, m2, prompt, seed, n, steps):
        sid, folder = session_of(sid)
        concepts = []
        for k, (word, image, mask) in enumerate(((w1, i1, m1), (w2, i2, m2))):
            if not (word or "").strip() and not image:
                continue
            if not image:
                raise UserError(f"concept {k + 1} ({word}) has no photo")
            concepts.append((word.strip(), store_concept(image, folder, k),
                             store_concept(mask, folder, k, "mask") if mask else None))
        images, pictures = studio.magicface(concepts, prompt, int(seed), int(n), int(steps))
        return sid, [(str(p), p.name) for p in images], [(str(p), p.name) for p in pictures]

    with gr.Blocks(title="magicstudio") as demo:
        sid = gr.State(None)
        sets = gr.State({})
        gr.Markdown(f"# magicstudio\nA photo studio from a few selfies, on **{studio.model}**. Jobs are kept in "
                    f"`{studio.data}`: a reload or a server restart loses nothing.")
        with gr.Tabs():
            with gr.Tab("Studio", id="studio"):
                with gr.Row():
                    selfies = gr.File(label="Selfies of the person (4-6)", file_count="multiple", file_types=["image"],
                                      type="filepath", elem_id="selfies")
                    styles = gr.File(label="Photos of the style (4-6)", file_count="multiple", file_types=["image"],
                                     type="filepath", elem_id="styles")
                with gr.Row():
                    prep_btn = gr.Button("Prepare my photos", elem_id="prepare")
                    sample_btn = gr.Button("Use the bundled samples", elem_id="samples")
                with gr.Row():
                    src_gal = gr.Gallery(label="Person: crops with face (green) and head (orange) masks", columns=5,
                                         height=260, elem_id="source-tiles")
                    ref_gal = gr.Gallery(label="Style: crops with masks", columns=5, height=260, elem_id="reference-tiles")
                rejected = gr.Markdown(elem_id="rejected")
                with gr.Row():
                    preset = gr.Dropdown(list(PRESET_STEPS), value="smoke", label="Preset", elem_id="preset")
                    steps = gr.Number(0, precision=0, label="Total steps (0: the preset's)", elem_id="steps")
                    train_btn = gr.Button("Train", variant="primary", elem_id="train")
                estimate = gr.Markdown(studio.estimate("smoke"), elem_id="estimate")
                with gr.Group(elem_id="progress"):
                    job_pick = gr.Dropdown(label="Job", choices=[], allow_custom_value=True, elem_id="job")
                    status = gr.Markdown(elem_id="status")
                    with gr.Row():
                        cancel_btn = gr.Button("Cancel", elem_id="cancel", interactive=False)
                        resume_btn = gr.Button("Resume", elem_id="resume", interactive=False)
                    with gr.Row():
                        sample_img = gr.Image(label="Latest sample", type="filepath", height=280, elem_id="sample")
                        loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=280, elem_id="loss")
                    log = gr.Textbox(label="Log (last lines)", lines=6, max_lines=12, elem_id="log")
            with gr.Tab("Gallery", id="gallery"):
                with gr.Row():
                    run_pick = gr.Dropdown(label="Finished run", choices=[], allow_custom_value=True, elem_id="gallery-run")
                    refresh_runs = gr.Button("Refresh", elem_id="gallery-refresh")
                prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt (<v1>: the person, <v2>: the style; add edits "
                                    "such as 'wearing sunglasses')", elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                    n_images = gr.Slider(1, 8, value=4, step=1, label="Images", elem_id="n-images")
                    gen_steps = gr.Slider(5, 100, value=25, step=1, label="Sampling steps", elem_id="gen-steps")
                    attention = gr.Checkbox(False, label="<v1>/<v2> attention maps", elem_id="attention")
                    upscale = gr.Dropdown(list(UPSCALE), value="off", label="Post-processing (upscale)", elem_id="upscale")
                gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                gallery = gr.Gallery(label="Images", columns=4, height=300, fit_columns=False, object_fit="contain", elem_id="images")
                gen_note = gr.Markdown(elem_id="gen-note")
                zip_btn = gr.Button("Download the run's exports (zip)", elem_id="zip")
                zip_file = gr.File(label="Exports: diffusers LoRA, embeddings, A1111/ComfyUI files", elem_id="zip-file")
            with gr.Tab("MagicFace", id="magicface"):
                gr.Markdown("Training-free portraits from concept photos (MagicFace): each concept is a word of the "
                            "prompt and its photo; face/head/hair/person words get automatic masks, or give one.")
                slots = []
                with gr.Row():
                    for k in range(2):
                        with gr.Column():
                            slots.append(gr.Textbox(label=f"Concept {k + 1}: its word in the prompt", elem_id=f"mf-word-{k}"))
                            slots.append(gr.Image(type="filepath", label="Photo", height=200, elem_id=f"mf-image-{k}"))
                            slots.append(gr.Image(type="filepath", label="Mask (optional)", height=200,
                                                  image_mode="L", elem_id=f"mf-mask-{k}"))
                mf_prompt = gr.Textbox("a photo of a person with hair", label="Prompt", elem_id="mf-prompt")
                with gr.Row():
                    mf_seed = gr.Number(0, precision=0, label="Seed")
                    mf_n = gr.Slider(1, 4, value=1, step=1, label="Images")
                    mf_steps = gr.Slider(5, 100, value=25, step=1, label="Sampling steps")
                with gr.Row():
                    mf_samples = gr.Button("Use the samples", elem_id="mf-samples")
                    mf_btn = gr.Button("Generate", variant="primary", elem_id="mf-generate")
                with gr.Row():
                    mf_images = gr.Gallery(label="Portraits", columns=4, height=260, elem_id="mf-images")
                    mf_masks = gr.Gallery(label="References with masks; segmentation at every step", columns=1,
                                          height=260, elem_id="mf-masks")
            with gr.Tab("Runs", id="runs"):
                runs_refresh = gr.Button("Refresh", elem_id="runs-refresh")
                table = gr.Dataframe(headers=["job", "run", "status", "model", "preset", "step", "loss", "reason"],
                                     interactive=False, elem_id="runs-table")
                detail_pick = gr.Dropdown(label="Run", choices=[], allow_custom_value=True, elem_id="runs-run")
                with gr.Row():
                    settings = gr.JSON(label="Settings (config.yaml)", elem_id="runs-settings")
                    run_samples = gr.Gallery(label="Samples during training", columns=3, height=260)

        set_outputs = [sid, sets, src_gal, ref_gal, rejected]
        prep_btn.click(prepared, [sid, selfies, styles], set_outputs, api_name="prepare")
        sample_btn.click(samples, [sid], set_outputs, api_name="samples")
        for comp in (preset, steps):
            comp.change(lambda p, s: studio.estimate(p, int(s or 0)), [preset, steps], estimate, api_name=False)
        train_btn.click(train, [sets, preset, steps], job_pick, api_name="train")
        panel = [status, sample_img, loss_plot, log, cancel_btn, resume_btn]
        job_pick.change(progress, job_pick, panel, api_name=False)
        gr.Timer(POLL_SECONDS).tick(progress, job_pick, panel, api_name="progress", show_progress="hidden")
        cancel_btn.click(cancel, job_pick, panel, api_name="cancel")
        resume_btn.click(resume, job_pick, panel, api_name="resume")
        refresh_runs.click(run_choices, None, run_pick, api_name=False)
        gen_btn.click(generate, [run_pick, prompt, seed, n_images, gen_steps, attention, upscale], [gallery, gen_note],
                      api_name="generate")
        zip_btn.click(export, run_pick, zip_file, api_name="export")
        runs_refresh.click(runs_table, None, table, api_name="runs").then(all_runs, None, detail_pick, api_name=False)
        detail_pick.change(run_details, detail_pick, [settings, run_samples], api_name=False)
        mf_samples.click(face_samples, [sid], [sid, *slots, mf_prompt], api_name="magicface_samples")
        mf_btn.click(face_run, [sid, *slots, mf_prompt, mf_seed, mf_n, mf_steps], [sid, mf_images, mf_masks],
                     api_name="magicface")
        demo.load(lambda: job_choices(), None, job_pick, api_name=False)
        demo.load(run_choices, None, run_pick, api_name=False)
        demo.load(runs_table, None, table, api_name=False).then(all_runs, None, detail_pick, api_name=False)
    return demo


def _loss_frame(losses):
    import pandas as pd

    return pd.DataFrame(losses or [], columns=["step", "loss"])

