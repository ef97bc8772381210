"""Export formats of a run folder: what other tools (plain diffusers, AUTOMATIC1111, ComfyUI) load.

The files written here are a contract, so each one is a format those tools already read, not a private one::

    RUN/pytorch_lora_weights.safetensors   diffusers LoRA: ``pipe.load_lora_weights(RUN)``
    RUN/embeddings/<name>.safetensors      one textual-inversion file per token, ``{token: [1, D]}``:
                                           ``pipe.load_textual_inversion(file)`` (the file names its token)
    RUN/a1111/<lora-name>_lora.safetensors kohya-ss LoRA for A1111 / ComfyUI / SD.Next / InvokeAI
    RUN/a1111/<name>.safetensors           A1111 / ComfyUI embedding ``{"emb_params": [1, D]}``

``<name>`` is the token without its angle brackets (``<v1>`` -> ``v1``), reduced to characters that are safe in
a file name on every OS.

The diffusers LoRA file holds PEFT keys (``unet.<module>.lora_A.weight`` / ``lora_B``; the text encoder's under
``text_encoder.text_model.…``, the layout every SD 1.x/2.x LoRA has, which diffusers maps onto both the old and the
flattened transformers ``CLIPTextModel``) and, in the safetensors header, each component's ``LoraConfig`` as
diffusers' ``lora_adapter_metadata``. Without that metadata diffusers assumes ``lora_alpha == r`` and a LoRA
trained with another alpha reloads at the wrong strength, silently.

The kohya file has one ``lora_unet_<module>`` / ``lora_te_text_model_<module>`` entry per adapted layer (dots of
the diffusers module name turned into underscores) with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``,
where ``alpha / rank`` is the layer's LoRA scale. diffusers' ``convert_state_dict_to_kohya`` is not used: it
writes ``alpha = rank`` for every layer (wrong whenever ``lora_alpha != r``), names the SD 1.x text encoder
``lora_te1_`` (the SDXL spelling) and drops the ``text_model_`` part that A1111 and ComfyUI match on.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compat import check_text_encoder_lora
from ..errors import UserError
from ..io import canonicalise_safetensors_file, load_tensors, save_tensors

LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDINGS_DIR = "embeddings"
A1111_DIR = "a1111"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
A1111_EMBEDDING_KEY = "emb_params"
COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
TEXT_MODEL = "text_model."

__all__ = [
    "LoraWeights",
    "RunWeights",
    "A1111Files",
    "lora_from_modules",
    "save_lora",
    "read_lora",
    "embedding_name",
    "save_embeddings",
    "read_embeddings",
    "kohya_state_dict",
    "export_a1111",
    "load_run_into_pipeline",
]


# ----------------------------------------------------------------------------------------------------------------
# LoRA weights, independent of where they come from (live PEFT modules or a diffusers file)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LoraWeights:
    """A plain LoRA per component (``"unet"``, ``"text_encoder"``), in PEFT key layout.

    ``tensors[component]`` maps ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` to tensors, with module
    names as in diffusers' UNet and, for the text encoder, always starting with ``text_model.``.
    ``configs[component]`` is the ``LoraConfig`` as a dict (what diffusers stores as adapter metadata); it holds
    ``lora_alpha`` (and ``alpha_pattern`` / ``use_rslora``), which decide each layer's scale.
    """

    tensors: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, dict]

    def modules(self, component: str) -> list[str]:
        """Adapted module names of one component, in file order."""
        suffix = ".lora_A.weight"
        return [k[: -len(suffix)] for k in self.tensors.get(component, {}) if k.endswith(suffix)]

    def rank(self, component: str, module: str) -> int:
        return int(self.tensors[component][f"{module}.lora_A.weight"].shape[0])

    def scale(self, component: str, module: str) -> float:
        """The factor PEFT multiplies ``B @ A`` by for this layer (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA)."""
        cfg = self.configs[component]
        r = self.rank(component, module)
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r)))
        return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    def kohya_alpha(self, component: str, module: str) -> float:
        """The kohya ``alpha`` giving the same scale (kohya always scales by ``alpha / rank``)."""
        return self.scale(component, module) * self.rank(component, module)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module name or a dotted suffix of it."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def _canonical_te_name(module: str) -> str:
    """``encoder.layers.0…`` (transformers >= 5 flattened CLIPTextModel) -> ``text_model.encoder.layers.0…``."""
    return module if module.startswith(TEXT_MODEL) else TEXT_MODEL + module


def _collect_lora(module: torch.nn.Module, adapter_name: str, component: str) -> tuple[dict, dict] | None:
    """Tensors and config of adapter ``adapter_name`` in one PEFT-wrapped module, or None if it has none."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    peft_configs = getattr(module, "peft_config", None) or {}
    if isinstance(module, PeftModel):
        module = module.get_base_model()
    tensors: dict[str, torch.Tensor] = {}
    per_layer: dict[str, tuple[int, float, bool]] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if adapter_name in getattr(layer, "lora_embedding_A", {}):
            raise UserError(f"{component}: LoRA on embedding layer {name!r} cannot be exported; target Linear/Conv layers")
        if adapter_name not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter_name, False):
            raise UserError(f"{component}: DoRA adapters cannot be exported as a plain LoRA (layer {name!r})")
        if getattr(layer, "lora_bias", {}).get(adapter_name, False):
            raise UserError(f"{component}: LoRA with lora_bias=True cannot be exported (layer {name!r})")
        out = _canonical_te_name(name) if component == "text_encoder" else name
        tensors[f"{out}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().cpu().contiguous()
        tensors[f"{out}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().cpu().contiguous()
        per_layer[name] = (layer.r[adapter_name], float(layer.lora_alpha[adapter_name]), layer.use_rslora.get(adapter_name, False))
    if not tensors:
        return None

    config = peft_configs.get(adapter_name)
    if config is not None:
        cfg = config.to_dict()
        if str(cfg.get("peft_type", "LORA")).upper().split(".")[-1] != "LORA":
            raise UserError(f"{component}: adapter {adapter_name!r} is {cfg.get('peft_type')}, not LoRA")
        if cfg.get("modules_to_save"):
            raise UserError(f"{component}: adapter {adapter_name!r} fully trains {cfg['modules_to_save']}; that is not a LoRA and cannot be exported")
    else:  # e.g. peft.inject_adapter_in_model, which leaves no config on the module: rebuild one from the layers
        cfg = _config_from_layers(per_layer, component)
    return tensors, cfg


def _config_from_layers(per_layer: dict[str, tuple[int, float, bool]], component: str) -> dict:
    rslora = {v[2] for v in per_layer.values()}
    if len(rslora) > 1:
        raise UserError(f"{component}: some layers use rsLoRA and some do not; cannot describe that in one LoraConfig")
    r = Counter(v[0] for v in per_layer.values()).most_common(1)[0][0]
    alpha = Counter(v[1] for v in per_layer.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(per_layer),
        "rank_pattern": {n: v[0] for n, v in per_layer.items() if v[0] != r},
        "alpha_pattern": {n: v[1] for n, v in per_layer.items() if v[1] != alpha},
        "use_rslora": rslora.pop(),
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
    }


def lora_from_modules(unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None = None, adapter_name: str = "default") -> LoraWeights:
    """Take adapter ``adapter_name`` out of PEFT-wrapped modules (``add_adapter`` / ``inject_adapter_in_model``).

    Raises ``UserError`` if neither module carries that adapter, or if it is not a plain LoRA (DoRA, LoRA bias,
    embedding LoRA, ``modules_to_save``).
    """
    lora = _gather_lora(unet, text_encoder, adapter_name)
    if lora is None:
        raise UserError(f"no LoRA adapter named {adapter_name!r} in the UNet or the text encoder")
    return lora


def _gather_lora(unet, text_encoder, adapter_name: str) -> LoraWeights | None:
    tensors, configs = {}, {}
    for component, module in (("unet", unet), ("text_encoder", text_encoder)):
        if module is None:
            continue
        found = _collect_lora(module, adapter_name, component)
        if found is not None:
            tensors[component], configs[component] = found
    return LoraWeights(tensors=tensors, configs=configs) if tensors else None


def save_lora(out_dir: str | os.PathLike, unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None = None, adapter_name: str = "default") -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` in diffusers format, with the LoRA configs as metadata.

    Written by diffusers' own ``StableDiffusionPipeline.save_lora_weights`` with ``unet_lora_adapter_metadata`` /
    ``text_encoder_lora_adapter_metadata``, so ``pipe.load_lora_weights(out_dir)`` rebuilds each ``LoraConfig``
    (rank, ``lora_alpha``, patterns) instead of guessing ``alpha = r``. The file appears atomically.
    """
    lora = lora_from_modules(unet, text_encoder, adapter_name)
    return _write_diffusers_lora(Path(out_dir), lora)


def _write_diffusers_lora(out_dir: Path, lora: LoraWeights) -> Path:
    from diffusers import StableDiffusionPipeline

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=out_dir))
    try:
        StableDiffusionPipeline.save_lora_weights(
            save_directory=str(tmp),
            unet_lora_layers=lora.tensors.get("unet"),
            text_encoder_lora_layers=lora.tensors.get("text_encoder"),
            unet_lora_adapter_metadata=dict(lora.configs["unet"]) if "unet" in lora.tensors else None,
            text_encoder_lora_adapter_metadata=dict(lora.configs["text_encoder"]) if "text_encoder" in lora.tensors else None,
            weight_name=LORA_FILE,
            safe_serialization=True,
        )
        canonicalise_safetensors_file(tmp / LORA_FILE)  # the same LoRA gives the same bytes
        target = out_dir / LORA_FILE
        os.replace(tmp / LORA_FILE, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_lora(path: str | os.PathLike) -> LoraWeights:
    """Read a diffusers-format LoRA file (ours, or diffusers' older ``lora.down`` / ``lora_linear_layer`` keys).

    Without adapter metadata in the file, each layer gets ``lora_alpha = r``: that is how diffusers itself loads
    such a file. A kohya file is refused (it is already in A1111 format).
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    state = load_tensors(path)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in state):
        raise UserError(f"{path} is a kohya-format LoRA, not a diffusers one")
    header = {}
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    adapter_meta = json.loads(header[LORA_METADATA_KEY]) if header.get(LORA_METADATA_KEY) else {}

    tensors, configs, used = {}, {}, set()
    for component in COMPONENTS:
        prefix = component + "."
        sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        used.update(prefix + k for k in sd)
        if not sd:
            continue
        if component == "unet":
            sd = convert_unet_state_dict_to_peft(sd)
        else:
            if not any(".lora_A." in k for k in sd):
                sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
            sd = {_canonical_te_name(k): v for k, v in sd.items()}
        bad = [k for k in sd if not re.search(r"\.lora_[AB]\.weight$", k)]
        if bad:
            raise UserError(f"{path}: unsupported LoRA entries for {component} (only plain LoRA is exported): {bad[:3]}")
        tensors[component] = sd
        cfg = {k[len(prefix):]: v for k, v in adapter_meta.items() if k.startswith(prefix)}
        if not cfg:
            ranks = {k[: -len(".lora_A.weight")]: int(v.shape[0]) for k, v in sd.items() if k.endswith(".lora_A.weight")}
            r = Counter(ranks.values()).most_common(1)[0][0]
            cfg = {"r": r, "lora_alpha": r, "alpha_pattern": {m: mr for m, mr in ranks.items() if mr != r}}
        configs[component] = cfg
    unknown = sorted(set(state) - used)
    if unknown:
        raise UserError(f"{path}: entries outside unet./text_encoder. (SD 1.x/2.x LoRA expected): {unknown[:3]}")
    if not tensors:
        raise UserError(f"{path} holds no LoRA weights")
    return LoraWeights(tensors=tensors, configs=configs)


