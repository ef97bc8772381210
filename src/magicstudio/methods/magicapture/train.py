"""MagiCapture training (arXiv 2309.06895), readable top to bottom.

Phase 1, textual inversion (Eq. 9): only the ``<v1>``/``<v2>`` embeddings train, on the source task (source
image, source prompt, face mask; Eq. 4) and the reference task (reference image, reference prompt, non-face
mask; Eq. 5).

Phase 2, LoRA + embeddings (Eq. 10): L_s + L_r + L_c + l_id * L_id + l_attn * L_attn, each micro-step drawing
one of three tasks in equal proportion; the composed task (Eq. 6) uses the reference image as pseudo-label
under a composed prompt with the non-face mask, plus the identity loss (Eq. 7) on the face of the Tweedie
estimate x0_hat; Attention Refocusing (Eq. 8) steers the special tokens' cross-attention in every task.

General objects (supplement): the source is reconstructed inside its mask, the reference without one, and the
composed task trains the DINO structure + style losses of Eq. 11 on the decoded x0_hat instead of the pseudo-label
reconstruction (structure from a source image, style from the reference image).
"""

from __future__ import annotations

import logging
import random

import torch
import torch.nn.functional as F

from ...attention.capture import AttentionStore, install_capture, select_layers, stack_token_maps
from ...losses import (attention_outside, attention_refocusing_loss, attention_spill, identity_loss,
                       masked_denoising_loss, patch_contrastive_loss, self_similarity_loss, style_cls_loss,
                       tweedie_x0)
from ...data.masks import downsample_mask
from ...io import atomic_write
from ...models.face_align import align_faces, alignment_matrix
from ...models.precision import conv_input, frozen_autocast, frozen_dtype, use_checkpointing
from ...models.tokens import token_vectors
from ...training.concepts import ConceptSet
from ...training.lora import add_lora, lora_config, lora_parameters
from ...training.personalize import ConceptSampler, add_concept_tokens, encode_prompt
from ...training.runs import RunDir
from ...training import prompts as P
from ...training.loop import Phase, StepOutput, Term
from . import config as C

log = logging.getLogger(__name__)

TASKS_TI = ("source", "reference")
TASKS_LORA = ("source", "reference", "composed")


