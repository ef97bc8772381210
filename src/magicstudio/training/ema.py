"""An exponential moving average of a few trainable tensors (an adapter), evaluated on the same model.

MagicTailor's momentum U-Net (DS-Bal) is an EMA of the adapted U-Net; only the adapter differs between the two
branches, so the EMA of the adapter alone, swapped into the one frozen base model for a no-grad pass, gives the
same outputs as the authors' deep copy of the whole U-Net (``torch.optim.swa_utils.AveragedModel``) at a small
fraction of the memory. The update is AveragedModel's: the first is a copy, then
``ema <- decay * ema + (1 - decay) * online``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class AdapterEMA:
    """EMA of ``params`` ({name: parameter}); ``update()`` after every optimizer step, ``swapped()`` for a pass
    with the averaged weights."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float = 0.99):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), not {decay}")
        self.params, self.decay = dict(params), float(decay)
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            if self.updates == 0:
                self.shadow[name] = p.detach().clone()
            else:
                self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)
        self.updates += 1

    @contextmanager
    def swapped(self):
        """The averaged weights in the parameters for the block, the online ones back after it (bit-identical).

        Use it before the online forward of a step (or after its backward): the copies bump the parameters'
        version counters, so autograd refuses a graph that saw the other weights rather than use them silently."""
        if not self.updates:
            raise RuntimeError("the EMA has no value before its first update")
        with torch.no_grad():
            online = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(online[n])

    def state_dict(self, prefix: str = "ema.") -> dict[str, torch.Tensor]:
        out = {f"{prefix}{n}": t.clone() for n, t in self.shadow.items()}
        out[f"{prefix}__updates__"] = torch.tensor(self.updates, dtype=torch.long)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "ema.") -> None:
        key = f"{prefix}__updates__"
        self.updates = int(state[key]) if key in state else 0
        self.shadow = {n: state[f"{prefix}{n}"].clone().to(p) for n, p in self.params.items()
                       if f"{prefix}{n}" in state} if self.updates else {}