# ----------------------------------------------------------------------------------------------------------------
# Placeholder-token embeddings
# ----------------------------------------------------------------------------------------------------------------


def embedding_name(token: str) -> str:
    """File-name stem for a token: ``<v1>`` -> ``v1``; other unsafe characters become ``_``."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", token.strip().strip("<>")).strip(".")
    if not name or set(name) == {"_"}:
        raise UserError(f"token {token!r} gives no usable file name")
    return name


def _check_tokens(tokens: list[str], vectors: torch.Tensor) -> list[str]:
    if vectors.dim() != 2 or vectors.shape[0] != len(tokens):
        raise UserError(f"expected one vector per token: {len(tokens)} tokens but vectors of shape {tuple(vectors.shape)}")
    if len(set(tokens)) != len(tokens):
        raise UserError(f"duplicate placeholder tokens: {tokens}")
    names = [embedding_name(t) for t in tokens]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise UserError(f"tokens {tokens} map to the same file name(s) {clashes}")
    return names


def save_embeddings(out_dir: str | os.PathLike, tokens: list[str], vectors: torch.Tensor) -> list[Path]:
    """Write ``out_dir/embeddings/<name>.safetensors`` per token as ``{token: vector[1, D]}`` (float32).

    That is the file diffusers' textual-inversion training writes, so ``pipe.load_textual_inversion(file)`` adds
    the token by itself (``token=`` may also be passed).
    """
    names = _check_tokens(tokens, vectors)
    folder = Path(out_dir) / EMBEDDINGS_DIR
    paths = []
    for token, name, vec in zip(tokens, names, vectors):
        meta = {"format": "pt", "token": token, "n_vectors": "1", "dim": str(vec.shape[-1])}
        paths.append(save_tensors(folder / f"{name}.safetensors", {token: vec.detach().float().reshape(1, -1)}, meta))
    return paths


def _natural_key(path: Path):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.stem)]


def read_embeddings(run_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{token: [n_vectors, D]}`` from ``run_dir/embeddings/*.safetensors`` (file order: v1, v2, …, v10)."""
    folder = Path(run_dir) / EMBEDDINGS_DIR
    out = {}
    for path in sorted(folder.glob("*.safetensors"), key=_natural_key):
        data = load_tensors(path)
        if len(data) != 1:
            raise UserError(f"{path} should hold exactly one token's embedding, found keys {sorted(data)[:5]}")
        token, vec = next(iter(data.items()))
        out[token] = vec.reshape(-1, vec.shape[-1])
    return out


