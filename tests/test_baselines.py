"""Baselines (DreamBooth, Textual Inversion, Custom Diffusion) and the benchmark harness on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path
import shutil
import sys

import pytest
import torch
import yaml

from magicstudio.errors import UserError
from magicstudio.experiments import bench
from magicstudio.methods import METHODS
from magicstudio.methods.baselines import custom_diffusion, dreambooth, textual_inversion
from magicstudio.methods.baselines.common import class_image_folder, ensure_class_images, images_as_concept
from magicstudio.training.concepts import load_concept
from magicstudio.training.runs import RunDir
from magicstudio.training.loop import train

RES = 64
FAST = dict(steps=3, resolution=RES, sample_steps=2, checkpoint_every=0)
PRIOR = dict(num_class_images=2, class_steps=2)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP spinning makes them 50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sets(demo_sets):
    return load_concept(demo_sets[0], RES), load_concept(demo_sets[1], RES)


def _train(method, run):
    return train(method, RunDir(run).create(), checkpoint_every=0, progress=False, tensorboard=False)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    after = module.state_dict()
    return {k for k, v in before.items() if k in after and after[k].shape == v.shape and not torch.equal(after[k], v)}


# ------------------------------------------------------------------------------------------------ the registry


def test_registry_and_paper_settings():
    assert {"magicapture", "magicapture-no-ar", "magicapture-no-ar-cp", "dreambooth", "textual-inversion",
            "custom-diffusion"} <= set(METHODS)
    db, ti, cd = dreambooth.make_config("paper"), textual_inversion.make_config("paper"), custom_diffusion.make_config("paper")
    assert (db.lr, db.steps, db.prior, db.prior_weight, db.num_class_images, db.per_concept) == (1e-6, 2000, True, 1.0, 200, 1)
    assert (ti.lr, ti.steps, ti.prior, ti.per_concept) == (5e-3, 5000, False, 1)  # batch 2 = one source + one reference
    assert (cd.lr, cd.steps, cd.prior, cd.prior_weight, cd.num_class_images) == (5e-6, 750, True, 1.0, 200)
    assert db.model == ti.model == cd.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert textual_inversion.make_config("smoke").model == "tiny"
    with pytest.raises(UserError, match="unknown textual-inversion setting"):
        textual_inversion.make_config("smoke", nonsense=1)


# ------------------------------------------------------------------------------------------------ what each trains


def test_textual_inversion_changes_only_the_token_rows(tiny, demo_sets, tmp_path):
    unet0, te0 = _state(tiny.unet), _state(tiny.text_encoder)
    table0 = tiny.text_encoder.get_input_embeddings().weight.detach().clone()
    cfg = textual_inversion.make_config("smoke", **FAST)
    m = textual_inversion.TextualInversion(cfg, tiny, *_sets(demo_sets))
    rows0 = m.embedding.rows.detach().clone()
    _train(m, tmp_path / "run")
    assert not _changed(unet0, tiny.unet)
    assert not {k for k in _changed(te0, tiny.text_encoder) if "embed" not in k}
    assert torch.equal(m.embedding.base.weight[: table0.shape[0]], table0)  # every base row bit-identical
    assert not torch.equal(m.embedding.rows, rows0)
    run = tmp_path / "run"
    assert (run / "embeddings" / "v1.safetensors").is_file() and (run / "embeddings" / "v2.safetensors").is_file()
    assert not (run / "pytorch_lora_weights.safetensors").exists()


def test_custom_diffusion_changes_only_cross_attention_kv_and_reloads_exactly(tiny, demo_sets, tmp_path):
    import copy

    from magicstudio.training.export import load_run_into_pipeline
    from magicstudio.training.personalize import encode_prompt

    base = copy.deepcopy(tiny)
    unet0, te0 = _state(tiny.unet), _state(tiny.text_encoder)
    cfg = custom_diffusion.make_config("smoke", **FAST, **PRIOR)
    classes = images_as_concept(ensure_class_images(tiny, cfg, tmp_path / "class"), RES)
    m = custom_diffusion.CustomDiffusion(cfg, tiny, *_sets(demo_sets), classes)
    rows0 = m.embedding.rows.detach().clone()
    _train(m, tmp_path / "run")
    changed = _changed(unet0, tiny.unet)
    kv = {k for k in unet0 if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    assert kv and changed == kv
    assert not {k for k in _changed(te0, tiny.text_encoder) if "embed" not in k}
    assert not torch.equal(m.embedding.rows, rows0)
    assert all("loss_prior" in r for r in RunDir(tmp_path / "run").read_metrics())

    # the exported LoRA (exact SVD of the K/V updates) + embeddings rebuild the trained model in plain diffusers
    pipe = base.pipeline()
    tokens = load_run_into_pipeline(pipe, tmp_path / "run")
    assert tokens == ["<v1>", "<v2>"]
    prompt = "a photo of a <v1> person in the style of <v2>"
    z = torch.randn(1, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        ours = tiny.unet(z, t, encode_prompt(tiny, prompt, m.token_ids)[0]).sample
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        theirs = pipe.unet(z, t, pipe.text_encoder(ids)[0]).sample
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


@pytest.fixture(scope="module")
def api_runs(demo_sets, tmp_path_factory):
    """Each baseline trained through its registry entry (smoke preset, a few steps) into a run folder."""
    root = tmp_path_factory.mktemp("baselines")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for name, extra in (("textual-inversion", {}), ("custom-diffusion", PRIOR), ("dreambooth", PRIOR)):
            runs[name] = METHODS[name].train(demo_sets[0], demo_sets[1], root / name, "smoke", 0, **FAST, **extra)
    finally:
        torch.set_num_threads(n)
    return runs


@pytest.mark.parametrize("name", ["textual-inversion", "custom-diffusion", "dreambooth"])
def test_run_folder_loads_through_generate(api_runs, name, tmp_path):
    from PIL import Image

    from magicstudio.training.generate import generate

    run = RunDir(api_runs[name])
    cfg = run.read_config()
    assert run.is_done() and cfg["tokens"] == ["<v1>", "<v2>"] and cfg["method"] == name
    paths = generate(run.path, tmp_path / "gen", num_images=1, steps=2)
    assert len(paths) == 1 and Image.open(paths[0]).size == (RES, RES)
    assert "a photo of a <v1> person in the style of <v2>" in Image.open(paths[0]).info["parameters"]


def test_dreambooth_finetunes_unet_and_text_encoder_with_prior_preservation(api_runs, monkeypatch):
    from magicstudio.models.base import load_base

    run = RunDir(api_runs["dreambooth"])
    cfg = run.read_config()
    assert cfg["model_dir"] == "model" and (run.path / "model" / "model_index.json").is_file()
    records = run.read_metrics()
    assert len(records) == 3 and all("loss_prior" in r and "loss_instance" in r for r in records)
    assert all(r["loss"] == pytest.approx(r["loss_instance"] + r["loss_prior"], rel=1e-5) for r in records)

    # class images were made once, by the base model, and are reused
    folder = class_image_folder(dreambooth.make_config("smoke", **FAST, **PRIOR), run.path / "class_images")
    assert sorted(p.name for p in folder.glob("*.png")) == ["0000.png", "0001.png"]
    base = load_base("tiny")

    def no_pipeline(*a, **k):
        raise AssertionError("cached class images were generated again")

    monkeypatch.setattr(type(base), "pipeline", no_pipeline)
    ensure_class_images(base, dreambooth.make_config("smoke", **FAST, **PRIOR), folder)

    tuned = load_base(str(run.path / "model"))
    unet_changed = _changed(_state(base.unet), tuned.unet)
    te_changed = _changed(_state(base.text_encoder), tuned.text_encoder)
    assert len(unet_changed) > 0.9 * len(base.unet.state_dict())
    assert len(te_changed) > 0.5 * len(base.text_encoder.state_dict())
    assert "<v1>" in tuned.tokenizer.get_added_vocab() and "<v2>" in tuned.tokenizer.get_added_vocab()


def test_dreambooth_run_refuses_another_base_model(api_runs):
    from magicstudio.training.generate import load_run_pipeline

    with pytest.raises(UserError, match="full fine-tune"):
        load_run_pipeline(api_runs["dreambooth"], model="tiny")


# ------------------------------------------------------------------------------------------------ the harness


def _pairs_file(tmp_path, demo_sets, name="demo"):
    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump([{"name": name, "source": str(demo_sets[0]), "reference": str(demo_sets[1])}]))
    return path


def fake_evaluate(generated, source, reference, prompts=None, metrics=None, face_backend="dlib", **kw):
    """Stands in for magicstudio.evaluation.evaluate_images: deterministic numbers from the images."""
    import numpy as np
    from PIL import Image

    values = [float(np.asarray(Image.open(p), dtype=np.float32).mean() / 255) for p in generated]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    summary = {"csim": {"mean": mean, "std": std, "n": len(values), "misses": 0},
               "style": {"mean": 1 - mean, "std": std, "n": len(values), "misses": 0},
               "aesthetic": {"error": "no aesthetic head given"}}
    return {"summary": {k: v for k, v in summary.items() if k in metrics},
            "images": [{"file": str(p), "csim": v} for p, v in zip(generated, values)], "config": {"prompt": prompts}}


SMOKE = {"textual-inversion": dict(FAST), "custom-diffusion": {**FAST, **PRIOR}}


def _settings(methods, **kw):
    return bench.BenchSettings(methods=methods, images_per_pair=2, preset="smoke", steps=2,
                               overrides={m: SMOKE[m] for m in methods}, **kw)


def test_smoke_sweep_table_resume_and_a_failing_cell(demo_sets, tmp_path, monkeypatch):
    pairs = bench.load_pairs(_pairs_file(tmp_path, demo_sets))
    out = tmp_path / "sweep"
    methods = ["textual-inversion", "custom-diffusion"]

    def boom(*a, **k):
        raise RuntimeError("deliberate failure")

    # 1. custom-diffusion fails; textual inversion still completes and the report is written
    monkeypatch.setattr(METHODS["custom-diffusion"], "train", boom)
    res = bench.run_bench(pairs, _settings(methods), out, evaluator=fake_evaluate, progress=False)
    ti, cd = bench.cell_dir(out, "demo", "textual-inversion"), bench.cell_dir(out, "demo", "custom-diffusion")
    assert (ti / "DONE").is_file() and len(list((ti / "images").glob("*.png"))) == 2
    assert not (cd / "DONE").exists()
    assert (cd / "error.txt").read_text().strip() == "train: RuntimeError: deliberate failure"
    assert "deliberate failure" in (cd / "traceback.txt").read_text()
    assert [c["method"] for c in res.failed] == ["custom-diffusion"]
    md = (out / "report.md").read_text()
    assert "| textual-inversion |" in md and "custom-diffusion: failed" in md

    # 2. the same sweep again: the finished cell is skipped, the failed one is retried and completes
    monkeypatch.setattr(METHODS["custom-diffusion"], "train", custom_diffusion.train)
    monkeypatch.setattr(METHODS["textual-inversion"], "train", boom)
    images = {p.name: p.stat().st_mtime_ns for p in (ti / "images").glob("*.png")}
    res = bench.run_bench(pairs, _settings(methods), out, evaluator=fake_evaluate, progress=False)
    assert not res.failed and (cd / "DONE").is_file() and not (cd / "error.txt").exists()
    assert {p.name: p.stat().st_mtime_ns for p in (ti / "images").glob("*.png")} == images

    # the Table-1-style report: one row per method and metric, mean/std pooled over images
    import csv

    rows = list(csv.DictReader((out / "report.csv").open()))
    assert {(r["method"], r["metric"]) for r in rows} == {(m, k) for m in methods for k in ("csim", "style", "aesthetic")}
    got = {(r["method"], r["metric"]): r for r in rows}
    summary = json.loads((ti / "result.json").read_text())["summary"]
    assert float(got[("textual-inversion", "csim")]["mean"]) == pytest.approx(summary["csim"]["mean"])
    assert got[("custom-diffusion", "aesthetic")]["mean"] == "" and "no aesthetic head" in got[("custom-diffusion", "aesthetic")]["error"]
    md = (out / "report.md").read_text()
    assert "CSIM ↑" in md and "Style ↑" in md and " ± " in md and "no aesthetic head given" in md
    assert len(list(csv.reader((out / "cells.csv").open()))) == 3
    try:
        import matplotlib  # noqa: F401

        assert (out / "report.png").stat().st_size > 1000
    except ImportError:
        assert "No chart: matplotlib is not installed" in md

    # 3. changing what a cell is made of is refused, not silently mixed into the table
    with pytest.raises(UserError, match="other settings"):
        bench.run_bench(pairs, _settings(methods, seed=1), out, evaluator=fake_evaluate, progress=False)


def _finished_cell(api_runs, out, method="textual-inversion", pair="demo"):
    """A cell whose run is already trained (copied), so only generation and evaluation run."""
    cell = bench.cell_dir(out, pair, method)
    shutil.copytree(api_runs[method], cell / "run")
    return cell


def test_a_missing_evaluation_module_is_recorded_and_a_rerun_only_evaluates(api_runs, demo_sets, tmp_path, monkeypatch):
    pairs = bench.load_pairs(_pairs_file(tmp_path, demo_sets))
    out = tmp_path / "sweep"
    cell = _finished_cell(api_runs, out)
    monkeypatch.setitem(sys.modules, "magicstudio.evaluation", None)  # import fails
    res = bench.run_bench(pairs, _settings(["textual-inversion"]), out, progress=False)
    assert res.failed and (cell / "error.txt").read_text().startswith("evaluate: ")
    assert len(list((cell / "images").glob("*.png"))) == 2 and (out / "report.md").is_file()

    def no_generate(*a, **k):
        raise AssertionError("images were generated again")

    monkeypatch.setattr("magicstudio.training.generate.generate", no_generate)
    res = bench.run_bench(pairs, _settings(["textual-inversion"]), out, evaluator=fake_evaluate, progress=False)
    assert not res.failed and (cell / "DONE").is_file()


def test_ray_backend_without_ray_is_one_line(api_runs, demo_sets, tmp_path, monkeypatch):
    pairs = bench.load_pairs(_pairs_file(tmp_path, demo_sets))
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"pip install 'magicstudio\[cluster\]'"):
        bench.run_bench(pairs, _settings(["textual-inversion"]), tmp_path / "x", backend="ray", progress=False)


def test_ray_backend_on_a_local_cluster(api_runs, demo_sets, tmp_path):
    """A real local Ray cluster (2 CPUs, 127.0.0.1): two cells run as Ray tasks in worker processes, a failing
    cell is recorded and the sweep goes on, a re-run skips the finished cell and retries the failed one."""
    ray = pytest.importorskip("ray")
    import os

    import ray_evaluator

    tests_dir = str(Path(__file__).resolve().parent)
    pythonpath = os.pathsep.join([tests_dir] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}})
    try:
        pairs = bench.load_pairs(_pairs_file(tmp_path, demo_sets))
        out = tmp_path / "sweep"
        methods = ["textual-inversion", "custom-diffusion"]
        ti, cd = (_finished_cell(api_runs, out, m) for m in methods)
        (out / "FAIL").write_text("")
        res = bench.run_bench(pairs, _settings(methods), out, backend="ray", evaluator=ray_evaluator.evaluate,
                              progress=False)
        assert res.failed and (ti / "DONE").is_file() and not (cd / "DONE").exists()
        assert "deliberate evaluation failure" in (cd / "error.txt").read_text()
        assert (out / "report.md").is_file()
        pids = {int((c / "evaluated-by.txt").read_text()) for c in (ti, cd)}
        assert os.getpid() not in pids  # the cells ran in Ray's worker processes
        # the re-run: the finished cell is skipped (its images untouched), the failed one completes
        images = {p.name: p.stat().st_mtime_ns for p in (ti / "images").glob("*.png")}
        (ti / "evaluated-by.txt").unlink()
        (out / "FAIL").unlink()
        res = bench.run_bench(pairs, _settings(methods), out, backend="ray", evaluator=ray_evaluator.evaluate,
                              progress=False)
        assert not res.failed and (cd / "DONE").is_file() and not (cd / "error.txt").exists()
        assert not (ti / "evaluated-by.txt").exists()
        assert {p.name: p.stat().st_mtime_ns for p in (ti / "images").glob("*.png")} == images
    finally:
        ray.shutdown()


def test_pairs_file_errors_are_one_line(demo_sets, tmp_path, capsys):
    from magicstudio.cli.main import main

    src, ref = str(demo_sets[0]), str(demo_sets[1])
    cases = [
        ("- {source: %s}" % src, "entry 1 has no 'reference' folder"),
        ("[{source: %s, reference: %s/nope}]" % (src, tmp_path), "reference folder not found"),
        ("{a: 1}", "non-empty list"),
        ("- {name: x, source: %s, reference: %s}\n- {name: x, source: %s, reference: %s}" % (src, ref, src, ref),
         "duplicate pair name 'x'"),
        ("- {name: 'a b', source: %s, reference: %s}" % (src, ref), "must be letters"),
        ("- {source: %s, reference: %s, style: 3}" % (src, ref), "unknown key"),
    ]
    for text, message in cases:
        path = tmp_path / "pairs.yaml"
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            bench.load_pairs(path)
    # unnamed pairs get distinct names from their folders
    path.write_text("- {source: %s, reference: %s}\n- {source: %s, reference: %s}" % (src, ref, src, ref))
    assert [p.name for p in bench.load_pairs(path)] == ["source-reference", "source-reference-2"]

    path.write_text("- {source: %s}" % src)
    assert main(["bench", "--pairs", str(path), "--out", str(tmp_path / "o"), "--preset", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "no 'reference' folder" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    path.write_text("- {source: %s, reference: %s}" % (src, ref))
    for argv, message in ((["--methods", "textual-inversion,nope"], "unknown method"),
                          (["--set", "textual-inversion.bogus=1", "--methods", "textual-inversion"], "unknown setting"),
                          (["--preset", "official"], "unknown preset")):
        assert main(["bench", "--pairs", str(path), "--out", str(tmp_path / "o"), *argv]) == 2
        assert message in capsys.readouterr().err


def test_parse_set():
    assert bench.parse_set(["dreambooth.steps=10", "lr=1e-4", "prior=false", "class_dir="]) == {
        "dreambooth": {"steps": 10}, "*": {"lr": 1e-4, "prior": False, "class_dir": None}}
    with pytest.raises(UserError):
        bench.parse_set(["steps"])


def test_magicapture_ablations_are_harness_methods(demo_sets, tmp_path, monkeypatch):
    import magicstudio.methods.magicapture as mc

    run = RunDir(METHODS["magicapture-no-ar-cp"].train(demo_sets[0], demo_sets[1], tmp_path / "run", "smoke", 3, ti_steps=1,
                                                 lora_steps=3, resolution=RES, sample_steps=2, checkpoint_every=0))
    cfg = run.read_config()
    assert run.is_done() and cfg["use_ar"] is False and cfg["use_composed"] is False and cfg["seed"] == 3
    lora = [r for r in run.read_metrics() if r["phase"] == "lora"]
    assert lora and all(r["task"] != "composed" and "loss_attn" not in r for r in lora)

    seen = {}
    monkeypatch.setattr(mc, "run_training", lambda s, r, out, cfg, **kw: seen.setdefault(out.name, cfg) and RunDir(out))
    for name, ar, cp in (("magicapture", True, True), ("magicapture-no-ar", False, True), ("magicapture-no-cp", True, False)):
        METHODS[name].train("s", "r", tmp_path / name, "paper", 0, use_ar=True)  # the ablation's switch wins
        assert (seen[name].use_ar, seen[name].use_composed, seen[name].preset) == (ar, cp, "paper")


def test_cli_sweep_with_the_real_evaluation(api_runs, demo_sets, tmp_path, capsys):
    """``magicstudio bench`` end to end on a cell whose run is already trained; evaluation through
    ``magicstudio.evaluation`` (a metric without its model is reported as unavailable, not a failure)."""
    import importlib.util

    from magicstudio.cli.main import main

    pairs = _pairs_file(tmp_path, demo_sets)
    out = tmp_path / "sweep"
    cell = _finished_cell(api_runs, out)
    rc = main(["bench", "--pairs", str(pairs), "--out", str(out), "--methods", "textual-inversion", "-n", "1",
               "--preset", "smoke", "--steps", "2", "--metrics", "csim", "-q"])
    captured = capsys.readouterr()
    assert (out / "report.md").is_file() and (out / "report.csv").is_file() and "report:" in captured.out
    if importlib.util.find_spec("magicstudio.evaluation") is None:  # evaluation not installed: recorded, not fatal
        assert rc == 1 and (cell / "error.txt").read_text().startswith("evaluate: ")
    else:
        assert rc == 0 and (cell / "DONE").is_file(), captured.err
        assert "csim" in json.loads((cell / "eval.json").read_text())["summary"]


@pytest.mark.parametrize("module", [custom_diffusion, dreambooth], ids=["custom-diffusion", "dreambooth"])
def test_resume_after_a_crash_gives_identical_weights(module, tiny, demo_sets, tmp_path, monkeypatch):
    import copy

    cls = custom_diffusion.CustomDiffusion if module is custom_diffusion else dreambooth.DreamBooth
    cfg = module.make_config("smoke", **{**FAST, "steps": 4}, **PRIOR)
    classes = images_as_concept(ensure_class_images(tiny, cfg, tmp_path / "class"), RES)
    fresh = copy.deepcopy(tiny)

    def run(comps, path, **kw):
        m = cls(cfg, comps, *_sets(demo_sets), classes)
        train(m, RunDir(path).create(), checkpoint_every=2, progress=False, tensorboard=False, deterministic=True,
              **kw)  # bit-identical weights are asked for
        return m

    a = run(copy.deepcopy(fresh), tmp_path / "a")
    real = cls.micro_step

    def crash(self, phase, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, phase, step)

    monkeypatch.setattr(cls, "micro_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run(copy.deepcopy(fresh), tmp_path / "b")
    monkeypatch.setattr(cls, "micro_step", real)
    b = run(copy.deepcopy(fresh), tmp_path / "b", resume=True)
    sa, sb = a.trainable_state(), b.trainable_state()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["step"] for r in RunDir(tmp_path / "b").read_metrics()] == [1, 2, 3, 4]
