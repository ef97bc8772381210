"""MagicFace attention (Wang et al., "MagicFace: Training-free Universal-Style Human Image Customized Synthesis",
arXiv:2408.07433): Reference-aware Self-Attention (RSA, the coarse semantic layout) and Region-grouped Blend
Attention (RBA, the fine concept features) as diffusers attention processors.

The UNet sees one batch per step: ``[uncond target, cond target, ref_1 .. ref_R]`` (no uncond row without
guidance). Every row first gets plain attention from the very call diffusers' ``AttnProcessor2_0`` makes
(``scaled_dot_product_attention``); then, in the replaced self-attention layers, the conditional target row is
rewritten:

- RSA: each target query attends over its own keys and every reference's keys. A reference logit gets ``+ w``
  inside that reference's mask and is excluded (``-inf``) outside it (the paper's weighted mask, w = 3).
- RBA: a target pixel that the attention-based segmentation assigns to concept ``i`` attends over its own keys
  and reference ``i``'s keys (same weighted mask); unassigned pixels keep plain self-attention.

The joint softmax over ``[own keys, ref_1 keys, ...]`` is one fused ``scaled_dot_product_attention`` call with
the weighted masks as an additive attention mask (no explicit N x N logits, ~10x faster than materialising them
at 64x64 latents). A reference whose mask is empty at a layer's resolution is left out there, so with every
reference masked out the layer is exactly plain self-attention, and unassigned RBA pixels keep the plain SDPA
output bit for bit.

The same processor records, through the project's ``AttentionStore``, the head-averaged plain self- and
cross-attention probabilities of the conditional target on small layers: the input of the segmentation
(``magicstudio.attention.segmentation``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .capture import AttentionStore, CaptureProcessor, select_layers
from .projection import Projected, finish, project


def reference_bias(mask: torch.Tensor, weight: float) -> torch.Tensor:
    """Logit offsets of one reference's keys from its (flattened) {0,1} mask: ``+weight`` inside, ``-inf`` outside."""
    inside = mask.flatten() > 0.5
    return torch.where(inside, torch.tensor(float(weight)), torch.tensor(float("-inf")))


