"""The benchmark harness: every method on every (identity, style) pair, then a Table-1-style report.

For each cell (pair x method) of a sweep, ``run_cell`` trains the method (``training.registry``), generates
``images_per_pair`` images with the composed prompt ("a photo of a <v1> person in the style of <v2>"; guidance
7.5, 50 steps as in the paper; seeds ``seed .. seed+N-1``, the same for every method) and scores them with
``magicstudio.evaluation.evaluate_images``. ``run_bench`` runs the cells one by one (``local``) or as Ray tasks
(``ray``, one GPU each where the cluster has GPUs) and writes the report. Layout::

    DIR/bench.yaml                          the sweep's settings (last invocation)
    DIR/prepared/<pair>/{source,reference}  each pair's photos prepared once (unless already prepared)
    DIR/class_images/                       class images for prior preservation, shared by the cells
    DIR/cells/<pair>/<method>/cell.json     what the cell is (method, preset, seed, settings, images, steps)
    DIR/cells/<pair>/<method>/run/          the run folder (resumed after an interruption)
    DIR/cells/<pair>/<method>/images/       the generated images (PNG with their parameters)
    DIR/cells/<pair>/<method>/eval.json     evaluate_images' report (+ eval.md)
    DIR/cells/<pair>/<method>/result.json   status, timings, metric summary
    DIR/cells/<pair>/<method>/DONE          written last: the cell is finished and is skipped from now on
    DIR/cells/<pair>/<method>/error.txt     a failed cell: "<stage>: <reason>" (+ traceback.txt)
    DIR/report.md, report.csv, cells.csv, report.png

A failing cell records its error and the sweep goes on; re-running the same command resumes: finished cells
are skipped, a cell interrupted in training resumes from its last checkpoint, one that failed is retried (a
trained run is not retrained, generated images are not regenerated).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import UserError
from ..io import atomic_write, write_json
from ..training.config import parse_value

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("magicapture", "magicapture-no-ar-cp", "dreambooth", "textual-inversion", "custom-diffusion")
TABLE_METRICS = ("csim", "style", "aesthetic")  # the paper's Table 1
GENERATION_STEPS = {"paper": 50, "smoke": 10}
LABELS = {"csim": "CSIM ↑", "face_sim": "Face-sim ↑", "style": "Style ↑", "aesthetic": "Aesthetic ↑",
          "clip_t": "CLIP-T ↑", "clip_i": "CLIP-I ↑", "dino": "DINO ↑", "dreamsim": "DreamSim ↓"}
EVAL_OPTIONS = ("clip_model", "dino_model", "aesthetic_head")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Pair:
    name: str
    source: Path
    reference: Path


def load_pairs(path: str | Path) -> list[Pair]:
    """Read and check ``pairs.yaml``: a list of ``{name?, source: DIR, reference: DIR}`` (or ``{pairs: [...]}``).
    Relative folders are relative to the file. Problems are one-line ``UserError``s."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pairs file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except ValueError:  # UnicodeDecodeError, and the like from YAML's constructors (YAMLError is not one)
        raise UserError(f"{path}: not a text (UTF-8) YAML file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        raise UserError(f"{path}: not valid YAML" + (f" (line {where.line + 1})" if where else "")) from None
    if isinstance(data, dict) and "pairs" in data:
        data = data["pairs"]
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty list of {{name, source, reference}} entries")
    pairs, seen = [], set()
    for i, entry in enumerate(data, 1):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: entry {i} is not a mapping with source and reference")
        unknown = set(entry) - {"name", "source", "reference"}
        if unknown:
            raise UserError(f"{path}: entry {i} has unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                            f"(allowed: name, source, reference)")
        dirs = {}
        for role in ("source", "reference"):
            if not entry.get(role):
                raise UserError(f"{path}: entry {i} has no '{role}' folder")
            d = Path(str(entry[role])).expanduser()
            d = (d if d.is_absolute() else (path.parent / d)).resolve()
            if not d.is_dir():
                raise UserError(f"{path}: entry {i}: {role} folder not found: {d}")
            dirs[role] = d
        explicit = entry.get("name") is not None
        name = str(entry["name"]) if explicit else _slug(f"{dirs['source'].name}-{dirs['reference'].name}")
        if not _NAME.match(name):
            raise UserError(f"{path}: entry {i}: name {name!r} must be letters, digits, '.', '_' or '-'")
        if name in seen:
            if explicit:
                raise UserError(f"{path}: entry {i}: duplicate pair name {name!r}")
            k = 2
            while f"{name}-{k}" in seen:
                k += 1
            name = f"{name}-{k}"
        seen.add(name)
        pairs.append(Pair(name, dirs["source"], dirs["reference"]))
    return pairs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "pair"


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BenchSettings:
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    images_per_pair: int = 100
    preset: str = "paper"
    seed: int = 0
    steps: int | None = None  # sampling steps; None: 50 (paper) / 10 (smoke)
    guidance: float = 7.5
    metrics: list[str] = field(default_factory=lambda: list(TABLE_METRICS))
    face_backend: str = "dlib"
    eval_options: dict = field(default_factory=dict)  # clip_model, dino_model, aesthetic_head
    overrides: dict = field(default_factory=dict)  # {method or "*": {setting: value}}
    shared_class_images: bool = True  # baselines cache class images in DIR/class_images (made once per sweep)

    @property
    def sampling_steps(self) -> int:
        return self.steps or GENERATION_STEPS.get(self.preset, 50)


def _config_class(method: str) -> type:
    """The settings dataclass of ``method``."""
    from ..methods import get_method

    return get_method(method).config_class


def method_settings(method: str) -> set[str]:
    """The setting names ``method`` accepts as overrides."""
    from ..methods import get_method

    return set(get_method(method).settings())


def resolve_overrides(settings: BenchSettings, method: str) -> dict:
    """This method's overrides: ``"*"`` entries it knows, then its own entries (which win)."""
    known = method_settings(method)
    out = {k: v for k, v in settings.overrides.get("*", {}).items() if k in known}
    out.update(settings.overrides.get(method, {}))
    return out


def check_settings(settings: BenchSettings) -> None:
    from ..methods import METHODS, shared_presets

    PRESETS = shared_presets()
    if not settings.methods:
        raise UserError("no methods given")
    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if len(set(settings.methods)) != len(settings.methods):
        raise UserError("a method is listed twice")
    if settings.preset not in PRESETS:
        raise UserError(f"unknown preset {settings.preset!r}; choose one of {', '.join(PRESETS)}")
    if settings.images_per_pair < 1 or settings.sampling_steps < 1:
        raise UserError("--images-per-pair and --steps must be at least 1")
    if not math.isfinite(settings.guidance):
        raise UserError(f"--guidance must be a finite number (got {settings.guidance})")
    _check_evaluation(settings)
    for key, values in settings.overrides.items():
        if key != "*" and key not in settings.methods:
            raise UserError(f"settings given for {key}, which is not among the methods ({', '.join(settings.methods)})")
        targets = [key] if key != "*" else settings.methods
        for name, value in values.items():
            if not any(name in method_settings(m) for m in targets):
                raise UserError(f"unknown setting {name!r} for {key if key != '*' else 'any selected method'}")
            label = f"{key}.{name}" if key != "*" else name
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--set {label}={value}: must be a finite number")
            for m in targets:
                kinds = setting_types(m).get(name)
                if kinds and not _value_fits(value, kinds):
                    raise UserError(f"--set {label}={value!r}: {m} expects {' or '.join(kinds)}")
                default = _setting_default(m, name)
                if (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0
                        and isinstance(default, (int, float)) and not isinstance(default, bool) and default >= 0
                        and not name.endswith("seed")):
                    raise UserError(f"--set {label}={value!r}: must not be negative")


_SIMPLE_TYPES = {"int", "float", "str", "bool", "None"}


def setting_types(method: str) -> dict[str, tuple[str, ...]]:
    """The simple types (int, float, str, bool, None) of each of ``method``'s settings, from its config class's
    annotations; settings of other types (lists ...) are left out (not checked)."""
    out = {}
    for f in fields(_config_class(method)):
        kinds = tuple(t.strip() for t in str(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", f.type))
                      .replace("Optional[", "").replace("]", " | None").split("|"))
        if kinds and all(k in _SIMPLE_TYPES for k in kinds):
            out[f.name] = kinds
    return out


def _setting_default(method: str, name: str) -> Any:
    return next((f.default for f in fields(_config_class(method)) if f.name == name), None)


def _value_fits(value: Any, kinds: tuple[str, ...]) -> bool:
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return "int" in kinds or "float" in kinds
    if isinstance(value, float):
        return "float" in kinds
    if isinstance(value, str):
        return "str" in kinds
    return False


def _check_evaluation(settings: BenchSettings) -> None:
    """Metric names and the face backend's form, checked before any cell is trained."""
    if not settings.metrics:
        raise UserError("no metric given (--metrics)")
    try:
        from ..evaluation.face_id import parse_backend
        from ..evaluation.metrics import parse_metrics
    except ImportError:  # the evaluation extras are missing: each cell records why it cannot be evaluated
        return
    try:
        parse_metrics(list(settings.metrics))
    except UserError as exc:
        raise UserError(f"--metrics: {exc}") from None
    try:
        backend, _ = parse_backend(settings.face_backend)
    except UserError as exc:
        raise UserError(f"--face-backend: {exc}") from None


def parse_set(items: list[str]) -> dict:
    """``["dreambooth.steps=10", "lr=1e-4"]`` -> ``{"dreambooth": {"steps": 10}, "*": {"lr": 0.0001}}``."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected [METHOD.]KEY=VALUE, e.g. dreambooth.steps=100")
        method, dot, name = key.strip().rpartition(".")
        out.setdefault(method if dot else "*", {})[name] = parse_value(value)
    return out


# ---------------------------------------------------------------------------------------------------------------
# One cell
# ---------------------------------------------------------------------------------------------------------------


def cell_dir(out: Path, pair: str, method: str) -> Path:
    return Path(out) / "cells" / pair / method


def _composed_prompt(run_dir: Path) -> str:
    from ..training.generate import default_prompt
    from ..training.runs import RunDir

    return default_prompt(RunDir(run_dir).read_config())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, UserError):
        return text or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def _evaluator(spec: Any) -> Callable:
    """The evaluation function: the given callable, a ``"module:function"`` string, or (None) the real one,
    imported only now (``magicstudio.evaluation`` may be absent or broken: the cell then records why)."""
    if callable(spec):
        return spec
    if isinstance(spec, str) and spec:
        import importlib

        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)
    from ..evaluation import evaluate_images

    return evaluate_images


def _expected_images(images: Path, n: int, seed: int) -> list[Path]:
    return [images / f"{i:03d}-seed{seed + i}.png" for i in range(n)]


def run_cell(spec: dict) -> dict:
    """Train, generate and evaluate one cell; never raises for a cell's own failure (it is recorded).

    ``spec``: pair, method, source, reference, cell_dir, preset, seed, overrides, images, steps, guidance,
    metrics, face_backend, eval_options, evaluator (None: ``magicstudio.evaluation.evaluate_images``),
    reevaluate, progress (training progress output). Returns the cell's ``result.json`` content.
    """
    from ..methods import get_method

    cell = Path(spec["cell_dir"])
    cell.mkdir(parents=True, exist_ok=True)
    done = cell / "DONE"
    if done.is_file() and not spec.get("reevaluate"):
        return read_result(cell)
    for stale in ("error.txt", "traceback.txt"):
        (cell / stale).unlink(missing_ok=True)
    run_dir, images = cell / "run", cell / "images"
    result: dict[str, Any] = {"pair": spec["pair"], "method": spec["method"], "status": "running",
                              "preset": spec["preset"], "seed": spec["seed"], "images": spec["images"],
                              "timings": {}}
    stage = "train"
    try:
        t0 = time.time()
        if not (run_dir / "DONE").is_file():
            train = get_method(spec["method"]).train
            train(spec["source"], spec["reference"], run_dir, spec["preset"], spec["seed"],
                  resume=(run_dir / "config.yaml").is_file(), progress=bool(spec.get("progress")),
                  **spec.get("overrides", {}))
        result["timings"]["train_s"] = round(time.time() - t0, 3)

        stage = "generate"
        t0 = time.time()
        prompt = _composed_prompt(run_dir)
        result["prompt"] = prompt
        expected = _expected_images(images, spec["images"], spec["seed"])
        if not all(p.is_file() for p in expected):
            from ..training.generate import generate

            shutil.rmtree(images, ignore_errors=True)  # the cell's own partial images: generate never overwrites
            generate(run_dir, images, prompt=prompt, num_images=spec["images"], seed=spec["seed"],
                     steps=spec["steps"], guidance=spec["guidance"])
        result["timings"]["generate_s"] = round(time.time() - t0, 3)

        stage = "evaluate"
        t0 = time.time()
        evaluate = _evaluator(spec.get("evaluator"))
        kwargs = {k: v for k, v in (spec.get("eval_options") or {}).items() if v is not None}
        encoder = _training_face_encoder(run_dir)
        if encoder and spec.get("evaluator") is None:
            kwargs.setdefault("training_face_encoder", encoder)
        report = evaluate([str(p) for p in expected], spec["source"], spec["reference"], prompts=prompt,
                          metrics=list(spec["metrics"]), face_backend=spec["face_backend"], **kwargs)
        _write_eval(cell, report)
        result["timings"]["evaluate_s"] = round(time.time() - t0, 3)
        result["summary"] = report.get("summary", {})
        warnings = (report.get("config") or {}).get("warnings") or []
        if warnings:
            result["warnings"] = list(warnings)
        result["status"] = "done"
        write_json(cell / "result.json", result)
        atomic_write(done, lambda p: p.write_text("done\n"))
    except BaseException as exc:  # noqa: BLE001 - a cell's failure is data; Ctrl-C still stops the sweep
        done.unlink(missing_ok=True)
        line = f"{stage}: {_one_line(exc)}"
        result.update(status="failed", stage=stage, error=line)
        (cell / "error.txt").write_text(line + "\n")
        (cell / "traceback.txt").write_text("".join(traceback.format_exception(exc)))
        write_json(cell / "result.json", result)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
    return result


def _training_face_encoder(run_dir: Path) -> str | None:
    try:
        from ..training.runs import RunDir

        enc = RunDir(run_dir).read_config().get("face_encoder")
        return str(enc) if enc and enc != "tiny" else None
    except Exception:
        return None


def _write_eval(cell: Path, report: dict) -> None:
    write_json(cell / "eval.json", report)
    try:
        from ..evaluation.report import markdown

        text = markdown(report)
        atomic_write(cell / "eval.md", lambda p: p.write_text(text))
    except Exception:  # the markdown is a convenience; eval.json has everything
        pass


def read_result(cell: Path) -> dict:
    path = Path(cell) / "result.json"
    if not path.is_file():
        return {"status": "pending"}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {"status": "failed", "error": "result.json is unreadable"}


# ---------------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    out: Path
    cells: list[dict]
    report: dict[str, Path]

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.cells if c.get("status") != "done"]


def _plain(obj: Any) -> Any:
    """JSON/YAML-safe copy (paths as strings, tuples as lists), so stored and fresh values compare equal."""
    return json.loads(json.dumps(obj, default=str))


def _fingerprint(settings: BenchSettings, pair: Pair, method: str, overrides: dict) -> dict:
    """What a cell's numbers depend on; a cell made with other values is not silently reused."""
    overrides = {k: v for k, v in overrides.items() if k != "class_dir"}  # where a cache lives changes nothing
    return _plain({"method": method, "source": str(pair.source), "reference": str(pair.reference),
                   "preset": settings.preset, "seed": settings.seed, "overrides": overrides,
                   "images": settings.images_per_pair, "steps": settings.sampling_steps,
                   "guidance": settings.guidance})


def _prepare_pair(pair: Pair, out: Path, progress: bool) -> tuple[Path, Path]:
    """The pair's folders as ``magicstudio prepare`` folders (prepared once under ``DIR/prepared/<pair>``)."""
    from ..data.prepare import is_prepared
    from ..training.personalize import prepared_dir

    dirs = []
    for role, folder in (("source", pair.source), ("reference", pair.reference)):
        cached = out / "prepared" / pair.name / role
        dirs.append(cached if is_prepared(cached) else prepared_dir(folder, role, cached.parent, 512, progress))
    return dirs[0], dirs[1]


def plan(pairs: list[Pair], settings: BenchSettings, out: Path, evaluator: Any = None,
         reevaluate: bool = False) -> list[dict]:
    """One spec per cell, after checking that existing cells were made with the same settings."""
    specs, clashes = [], []
    for pair in pairs:
        for method in settings.methods:
            overrides = resolve_overrides(settings, method)
            if (settings.shared_class_images and "class_dir" in method_settings(method)
                    and "class_dir" not in overrides):
                overrides["class_dir"] = str(out / "class_images")
            cdir = cell_dir(out, pair.name, method)
            fp = _fingerprint(settings, pair, method, overrides)
            meta = cdir / "cell.json"
            if meta.is_file():
                try:
                    old = json.loads(meta.read_text(encoding="utf-8"))
                    if not isinstance(old, dict):
                        raise ValueError("not a JSON object")
                    old = old.get("fingerprint", {})
                    if not isinstance(old, dict):
                        raise ValueError("fingerprint is not a JSON object")
                except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                    raise UserError(f"{meta} is damaged; delete the folder {cdir} to redo that cell") from None
                diff = [k for k in fp if old.get(k) != fp[k]]
                if diff:
                    changes = ", ".join(f"{k}: {old.get(k)!r} -> {fp[k]!r}" for k in diff)
                    clashes.append(f"{pair.name}/{method} ({changes})")
            specs.append({"pair": pair.name, "method": method, "source": str(pair.source),
                          "reference": str(pair.reference), "cell_dir": str(cdir), "preset": settings.preset,
                          "seed": settings.seed, "overrides": overrides, "images": settings.images_per_pair,
                          "steps": settings.sampling_steps, "guidance": settings.guidance,
                          "metrics": list(settings.metrics), "face_backend": settings.face_backend,
                          "eval_options": dict(settings.eval_options), "evaluator": evaluator,
                          "reevaluate": reevaluate, "fingerprint": fp})
    if clashes:
        raise UserError(f"{out} holds cells made with other settings: {clashes[0]}"
                        + (f" and {len(clashes) - 1} more" if len(clashes) > 1 else "")
                        + "; use another --out, or delete those cells")
    return specs


def check_out(out: Path) -> None:
    """``out`` must be new, empty, or a bench folder (bench.yaml or cells/): a user's other folder is not written into."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not ((out / "bench.yaml").is_file() or (out / "cells").is_dir()):
        raise UserError(f"--out {out} is a non-empty folder that is not a bench folder (no bench.yaml or cells/); "
                        f"use a new or empty folder")


def run_bench(pairs: list[Pair], settings: BenchSettings, out: str | Path, backend: str = "local",
              ray_address: str | None = None, evaluator: Any = None, reevaluate: bool = False,
              progress: bool = True) -> BenchResult:
    """Run (or resume) the sweep of ``settings.methods`` over ``pairs`` into ``out`` and write the report."""
    if backend not in ("local", "ray"):
        raise UserError(f"unknown backend {backend!r}; use local or ray")
    check_settings(settings)
    out = Path(out)
    check_out(out)
    specs = plan(pairs, settings, out, evaluator, reevaluate)
    ray = _import_ray() if backend == "ray" else None
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"pairs": [{"name": p.name, "source": str(p.source), "reference": str(p.reference)}
                                     for p in pairs], "settings": _plain(asdict(settings)), "backend": backend},
                          sort_keys=False, allow_unicode=True)
    atomic_write(out / "bench.yaml", lambda p: p.write_text(text))

    # each pair's photos are prepared once, here; a pair that cannot be prepared fails its cells
    prepared: dict[str, tuple[Path, Path] | str] = {}
    todo = []
    for spec in specs:
        cell = Path(spec["cell_dir"])
        if (cell / "DONE").is_file() and not reevaluate:
            continue
        if spec["pair"] not in prepared:
            pair = next(p for p in pairs if p.name == spec["pair"])
            try:
                prepared[pair.name] = _prepare_pair(pair, out, progress)
            except UserError as exc:
                prepared[pair.name] = f"prepare: {exc}"
        got = prepared[spec["pair"]]
        cell.mkdir(parents=True, exist_ok=True)
        write_json(cell / "cell.json", {"pair": spec["pair"], "method": spec["method"], "fingerprint": spec["fingerprint"]})
        if isinstance(got, str):
            _record_failure(cell, spec, got)
            continue
        spec["source"], spec["reference"] = str(got[0]), str(got[1])
        spec["progress"] = progress and backend == "local"  # training progress; Ray workers stay quiet
        todo.append(spec)

    finished = sum((Path(s["cell_dir"]) / "DONE").is_file() for s in specs) if not reevaluate else 0
    if progress and finished:
        _say(f"{finished} of {len(specs)} cell(s) already finished (skipped); {len(todo)} to run")
    if ray is not None:
        _run_ray(ray, todo, ray_address, progress)
    else:
        for i, spec in enumerate(todo, 1):
            if progress:
                _say(f"[{i}/{len(todo)}] {spec['pair']} / {spec['method']} ...")
            res = run_cell(spec)
            if progress:
                _say(f"[{i}/{len(todo)}] {spec['pair']} / {spec['method']}: {_status_text(res)}")
    cells = [read_result(Path(s["cell_dir"])) | {"pair": s["pair"], "method": s["method"]} for s in specs]
    report = write_report(out, cells, settings)
    return BenchResult(out, cells, report)


def _record_failure(cell: Path, spec: dict, line: str) -> None:
    (cell / "error.txt").write_text(line + "\n")
    write_json(cell / "result.json", {"pair": spec["pair"], "method": spec["method"], "status": "failed",
                                      "stage": line.split(":", 1)[0], "error": line})


def _status_text(res: dict) -> str:
    if res.get("status") == "done":
        t = res.get("timings", {})
        return "done (" + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in t.items()) + ")"
    return f"FAILED - {res.get('error', res.get('status'))}"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'magicstudio[cluster]' (or use --backend local)") from None
    return ray


def _run_ray(ray, specs: list[dict], address: str | None, progress: bool) -> None:
    """Each cell as a Ray task (one GPU each when the cluster has GPUs); results are files in the cell folders,
    so ``DIR`` must be on storage every node sees."""
    if not specs:
        return
    if not ray.is_initialized():
        ray.init(address=address or None, ignore_reinit_error=True)
    gpus = float(ray.cluster_resources().get("GPU", 0) or 0)
    task = ray.remote(num_gpus=1 if gpus >= 1 else 0, max_retries=0)(run_cell)
    pending = {task.remote(spec): spec for spec in specs}
    finished = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            spec = pending.pop(ref)
            finished += 1
            try:
                res = ray.get(ref)
            except Exception as exc:  # the worker died (out of memory, node lost): the cell could not record it
                line = f"ray: {_one_line(exc)}"
                _record_failure(Path(spec["cell_dir"]), spec, line)
                res = {"status": "failed", "error": line}
            if progress:
                _say(f"[{finished}/{len(specs)}] {spec['pair']} / {spec['method']}: {_status_text(res)}")


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def aggregate(cells: list[dict], methods: list[str], metrics: list[str]) -> list[dict]:
    """Per (method, metric): the mean and std over all generated images (pooled from the cells' summaries),
    the std of the per-pair means, the image count, misses, and how many cells count."""
    rows = []
    for method in methods:
        mine = [c for c in cells if c.get("method") == method]
        ok = [c for c in mine if c.get("status") == "done"]
        for metric in metrics:
            parts, errors, misses = [], [], 0
            for c in ok:
                s = (c.get("summary") or {}).get(metric)
                if not s:
                    errors.append("not computed")
                elif "error" in s:
                    errors.append(str(s["error"]))
                else:
                    misses += int(s.get("misses") or 0)
                    if s.get("n") and s.get("mean") is not None:
                        parts.append((int(s["n"]), float(s["mean"]), float(s.get("std") or 0.0)))
            n = sum(p[0] for p in parts)
            mean = std = pair_std = None
            if n:
                mean = sum(k * m for k, m, _ in parts) / n
                var = sum(k * (s * s + m * m) for k, m, s in parts) / n - mean * mean
                std = math.sqrt(max(0.0, var))
                means = [m for _, m, _ in parts]
                mu = sum(means) / len(means)
                pair_std = math.sqrt(sum((m - mu) ** 2 for m in means) / len(means))
            rows.append({"method": method, "metric": metric, "mean": mean, "std": std, "pair_std": pair_std,
                         "n_images": n, "misses": misses, "pairs": len(parts), "cells_done": len(ok),
                         "cells_total": len(mine), "error": errors[0] if errors and not parts else ""})
    return rows


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write_report(out: Path, cells: list[dict], settings: BenchSettings) -> dict[str, Path]:
    """``report.md`` (Table 1 style), ``report.csv`` (one row per method and metric), ``cells.csv`` (one row per
    cell) and ``report.png`` (bars with the spread; skipped with a note if matplotlib is missing)."""
    import csv
    import io

    out = Path(out)
    methods, metrics = settings.methods, list(settings.metrics)
    rows = aggregate(cells, methods, metrics)
    by = {(r["method"], r["metric"]): r for r in rows}
    pairs = sorted({c["pair"] for c in cells})
    paths: dict[str, Path] = {}

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["method", "metric"], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    text = buf.getvalue()
    paths["csv"] = atomic_write(out / "report.csv", lambda p: p.write_text(text))

    buf = io.StringIO()
    cw = csv.writer(buf, lineterminator="\n")
    cw.writerow(["pair", "method", "status", "error"] + [f"{m}_mean" for m in metrics] + [f"{m}_n" for m in metrics])
    for c in cells:
        summ = c.get("summary") or {}
        cw.writerow([c["pair"], c["method"], c.get("status", "pending"), c.get("error", "")]
                    + [(summ.get(m) or {}).get("mean", "") if "error" not in (summ.get(m) or {}) else "" for m in metrics]
                    + [(summ.get(m) or {}).get("n", "") for m in metrics])
    text = buf.getvalue()
    paths["cells"] = atomic_write(out / "cells.csv", lambda p: p.write_text(text))

    chart_note = _chart(out / "report.png", rows, methods, metrics)
    if chart_note is None:
        paths["chart"] = out / "report.png"

    lines = [f"# Benchmark: {len(pairs)} pair(s) x {len(methods)} method(s)", "",
             f"Preset `{settings.preset}`, {settings.images_per_pair} image(s) per pair with the composed prompt "
             f"(guidance {settings.guidance}, {settings.sampling_steps} steps, seeds {settings.seed}.."
             f"{settings.seed + settings.images_per_pair - 1}); face backend `{settings.face_backend}`.", "",
             "| method | " + " | ".join(LABELS.get(m, m) for m in metrics) + " | cells done |",
             "|---|" + "---:|" * len(metrics) + "---:|"]
    notes: dict[tuple[str, str], list[str]] = {}  # (metric, error) -> methods: footnotes instead of long cells
    for method in methods:
        vals = []
        for m in metrics:
            r = by[(method, m)]
            if r["mean"] is not None:
                vals.append(f"{_fmt(r['mean'])} ± {_fmt(r['std'])}")
            elif r["error"]:
                notes.setdefault((m, r["error"]), []).append(method)
                vals.append(f"n/a [{list(notes).index((m, r['error'])) + 1}]")
            elif r["misses"]:
                what = "no face in" if m in ("csim", "face_sim") else "no value for"
                vals.append(f"n/a ({what} any of {r['misses']} image(s))")
            else:
                vals.append("-")
        done = by[(method, metrics[0])] if metrics else {"cells_done": 0, "cells_total": 0}
        lines.append(f"| {method} | " + " | ".join(vals) + f" | {done['cells_done']}/{done['cells_total']} |")
    lines += ["", "mean ± std over all generated images of all pairs. Spread between pairs (std of the per-pair "
              "means) and counts:", "",
              "| method | " + " | ".join(f"{m} pair std" for m in metrics) + " | "
              + " | ".join(f"{m} n (misses)" for m in metrics) + " |",
              "|---|" + "---:|" * (2 * len(metrics))]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(_fmt(by[(method, m)]["pair_std"]) for m in metrics) + " | "
                     + " | ".join(f"{by[(method, m)]['n_images']} ({by[(method, m)]['misses']})" for m in metrics) + " |")
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"{i}. {m} unavailable for {', '.join(ms)}: {_md(err)}"
                  for i, ((m, err), ms) in enumerate(notes.items(), 1)]
    failed = [c for c in cells if c.get("status") != "done"]
    if failed:
        lines += ["", f"## Unfinished cells ({len(failed)})", ""]
        lines += [f"- {c['pair']} / {c['method']}: {c.get('status', 'pending')}"
                  + (f" - {_md(c['error'])}" if c.get("error") else "") for c in failed]
    warnings = sorted({w for c in cells for w in c.get("warnings", [])})
    if warnings:
        lines += ["", "## Evaluation warnings", ""] + [f"- {_md(w)}" for w in warnings]
    lines += ["", "Files: report.csv (this table), cells.csv (one row per cell), cells/<pair>/<method>/ (runs, images, "
              "eval.json)." + (" Chart: report.png." if chart_note is None else f" No chart: {chart_note}.")]
    text = "\n".join(lines) + "\n"
    paths["markdown"] = atomic_write(out / "report.md", lambda p: p.write_text(text))
    return paths


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _chart(path: Path, rows: list[dict], methods: list[str], metrics: list[str]) -> str | None:
    """Bar chart: one panel per metric, one bar per method, error bars = std over images. Returns None when
    written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "matplotlib is not installed"
    by = {(r["method"], r["metric"]): r for r in rows}
    shown = [m for m in metrics if any(by[(x, m)]["mean"] is not None for x in methods)]
    if not shown:
        return "no metric has values yet"
    fig, axes = plt.subplots(1, len(shown), figsize=(max(4.0, 0.55 * len(methods) + 2) * len(shown), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for ax, metric in zip(axes[0], shown):
        means = [by[(x, metric)]["mean"] for x in methods]
        stds = [by[(x, metric)]["std"] or 0.0 for x in methods]
        xs = range(len(methods))
        ax.bar(xs, [m if m is not None else 0 for m in means], yerr=stds, capsize=4,
               color=[colours[i % len(colours)] for i in xs])
        for i, m in enumerate(means):
            if m is None:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=8)
        ax.set_title(LABELS.get(metric, metric))
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return None


__all__ = ["BenchResult", "BenchSettings", "DEFAULT_METHODS", "Pair", "TABLE_METRICS", "aggregate", "load_pairs",
           "parse_set", "run_bench", "run_cell", "write_report"]
