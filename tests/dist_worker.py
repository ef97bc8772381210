"""Runs a magicstudio training under ``accelerate launch`` and saves what each rank ends with (for test_distributed).

    accelerate launch ... tests/dist_worker.py DUMP cli <magicstudio arguments>
    accelerate launch ... tests/dist_worker.py DUMP api <method> <source> <reference> <out> '<json overrides>'

``cli`` runs the real command line (``magicstudio.cli.main``), ``api`` a registry entry (``methods.METHODS``) with
the smoke preset. Either way, after training every rank writes ``DUMP/rank<r>.safetensors``: its trainable state,
the frozen token-embedding table and its data generator's state.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def dump_after_training(dump: Path, emulate_ranks: int = 1):
    """Wrap ``magicstudio.training.loop.train`` so each process saves its trainable state after training.
    ``emulate_ranks`` > 1 (one process): each micro-step draws its data as rank ``k % n`` would (see
    ``distributed.rank_seed``), so with gradient accumulation n one process replays one step of n ranks."""
    from safetensors.torch import save_file

    from magicstudio.training import loop as training
    from magicstudio.training.distributed import rank_seed

    original = training.train

    def train(method, run, **kwargs):
        from accelerate import PartialState

        if emulate_ranks > 1:
            _emulate(method, emulate_ranks, rank_seed)
        n = original(method, run, **kwargs)
        state = {k: v.detach().float().cpu().contiguous() for k, v in method.trainable_state().items()}
        state["frozen_table"] = method.comps.text_encoder.get_input_embeddings().weight.detach().float().cpu().clone()
        state["generator"] = method.generator.get_state().clone()
        dump.mkdir(parents=True, exist_ok=True)
        save_file(state, str(dump / f"rank{PartialState().process_index}.safetensors"))
        return n

    training.train = train
    return original


def _emulate(method, n: int, rank_seed) -> None:
    seed = method.generator.initial_seed()
    states = [method.generator.get_state()] + [torch.Generator().manual_seed(rank_seed(seed, r)).get_state()
                                               for r in range(1, n)]
    step = method.micro_step
    count = [0]

    def micro_step(phase, i):
        r = count[0] % n
        method.generator.set_state(states[r])
        out = step(phase, i)
        states[r] = method.generator.get_state()
        count[0] += 1
        return out

    method.micro_step = micro_step


def main(argv: list[str]) -> int:
    dump, kind, rest = Path(argv[0]), argv[1], argv[2:]
    dump_after_training(dump)
    if kind == "cli":
        from magicstudio.cli.main import main as cli

        return cli(rest)
    from magicstudio.methods import METHODS

    method, source, reference, out, overrides = rest
    METHODS[method].train(source, reference, out, "smoke", 0, **json.loads(overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