def attend_with_references(q: torch.Tensor, k_own: torch.Tensor, v_own: torch.Tensor,
                           refs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                           with_mass: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Queries ``q`` attending over their own keys and the references' keys in one softmax (RSA / RBA).

    ``q``, ``k_own``, ``v_own``: (heads, N, d); ``refs``: ``(k_i, v_i, bias_i)`` with ``bias_i`` (N_i,) from
    ``reference_bias``, added to reference ``i``'s logits. One fused SDPA call over the concatenated keys with the
    biases as an additive mask. Returns the output (heads, Nq, d) and, with ``with_mass``, each query's attention
    mass on each reference's keys averaged over heads, (Nq, R).
    """
    keys = torch.cat([k_own] + [k for k, _, _ in refs], dim=1)
    values = torch.cat([v_own] + [v for _, v, _ in refs], dim=1)
    bias = torch.cat([q.new_zeros(k_own.shape[1])] + [b.to(q.dtype) for _, _, b in refs])
    out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=bias.view(1, 1, 1, -1))[0]
    if not with_mass:
        return out, None
    source = torch.zeros(keys.shape[1], len(refs), dtype=q.dtype, device=q.device)
    first = k_own.shape[1]
    for i, (k, _, _) in enumerate(refs):
        source[first:first + k.shape[1], i] = 1
        first += k.shape[1]
    indicator = source.expand(q.shape[0], -1, -1)
    mass = F.scaled_dot_product_attention(q[None], keys[None], indicator[None], attn_mask=bias.view(1, 1, 1, -1))[0]
    return out, mass.mean(0).float()


@dataclass
class MagicFaceState:
    """What the processors of one UNet share: the phase, the batch layout, the references and the segmentation.

    ``ref_masks``: (R, H, W) {0,1} reference masks (any resolution; resized to each layer with nearest, as the
    authors do). ``assignment``: (S, S) long, concept index per target pixel or -1 (RBA routing), or None.
    With ``record_mass``, ``mass[layer]`` holds the target's attention mass on each reference, (N, R).
    ``ran``: (layer, "rsa" | "rba", target pixels rewritten) for every injection since it was last cleared (the
    sampler's per-step record of what ran).
    """

    ref_masks: torch.Tensor
    weights: list[float]
    mode: str = "off"  # "rsa" | "rba" | "off"
    target: int = 1
    first_ref: int = 2
    assignment: torch.Tensor | None = None
    record_mass: bool = False
    mass: dict[str, torch.Tensor] = field(default_factory=dict)
    ran: list[tuple[str, str, int]] = field(default_factory=list)
    _bias: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def n_refs(self) -> int:
        return self.ref_masks.shape[0]

    def set_masks(self, ref_masks: torch.Tensor) -> None:
        self.ref_masks, self._bias = ref_masks, {}

    def biases(self, side: int, device) -> list[torch.Tensor | None]:
        """Per reference, its keys' logit offsets at a ``side`` x ``side`` layer, None where its mask is empty there
        (cached)."""
        if side not in self._bias:
            small = F.interpolate(self.ref_masks[:, None].float(), size=(side, side), mode="nearest")[:, 0]
            self._bias[side] = [reference_bias(m, w).to(device) if m.any() else None
                                for m, w in zip(small, self.weights)]
        return self._bias[side]

    def routing(self, side: int) -> torch.Tensor | None:
        """The segmentation resized (nearest) to a ``side`` x ``side`` layer, flattened: concept index or -1."""
        if self.assignment is None:
            return None
        a = self.assignment[None, None].float()
        return F.interpolate(a, size=(side, side), mode="nearest").flatten().long()


class MagicFaceProcessor(CaptureProcessor):
    """Plain SDPA attention for every row; RSA/RBA for the conditional target on replaced layers; map capture.

    Shares ``CaptureProcessor``'s store protocol: when ``store.active`` and the layer has at most
    ``store.full_max_tokens`` queries, the head-averaged plain attention probabilities of the conditional target
    are recorded with ``store.record`` (self- and cross-attention alike).
    """

    def __init__(self, state: MagicFaceState, store: AttentionStore, name: str, replace: bool):
        super().__init__(store, name)
        self.state = state
        self.replace = replace

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        p = project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        out = F.scaled_dot_product_attention(p.query, p.key, p.value, attn_mask=p.mask, dropout_p=0.0, is_causal=False)
        st, t = self.state, self.state.target
        batch, _, nq, _ = p.query.shape
        if t >= batch:
            return finish(attn, out, p)
        if self.store.active and nq <= self.store.full_max_tokens:
            logits = torch.matmul(p.query[t].float(), p.key[t].float().transpose(-1, -2)) * attn.scale
            if p.mask is not None:
                logits = logits + p.mask[t].float()
            self.store.record(self.name, logits.softmax(dim=-1), 1, p.is_cross)
        if self.replace and not p.is_cross and st.mode in ("rsa", "rba") and st.n_refs:
            self._inject(attn, p, out, nq)
        return finish(attn, out, p)

    def _inject(self, attn, p: Projected, out: torch.Tensor, nq: int) -> None:
        """Rewrite the conditional target row of ``out`` in place (RSA: all pixels; RBA: assigned pixels)."""
        st, t = self.state, self.state.target
        side = math.isqrt(nq)
        if side * side != nq or p.mask is not None:
            raise ValueError(f"MagicFace needs square latents and unmasked self-attention ({self.name})")
        biases = st.biases(side, out.device)
        visible = [i for i in range(st.n_refs) if biases[i] is not None]  # masks not empty at this resolution
        refs = {i: (p.key[st.first_ref + i], p.value[st.first_ref + i], biases[i]) for i in visible}
        q, k, v, keep = p.query[t], p.key[t], p.value[t], st.record_mass
        mass = torch.zeros(nq, st.n_refs)
        if st.mode == "rsa" and visible:
            out[t], m = attend_with_references(q, k, v, [refs[i] for i in visible], keep)
            st.ran.append((self.name, "rsa", nq))
            if keep:
                mass[:, visible] = m.cpu()
        elif st.mode == "rba" and st.assignment is not None:
            route = st.routing(side).to(out.device)
            routed = 0
            for i in visible:
                rows = torch.nonzero(route == i).flatten()
                if rows.numel():
                    out[t, :, rows], m = attend_with_references(q[:, rows], k, v, [refs[i]], keep)
                    routed += rows.numel()
                    if keep:
                        mass[rows.cpu(), i] = m[:, 0].cpu()
            st.ran.append((self.name, "rba", routed))
        if st.record_mass:
            st.mass[self.name] = mass.detach().cpu()


def replaced_layers(unet, which: str | list[str] = "up:1+2") -> list[str]:
    """Self-attention layers that RSA/RBA replace.

    ``"up:<factors>"``: the up blocks at those downsampling factors (default ``"up:1+2"``: the two highest
    resolutions, 64x64 and 32x32 at 512 px, as in the paper); anything else goes to ``select_layers`` (``"all"``,
    ``"res:1+2"`` for down and up blocks, or a list of names/regexes).
    """
    from ..errors import UserError

    if isinstance(which, str) and which.startswith("up:"):
        parts = which[3:].split("+")
        if not all(p.strip().isdigit() for p in parts):
            raise UserError(f"bad --layers {which!r}: expected up:<factors>, e.g. up:1+2")
        try:
            picked = [n for n in select_layers(unet, "res:" + which[3:], "attn1") if n.startswith("up_blocks.")]
        except UserError:
            picked = []
        if not picked:
            raise UserError(f"--layers {which!r} selects no attention layer of this model (try up:1+2)")
        return picked
    try:
        return select_layers(unet, which, "attn1")
    except UserError as exc:
        raise UserError(f"--layers: {exc}") from None


def install_magicface(unet, state: MagicFaceState, store: AttentionStore, replaced: list[str]) -> dict:
    """Put a ``MagicFaceProcessor`` on every attention layer (``replace`` on ``replaced``); returns the previous
    processors for ``capture.restore_processors``."""
    previous = dict(unet.attn_processors)
    wanted = set(replaced)
    procs = {}
    for key in previous:
        module = key[: -len(".processor")]
        procs[key] = MagicFaceProcessor(state, store, module, module in wanted)
    unet.set_attn_processor(procs)
    return previous