# ----------------------------------------------------------------------------------------------------------------
# A1111 / ComfyUI
# ----------------------------------------------------------------------------------------------------------------


def _format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def kohya_state_dict(lora: LoraWeights, name: str = "magicstudio", family: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya-ss LoRA tensors and safetensors metadata for ``lora``.

    Keys: ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight`` (= PEFT
    ``lora_A``), ``….lora_up.weight`` (= ``lora_B``) and ``….alpha`` (scalar, ``alpha / rank`` = the layer's scale);
    text encoder layers as ``lora_te_text_model_encoder_layers_0_self_attn_q_proj…``. ``family`` (``sd1``/``sd2``)
    goes into ``ss_base_model_version``; by default it is guessed from the cross-attention width (1024 -> sd2).
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = [], []
    for component in COMPONENTS:
        for module in lora.modules(component):
            sd = lora.tensors[component]
            up_key = f"{module}.lora_B.weight"
            if up_key not in sd:
                raise UserError(f"{component} layer {module!r} has lora_A but no lora_B")
            key = KOHYA_PREFIX[component] + module.replace(".", "_")
            if f"{key}.lora_down.weight" in tensors:
                raise UserError(f"two layers map to the same kohya name {key!r}")
            alpha = lora.kohya_alpha(component, module)
            down = sd[f"{module}.lora_A.weight"]
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = sd[up_key].contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=down.dtype if down.is_floating_point() else torch.float32)
            ranks.append(lora.rank(component, module))
            alphas.append(alpha)
    if not tensors:
        raise UserError("the LoRA has no layers to export")
    family = family or _guess_family(lora)
    v2 = family == "sd2"
    metadata = {
        "ss_network_module": "networks.lora",
        # Informational (loaders use each module's own .alpha); tools parse these as numbers: the most common.
        "ss_network_dim": str(Counter(ranks).most_common(1)[0][0]),
        "ss_network_alpha": _format_number(Counter(alphas).most_common(1)[0][0]),
        "ss_base_model_version": "sd_v2" if v2 else "sd_v1",
        "ss_v2": str(v2),
        "ss_output_name": name,
        "ss_network_args": json.dumps({"unet": "unet" in lora.tensors, "text_encoder": "text_encoder" in lora.tensors}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"stable-diffusion-{'v2' if v2 else 'v1'}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "format": "pt",
    }
    return tensors, metadata


def _guess_family(lora: LoraWeights) -> str:
    for module in lora.modules("unet"):
        if module.endswith("attn2.to_k") or module.endswith("attn2.to_v"):
            return "sd2" if lora.tensors["unet"][f"{module}.lora_A.weight"].shape[1] == 1024 else "sd1"
    for module in lora.modules("text_encoder"):
        return "sd2" if lora.tensors["text_encoder"][f"{module}.lora_A.weight"].shape[1] == 1024 else "sd1"
    return "sd1"


@dataclass
class RunWeights:
    """What a run exports: a LoRA (or None, e.g. a textual-inversion-only run) and ``{token: [n, D]}``."""

    lora: LoraWeights | None = None
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike) -> "RunWeights":
        """Read ``pytorch_lora_weights.safetensors`` and ``embeddings/`` of a run folder."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise UserError(f"run folder not found: {run_dir}")
        lora = read_lora(run_dir / LORA_FILE) if (run_dir / LORA_FILE).is_file() else None
        return cls(lora=lora, embeddings=read_embeddings(run_dir))

    @classmethod
    def from_modules(cls, unet=None, text_encoder=None, tokens: list[str] | None = None, vectors: torch.Tensor | None = None, adapter_name: str = "default") -> "RunWeights":
        """From live modules: the LoRA adapter (if any) and the given token vectors (``[K, D]``)."""
        lora = _gather_lora(unet, text_encoder, adapter_name)
        embeddings = {}
        if tokens:
            if vectors is None:
                raise UserError("tokens given without their vectors")
            _check_tokens(tokens, vectors)
            embeddings = {t: v.detach().reshape(1, -1) for t, v in zip(tokens, vectors)}
        return cls(lora=lora, embeddings=embeddings)


@dataclass
class A1111Files:
    lora: Path | None
    embeddings: list[Path]


def export_a1111(source: str | os.PathLike | RunWeights, out_dir: str | os.PathLike | None = None, name: str | None = None, family: str | None = None) -> A1111Files:
    """Write A1111 / ComfyUI files under ``out_dir/a1111/``: ``<name>_lora.safetensors`` and ``<token>.safetensors``.

    ``source`` is a run folder (then ``out_dir`` defaults to it and ``name`` to its folder name) or a
    ``RunWeights`` (e.g. ``RunWeights.from_modules(unet, text_encoder, tokens, vectors)``). The LoRA is in kohya
    format (see ``kohya_state_dict``); each embedding is ``{"emb_params": [n_vectors, D]}`` with the token in the
    metadata. A1111 and ComfyUI name an embedding after its file, so ``<v1>`` is typed ``v1`` (or
    ``embedding:v1`` in ComfyUI) there.
    """
    if isinstance(source, RunWeights):
        if out_dir is None:
            raise UserError("export_a1111 needs out_dir when given weights rather than a run folder")
        weights = source
        name = name or "magicstudio"
    else:
        weights = RunWeights.from_run(source)
        out_dir = out_dir if out_dir is not None else source
        name = name or Path(source).resolve().name
    if weights.lora is None and not weights.embeddings:
        raise UserError("nothing to export: no LoRA and no embeddings")
    folder = Path(out_dir) / A1111_DIR
    safe = embedding_name(name)

    lora_path = None
    if weights.lora is not None:
        tensors, metadata = kohya_state_dict(weights.lora, name=safe, family=family)
        lora_path = save_tensors(folder / f"{safe}_lora.safetensors", tensors, metadata)

    tokens = list(weights.embeddings)
    names = [embedding_name(t) for t in tokens]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise UserError(f"tokens {tokens} map to the same file name(s) {clashes}")
    emb_paths = []
    for token, ename in zip(tokens, names):
        vec = weights.embeddings[token].detach().float()
        vec = vec.reshape(-1, vec.shape[-1])
        meta = {"format": "pt", "token": token, "name": ename, "n_vectors": str(vec.shape[0]), "dim": str(vec.shape[1])}
        emb_paths.append(save_tensors(folder / f"{ename}.safetensors", {A1111_EMBEDDING_KEY: vec}, meta))
    return A1111Files(lora=lora_path, embeddings=emb_paths)


# ----------------------------------------------------------------------------------------------------------------
# The reverse, with plain diffusers
# ----------------------------------------------------------------------------------------------------------------


def load_run_into_pipeline(pipe, run_dir: str | os.PathLike, adapter_name: str | None = None) -> list[str]:
    """Load a run folder into a diffusers SD pipeline the way a user would; return the placeholder tokens.

    Just ``pipe.load_lora_weights(run_dir)`` and ``pipe.load_textual_inversion(file, token=...)`` per embedding
    file: nothing magicstudio-specific is needed to use a run. Each file is read by magicstudio first, so a damaged
    one is a one-line UserError naming it rather than diffusers' traceback.
    """
    run_dir = Path(run_dir)
    lora = run_dir / LORA_FILE
    files = sorted((run_dir / EMBEDDINGS_DIR).glob("*.safetensors"), key=_natural_key)
    if not lora.is_file() and not files:
        raise UserError(f"{run_dir} has neither {LORA_FILE} nor {EMBEDDINGS_DIR}/*.safetensors")
    redo = f"re-export it (delete {run_dir / 'DONE'} and resume the training) or train the run again"
    if lora.is_file():
        try:
            weights = read_lora(lora)
        except UserError as exc:
            raise UserError(f"{exc}: the file is damaged; {redo}") from None
        if "text_encoder" in weights.tensors:
            check_text_encoder_lora(str(lora))
        with _diffusers_loading(lora):
            pipe.load_lora_weights(str(run_dir), weight_name=LORA_FILE, adapter_name=adapter_name)
    tokens = []
    for path in files:
        try:
            keys = list(load_tensors(path))
        except UserError as exc:
            raise UserError(f"{exc}: the file is damaged; {redo}") from None
        if len(keys) != 1:
            raise UserError(f"{path} should hold exactly one token's embedding, found keys {keys[:5]}")
        with _diffusers_loading(path):
            pipe.load_textual_inversion(str(path), token=keys[0])
        tokens.append(keys[0])
    return tokens


@contextmanager
def _diffusers_loading(path: Path):
    """Around diffusers loading a file that reads fine: its log lines (a state-dict dump, "no LoRA keys for the text
    encoder") kept quiet, and its refusal (e.g. a file made for another base model) one line naming the file."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        yield
    except (ValueError, RuntimeError) as exc:
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise UserError(f"{path} cannot be loaded into this base model ({type(exc).__name__}: {detail})") from None
    finally:
        diffusers_logging.set_verbosity(level)
