"""Each MagiCapture mechanism moves the quantity it exists for (tiny model, fixed seeds)."""

from __future__ import annotations

import pytest
import torch

from magicstudio.training.concepts import load_concept
from magicstudio.methods.magicapture import make_config, run_training
from magicstudio.methods.magicapture.train import MagiCapture
from magicstudio.training.runs import RunDir
from magicstudio.models.face_encoder import load_face_encoder


def _late_mean(records, key, last=60):
    vals = [r[key] for r in records if r["phase"] == "lora" and key in r][-last:]
    assert len(vals) >= 20, f"too few records with {key}"
    return sum(vals) / len(vals)


@pytest.mark.slow
def test_attention_refocusing_lowers_attention_outside_the_mask(demo_sets, tmp_path):
    """With AR, <v1>'s scaled attention outside the face (what Eq. 8 penalises) drops by more than half
    relative to the same run without AR, and the raw share of its attention mass outside the face drops too."""
    common = dict(ti_steps=20, lora_steps=200, use_id=False, use_composed=False, checkpoint_every=0, sample_steps=2)
    runs = {}
    for name, ar in (("ar", True), ("no_ar", False)):
        cfg = make_config("smoke", use_ar=ar, **common)
        runs[name] = RunDir(run_training(demo_sets[0], demo_sets[1], tmp_path / name, cfg, progress=False).path).read_metrics()
    out_ar, out_no = _late_mean(runs["ar"], "attn_outside_v1"), _late_mean(runs["no_ar"], "attn_outside_v1")
    spill_ar, spill_no = _late_mean(runs["ar"], "attn_spill_v1"), _late_mean(runs["no_ar"], "attn_spill_v1")
    print(f"attn_outside_v1 AR {out_ar:.3f} vs no-AR {out_no:.3f}; attn_spill_v1 AR {spill_ar:.3f} vs {spill_no:.3f}")
    assert out_ar <= 0.5 * out_no
    assert spill_ar < spill_no
    # the style token is refocused too (onto the non-face region of the references)
    assert _late_mean(runs["ar"], "attn_outside_v2") < _late_mean(runs["no_ar"], "attn_outside_v2")


def test_identity_loss_falls_when_optimised(tiny, demo_sets):
    """Eq. 7's gradient reaches the LoRA through ArcFace, the differentiable alignment, the (region) VAE decode
    and Tweedie's formula: optimising it alone lowers it."""
    cfg = make_config("smoke", resolution=128, face_encoder="tiny", use_ar=False)
    m = MagiCapture(cfg, tiny, load_concept(demo_sets[0], 128), load_concept(demo_sets[1], 128),
                    load_face_encoder("tiny"))
    groups = m._setup_lora()
    opt = torch.optim.Adam(groups[0]["params"], lr=5e-3)
    ref = m.reference
    i = int(torch.nonzero(ref.has_face)[0])
    z0 = m._encode(ref.images[i:i + 1])
    t = torch.tensor([300])
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    z_t = m.comps.scheduler.add_noise(z0, noise, t)
    emb, pos = m._encode_prompt(m.composed_prompt())
    from magicstudio.losses import tweedie_x0

    losses = []
    for _ in range(25):
        opt.zero_grad()
        m.store.token_index = pos
        pred = m.comps.unet(z_t, t, emb.detach()).sample
        z0_hat = tweedie_x0(z_t, pred, m.alphas_cumprod, t)
        loss = m._identity(z0_hat, ref.landmarks[i:i + 1], ref.boxes[i:i + 1])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_region_decode_window_holds_the_aligned_crop_and_maps_landmarks(tiny, demo_sets):
    """The identity loss decodes only a latent window: it must contain every pixel the 112x112 ArcFace
    alignment reads, stay inside the latent, and shift the landmarks by exactly its pixel offset.
    (GroupNorm statistics then come from the window, so the decoded pixels approximate, not equal, a crop of
    the full decode; benchmarks/capture_speed.py reports the cost of both.)"""
    from magicstudio.models.face_align import alignment_matrix

    cfg = make_config("smoke", resolution=128, face_encoder="tiny")
    m = MagiCapture(cfg, tiny, load_concept(demo_sets[0], 128), load_concept(demo_sets[1], 128),
                    load_face_encoder("tiny"))
    src = m.source
    for k in range(len(src)):
        lm = src.landmarks[k]
        y0, y1, x0, x1 = m._face_region(src.boxes[k], lm)
        assert 0 <= x0 < x1 <= m.latent_size and 0 <= y0 < y1 <= m.latent_size
        mat = alignment_matrix(lm[None], 112)[0]
        grid = torch.stack(torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="xy"), -1).reshape(-1, 2)
        pts = (grid - mat[:, 2]) @ torch.linalg.inv(mat[:, :2]).T  # image pixels the crop samples
        inside = (pts[:, 0] >= 0) & (pts[:, 0] <= 127) & (pts[:, 1] >= 0) & (pts[:, 1] <= 127)
        p = pts[inside]
        assert (p[:, 0] >= x0 * 8 - 0.5).all() and (p[:, 0] <= x1 * 8 - 0.5).all()
        assert (p[:, 1] >= y0 * 8 - 0.5).all() and (p[:, 1] <= y1 * 8 - 0.5).all()
        bx0, by0, bx1, by1 = src.boxes[k].tolist()  # box-only fallback: a margin around the face box
        fy0, fy1, fx0, fx1 = m._face_region(src.boxes[k])
        assert fx0 * 8 <= max(bx0, 0) + 8 and fx1 * 8 >= min(bx1, 128) - 8
    with torch.no_grad():
        z = m._encode(src.images[:1])
        region, offset = m.decode_face(z, src.boxes[0], region=True, landmarks=src.landmarks[0])
    y0, y1, x0, x1 = m._face_region(src.boxes[0], src.landmarks[0])
    assert region.shape[-2:] == ((y1 - y0) * 8, (x1 - x0) * 8)
    assert offset.tolist() == [x0 * 8, y0 * 8]