class MagiCapture:
    def __init__(self, cfg: C.CaptureConfig, comps, source: ConceptSet, reference: ConceptSet, face_encoder=None,
                 device: torch.device | str = "cpu"):
        self.cfg, self.comps, self.device = cfg, comps, torch.device(device)
        self.source, self.reference = source, reference
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)  # unused for sampling; kept for template variety in validation
        # frozen base model, placeholder tokens with trainable rows (one place for all methods)
        self.token_ids, self.embedding = add_concept_tokens(comps, cfg, self.device)
        # attention capture on the chosen cross-attention layers (SDPA elsewhere)
        self.store = AttentionStore()
        self.ar_layers = select_layers(comps.unet, cfg.ar_layers)
        install_capture(comps.unet, self.store, self.ar_layers)
        if cfg.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
        if use_checkpointing(cfg.decode_checkpointing, comps.vae.decoder):
            comps.vae.enable_gradient_checkpointing()  # the loss paths' VAE decode: blocks recomputed in backward
        self.latent_size = cfg.resolution // comps.vae_scale
        self.alphas_cumprod = comps.scheduler.alphas_cumprod.to(self.device)
        # identity loss (Eq. 7): mean source identity embedding, computed once
        self.face_encoder = face_encoder
        self.source_identity = None
        if cfg.use_id and cfg.mode == "portrait":
            if face_encoder is None:
                log.warning("identity loss (Eq. 7) is OFF: no face-recognition weights were given (--face-encoder PATH)")
            else:
                self.source_identity = self._source_identity()
        # general objects: DINO structure/style losses on the composed task (supplement, Eq. 11)
        self.dino = None
        if cfg.mode == "object" and cfg.use_composed:
            if not cfg.dino_model:
                log.warning("object mode: the DINO structure/style losses (Eq. 11) are OFF: no DINO ViT was given "
                            "(--dino-model facebook/dino-vitb8 or a local folder); the composed task falls back to "
                            "the pseudo-label reconstruction")
            else:
                from ...models.dino import load_dino_features

                self.dino = load_dino_features(cfg.dino_model, self.device)
        self.data = ConceptSampler(comps, {"source": source, "reference": reference}, self.generator, self.device,
                                   cfg.hflip, cfg.color_jitter, cfg.cache_latents)

    # ------------------------------------------------------------------ setup
    def phases(self) -> list[Phase]:
        cfg = self.cfg
        return [
            Phase("textual_inversion", cfg.ti_steps, self._setup_ti, cfg.lr_schedule, cfg.ti_weight_decay,
                  cfg.grad_clip, cfg.lr_warmup_steps),
            Phase("lora", cfg.lora_steps, self._setup_lora, cfg.lr_schedule, cfg.weight_decay, cfg.grad_clip,
                  cfg.lr_warmup_steps),
        ]

    def _setup_ti(self) -> list[dict]:
        return [{"params": [self.embedding.rows], "lr": self.cfg.ti_lr}]

    def _setup_lora(self) -> list[dict]:
        cfg, unet, te = self.cfg, self.comps.unet, self.comps.text_encoder
        with torch.random.fork_rng(devices=[]):  # LoRA init must not depend on where a run was resumed
            torch.manual_seed(cfg.seed + 11)
            if not getattr(unet, "peft_config", None):
                add_lora(unet, lora_config(cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha))
            if cfg.text_lora and not getattr(te, "peft_config", None):
                add_lora(te, lora_config("text_attn", cfg.lora_rank, cfg.lora_alpha))
        unet.to(self.device), te.to(self.device)
        groups = [{"params": lora_parameters(unet), "lr": cfg.lora_lr},
                  {"params": [self.embedding.rows], "lr": cfg.emb_lr}]
        if cfg.text_lora:
            groups.append({"params": lora_parameters(te), "lr": cfg.text_lora_lr})
        return groups

    # ------------------------------------------------------------------ data
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.data.encode(images)

    def _draw(self, concept_name: str):
        """One augmented training example of ``concept_name``: latent, face mask, landmarks, box."""
        return self.data.draw(concept_name)

    def _prompt(self, task: str) -> str:
        cfg = self.cfg
        obj = cfg.mode == "object"
        templates = {
            "source": P.OBJECT_SOURCE_TEMPLATES if obj else P.SOURCE_TEMPLATES,
            "reference": P.OBJECT_REFERENCE_TEMPLATES if obj else P.REFERENCE_TEMPLATES,
            "composed": P.OBJECT_COMPOSED_TEMPLATES if obj else P.COMPOSED_TEMPLATES,
        }[task]
        k = int(torch.randint(len(templates), (1,), generator=self.generator))
        return templates[k].format(v1=cfg.v1, v2=cfg.v2, cls=cfg.object_class)

    def _encode_prompt(self, prompt: str):
        return encode_prompt(self.comps, prompt, self.token_ids, self.device)

    # ------------------------------------------------------------------ one micro-step
    def micro_step(self, phase: str, step: int) -> StepOutput:
        """One task drawn in equal proportion; the loss is ``sum(weight * value)`` over ``StepOutput.record``."""
        cfg = self.cfg
        tasks = TASKS_TI if phase == "textual_inversion" else (TASKS_LORA if cfg.use_composed else TASKS_TI)
        task = tasks[int(torch.randint(len(tasks), (1,), generator=self.generator))]
        concept = "source" if task == "source" else "reference"  # Eq. 6: the reference image is the pseudo-label
        z0, face, lm, box, index = self._draw(concept)
        size = self.latent_size
        face_lat = downsample_mask(face, size)  # nearest, as the authors do (METHODS.md)
        if task == "source":
            mask, mask_kind = face_lat, "face"  # Eq. 4: face region of the source
        elif cfg.mode == "object" and task == "reference":
            mask, mask_kind = torch.ones_like(face_lat), "none"  # supplement: reference reconstructed without a mask
        else:
            mask, mask_kind = 1 - face_lat, "non-face"  # Eqs. 5, 6: non-face region of the reference
        t_max = cfg.ti_t_max if phase == "textual_inversion" else cfg.lora_t_max
        use_id = (task == "composed" and self.source_identity is not None and bool(torch.isfinite(box).all()))
        use_structure = task == "composed" and self.dino is not None and phase == "lora"
        if use_structure or (use_id and cfg.id_pass == "shared"):
            t_max = min(t_max, cfg.t_id_max)  # one pass serves L_c and L_id: t ~ U[0, T')
        noise = torch.randn(z0.shape, generator=self.generator).to(z0)
        t = torch.randint(0, t_max, (z0.shape[0],), generator=self.generator).to(self.device)
        z_t = self.comps.scheduler.add_noise(z0, noise, t.cpu()).to(z0)
        prompt = self._prompt(task)
        emb, positions = self._encode_prompt(prompt)
        tokens = tuple(tok for k, tok in enumerate(cfg.tokens()) if int(positions[0, k]) >= 0)
        self.store.reset()
        self.store.token_index = positions
        pred = self.comps.unet(z_t, t, emb).sample
        target = noise if self.comps.prediction_type == "epsilon" else self.comps.scheduler.get_velocity(z0, noise, t.cpu())
        # authors (official preset): reference and composed losses count double in the first half of phase 2
        early = phase == "lora" and step - cfg.ti_steps < cfg.lora_steps // 2 and task != "source"
        w_task = cfg.early_ref_comp_weight if early else 1.0
        where = dict(concept=concept, index=index, tokens=tokens, prompt=prompt, t=t, t_range=(0, t_max))
        record: dict[str, Term] = {}
        terms: dict[str, float] = {}
        if use_structure:  # Eq. 11 replaces the pseudo-label reconstruction for general objects
            record.update(self._structure_style(z_t, pred, t, index, w_task, where))
        else:
            rec = masked_denoising_loss(pred, target, mask, cfg.mask_mode)
            record[task] = Term(rec, w_task, mask=mask, mask_kind=mask_kind, **where)

        # Attention Refocusing (Eq. 8): which token is held to which mask in this task
        maps = stack_token_maps(self.store, size)  # (L, B, heads, S, S, K)
        targets = {"source": [(0, face_lat, "face")], "reference": [(1, 1 - face_lat, "non-face")],
                   "composed": [(0, face_lat, "face"), (1, 1 - face_lat, "non-face")]}[task]
        if cfg.mode == "object":
            # the style token has no spatial target for objects, nor the object token on a reference image
            targets = [] if task == "composed" else [(k, m, kind) for k, m, kind in targets if k == 0]
        ar_terms = []
        for k, m, kind in targets:
            if int(positions[0, k]) < 0 or m.sum() == 0 or (1 - m).sum() == 0:
                continue  # token absent, or an empty/full mask (a faceless reference): nothing to measure
            token_maps = maps[..., k]
            name = ("v1", "v2")[k]
            terms[f"attn_spill_{name}"] = attention_spill(token_maps.detach(), m).mean().item()
            terms[f"attn_outside_{name}"] = attention_outside(token_maps.detach(), m).mean().item()
            if phase == "lora" and cfg.use_ar:
                ar_terms.append((f"attn_{name}", attention_refocusing_loss(token_maps, m), m, kind, cfg.tokens()[k]))
        for name, value, m, kind, tok in ar_terms:  # L_attn = the mean over the tokens of this task
            record[name] = Term(value, cfg.lambda_attn / len(ar_terms), mask=m, mask_kind=kind, tokens=(tok,),
                                **{k: v for k, v in where.items() if k != "tokens"})
        if ar_terms:
            terms["loss_attn"] = torch.stack([v for _, v, *_ in ar_terms]).mean().item()

        # Identity loss (Eq. 7) on the composed task
        if use_id and phase == "lora":
            if cfg.id_pass == "separate":
                t_id = torch.randint(0, cfg.t_id_max, (1,), generator=self.generator).to(self.device)
                n2 = torch.randn(z0.shape, generator=self.generator).to(z0)
                z_id = self.comps.scheduler.add_noise(z0, n2, t_id.cpu()).to(z0)
                self.store.active = False
                out_id = self.comps.unet(z_id, t_id, emb).sample
                self.store.active = True
            else:
                z_id, t_id, out_id = z_t, t, pred
            z0_hat = tweedie_x0(z_id, out_id, self.alphas_cumprod, t_id, self.comps.prediction_type)
            l_id = self._identity(z0_hat, lm, box)
            if l_id is not None:  # the target is the source identity; the crop comes from the pseudo-label's face
                record["id"] = Term(l_id, cfg.lambda_id, concept="source", index=index, tokens=tokens, prompt=prompt,
                                    t=t_id, t_range=(0, cfg.t_id_max))
        loss = sum(term.weight * term.value for term in record.values())
        for name, term in record.items():
            terms[{"attn_v1": "loss_attn_v1", "attn_v2": "loss_attn_v2"}.get(name, f"loss_{name}")] = term.value.item()
        terms["loss"] = loss.item()
        return StepOutput(loss, terms, task, record)

    @torch.no_grad()
    def after_optimizer_step(self, phase: str, lr: float) -> None:
        """Authors' ``--clip_ti_decay`` (official preset): in phase 1 each new embedding's norm moves toward
        ``ti_norm_target`` by ``min(1, 100 lr)`` of the gap, its direction kept."""
        target = self.cfg.ti_norm_target
        if phase != "textual_inversion" or target is None:
            return
        rows = self.embedding.rows
        norm = rows.norm(dim=-1, keepdim=True)
        lam = min(1.0, 100 * lr)
        rows.copy_(F.normalize(rows, dim=-1) * (norm + lam * (target - norm)))

    # ------------------------------------------------------------------ general objects (Eq. 11)
    def _structure_style(self, z_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, ref_index: int,
                         w_task: float, where: dict) -> dict[str, Term]:
        """lambda_ssim L_ssim + lambda_contra L_contra + lambda_style L_style on the decoded Tweedie estimate:
        structure (DINO keys) against a random source image, style (DINO [CLS]) against the drawn reference.
        Returns the three terms (each weight times ``w_task``)."""
        cfg = self.cfg
        z0_hat = tweedie_x0(z_t, pred, self.alphas_cumprod, t, self.comps.prediction_type)
        image = self._decode(z0_hat)
        k = int(torch.randint(len(self.source), (1,), generator=self.generator))
        with torch.no_grad():
            _, keys_src = self.dino(self.source.images[k:k + 1].to(self.device))
            cls_ref, _ = self.dino(self.reference.images[ref_index:ref_index + 1].to(self.device))
        cls_gen, keys_gen = self.dino(image)
        l_ssim = self_similarity_loss(keys_gen, keys_src)
        l_contra = patch_contrastive_loss(keys_gen, keys_src, generator=self.generator)
        l_style = style_cls_loss(cls_gen, cls_ref)
        structure = {**where, "concept": "source", "index": k}
        return {"ssim": Term(l_ssim, w_task * cfg.lambda_ssim, mask_kind="none", **structure),
                "contra": Term(l_contra, w_task * cfg.lambda_contra, mask_kind="none", **structure),
                "style": Term(l_style, w_task * cfg.lambda_style, mask_kind="none", **where)}

    # ------------------------------------------------------------------ identity
    def _face_region(self, box: torch.Tensor, landmarks: torch.Tensor | None = None) -> tuple[int, int, int, int]:
        """Latent window (y0, y1, x0, x1) to decode for the identity loss, clamped to the latent.

        With landmarks: the bounding box of where the aligned ArcFace crop falls in the image (the inverse of
        the alignment warp applied to the crop's corners) plus one latent pixel, so exactly what B(x) reads is
        decoded. Without: a square of 1.6x the face box's larger side around its centre.
        """
        scale, size = self.comps.vae_scale, self.latent_size
        if landmarks is not None and bool(torch.isfinite(landmarks).all()):
            n = self.face_encoder.input_size if self.face_encoder is not None else 112
            m = alignment_matrix(landmarks.reshape(1, 5, 2).float(), n)[0]  # image px -> crop px
            a, b = m[:, :2], m[:, 2]
            corners = torch.tensor([[-0.5, -0.5], [n - 0.5, -0.5], [-0.5, n - 0.5], [n - 0.5, n - 0.5]])
            pts = (corners - b) @ torch.linalg.inv(a).T  # crop corners in image pixels
            lo, hi = (pts.amin(0) + 0.5) / scale - 1, (pts.amax(0) + 0.5) / scale + 1
            x0, y0 = (int(max(0, min(size - 4, torch.floor(v)))) for v in lo)
            x1, y1 = (int(min(size, max(x0 + 4, torch.ceil(v)))) for v in hi)
            y1 = max(y1, y0 + 4)
            return y0, min(size, y1), x0, x1
        x0, y0, x1, y1 = box.tolist()
        side = max(x1 - x0, y1 - y0) * 1.6 / scale
        side = int(min(size, max(4, round(side))))
        cx, cy = (x0 + x1) / 2 / scale, (y0 + y1) / 2 / scale
        lx = int(min(max(0, round(cx - side / 2)), size - side))
        ly = int(min(max(0, round(cy - side / 2)), size - side))
        return ly, ly + side, lx, lx + side

    def decode_face(self, z0_hat: torch.Tensor, box: torch.Tensor, region: bool = True,
                    landmarks: torch.Tensor | None = None):
        """Decode the face of ``z0_hat`` (only the latent window around it when ``region``); returns the image
        and the pixel offset of its top-left corner."""
        scale = self.comps.vae_scale
        if region:
            y0, y1, x0, x1 = self._face_region(box, landmarks)
            z = z0_hat[:, :, y0:y1, x0:x1]
            offset = torch.tensor([x0 * scale, y0 * scale], dtype=torch.float32)
        else:
            z, offset = z0_hat, torch.zeros(2)
        return self._decode(z), offset

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """VAE decode of a latent (window) for a loss, differentiable; float32 out. The frozen decoder may run in
        bfloat16 (``decode_precision``, models/precision.py); everything trained, the face encoder and DINO stay
        in float32."""
        vae = self.comps.vae
        dtype = frozen_dtype(self.cfg.decode_precision, self.device, vae.decoder)
        with frozen_autocast(dtype, self.device):
            image = vae.decode(conv_input((z / vae.config.scaling_factor).to(vae.dtype), dtype)).sample
        return image.float().contiguous()

    def _identity(self, z0_hat: torch.Tensor, lm: torch.Tensor, box: torch.Tensor):
        landmarks_hint = None if self.cfg.id_landmarks == "detect" else lm[0]
        image, offset = self.decode_face(z0_hat, box[0], self.cfg.id_region_decode, landmarks_hint)
        landmarks = (lm - offset).to(self.device)
        if self.cfg.id_landmarks == "detect":
            landmarks = self._detect_landmarks(image)
            if landmarks is None:
                return None  # authors: skip the loss when no face is found
        aligned = align_faces(image.clamp(-1, 1), landmarks, self.face_encoder.input_size)
        return identity_loss(self.face_encoder.embed(aligned), self.source_identity)

    def _detect_landmarks(self, image: torch.Tensor):
        from ...data.faces import MediapipeFaceAnalyzer

        if not hasattr(self, "_analyzer"):
            self._analyzer = MediapipeFaceAnalyzer()
        arr = ((image[0].detach().clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).cpu().numpy()
        face = self._analyzer.main_face(arr)
        if face is None:
            return None
        return torch.tensor(face.landmarks5, dtype=torch.float32, device=self.device)[None]

    def _source_identity(self) -> torch.Tensor:
        src = self.source
        keep = src.has_face & torch.isfinite(src.landmarks).all(-1).all(-1)
        if not bool(keep.any()):
            from ...errors import UserError

            raise UserError("the identity loss needs faces in the source images, and none has landmarks")
        with torch.no_grad():
            aligned = align_faces(src.images[keep].to(self.device), src.landmarks[keep].to(self.device),
                                  self.face_encoder.input_size)
            emb = self.face_encoder.embed(aligned).mean(0)
        return F.normalize(emb, dim=0)

    # ------------------------------------------------------------------ state, samples, outputs
    def trainable_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        state = {"embedding.rows": self.embedding.rows.detach().clone()}
        if getattr(self.comps.unet, "peft_config", None):
            state.update({f"unet.{k}": v for k, v in get_peft_model_state_dict(self.comps.unet).items()})
        if self.cfg.text_lora and getattr(self.comps.text_encoder, "peft_config", None):
            state.update({f"text.{k}": v for k, v in get_peft_model_state_dict(self.comps.text_encoder).items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        with torch.no_grad():
            self.embedding.rows.copy_(state["embedding.rows"])
        for prefix, module in (("unet.", self.comps.unet), ("text.", self.comps.text_encoder)):
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if sub and getattr(module, "peft_config", None):
                set_peft_model_state_dict(module, sub)

    def composed_prompt(self) -> str:
        return P.composed_prompt(self.cfg.v1, self.cfg.v2, self.cfg.mode, self.cfg.object_class)

    @torch.no_grad()
    def sample(self, run: RunDir, step: int, n: int = 2):
        """``RUN/samples/step-N.png``: a row of ``n`` images per sample prompt (default: the composed prompt)."""
        from ...training.sampling import sample_grid

        self.store.active = False
        try:
            grid = sample_grid(self.comps.pipeline(), list(self.cfg.sample_prompts) or [self.composed_prompt()], n,
                               self.cfg.sample_steps, self.cfg.resolution, self.cfg.seed)
        finally:
            self.store.active = True
        atomic_write(run.samples / f"step-{step:06d}.png", lambda p: grid.save(p, format="PNG"))
        return grid

    def finalize(self, run: RunDir) -> None:
        from ...training.export import export_a1111, save_embeddings, save_lora

        self.sample(run, self.cfg.total_steps)
        vectors = token_vectors(self.comps.text_encoder, self.token_ids)
        save_embeddings(run.path, self.cfg.tokens(), vectors)
        if getattr(self.comps.unet, "peft_config", None):
            save_lora(run.path, self.comps.unet, self.comps.text_encoder if self.cfg.text_lora else None)
        export_a1111(run.path)
