"""Data-parallel training across processes (``accelerate launch --num_processes N``), for every method.

The methods call their frozen models directly (``comps.unet(...)``, the text encoder, the placeholder
embedding), so the trainable modules are not wrapped in DistributedDataParallel. Instead the training loop
averages exactly the tensors the optimizer holds, after the last micro-step of each optimizer step:

- ``sync_gradients``: all-reduce (sum, then / N) of the gradients of the optimizer's parameters: the PEFT
  LoRA matrices, the ``PlaceholderEmbedding.rows`` (the frozen embedding table has no gradient and is never
  touched), the Custom Diffusion K/V weights or DreamBooth's full models. N processes with G accumulation
  micro-steps each equal one process with N*G micro-steps: every rank divides its loss by G, the mean over ranks
  divides by N. A parameter that got no gradient on any rank keeps ``grad=None`` (as in one process).
- ``broadcast_parameters``: rank 0's trainable values to every rank when a phase starts (as DDP does), so the
  ranks stay identical even if an initialisation ever depended on the process.
- ``rank_seed``: each rank's data generator. Rank 0 keeps the run's seed (one process is bit-identical to
  before); rank r > 0 uses the first 8 bytes of sha256("<seed>:<r>") (63 bits), so ranks draw different examples,
  timesteps and noise, and rank 1 of seed 0 is unrelated to rank 0 of seed 1.
- ``gather_rng``: every rank's RNG states for a checkpoint (written by the main process only), so a resumed
  multi-process run continues each rank's stream; resuming needs the same number of processes.
- ``open_run_everywhere``: the main process checks and creates the run folder, prepares the photos and loads
  the base model first; the other processes then load the same model and receive the photo sets from it, and
  never write into the run folder.
"""

from __future__ import annotations

import hashlib

import torch

from ..errors import UserError

BUCKET = 1 << 23  # elements per all-reduce (32 MB of float32): few calls for LoRA, bounded memory for DreamBooth


def rank_seed(seed: int, rank: int) -> int:
    """The data generator's seed on process ``rank`` (see the module docstring)."""
    if rank == 0:
        return int(seed)
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{rank}".encode()).digest()[:8], "little") >> 1


def _dist():
    import torch.distributed as dist

    return dist


def broadcast_parameters(params: list[torch.Tensor]) -> None:
    dist = _dist()
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def _buckets(params: list[torch.Tensor]):
    bucket, size = [], 0
    for p in params:
        if bucket and (size + p.numel() > BUCKET or p.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket


def sync_gradients(params: list[torch.Tensor], world: int, device: torch.device, failure: str | None = None) -> None:
    """Average the gradients of ``params`` over the ``world`` processes (in place). ``failure``: this rank's
    reason to stop (a non-finite loss); if any rank has one, every rank raises ``TrainingDiverged`` with it."""
    from .loop import TrainingDiverged

    dist = _dist()
    flags = torch.tensor([float(p.grad is not None) for p in params] + [float(failure is not None)], device=device)
    dist.all_reduce(flags)
    if flags[-1] > 0:
        reasons: list = [None] * world
        dist.all_gather_object(reasons, failure)
        raise TrainingDiverged(next(r for r in reasons if r is not None))
    live = [p for p, f in zip(params, flags[:-1].tolist()) if f > 0]
    for bucket in _buckets(live):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in bucket:
            chunk = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)


def gather_rng(generator: torch.Generator, world: int) -> list[dict]:
    """Every rank's (torch, method generator) RNG states, in rank order (a collective: all ranks call it)."""
    states: list = [None] * world
    _dist().all_gather_object(states, {"torch": torch.get_rng_state(), "method": generator.get_state()})
    return states


def check_resume(saved: dict, world: int) -> None:
    had = int(saved["rng"].get("processes", 1))
    if had != world:
        raise UserError(f"this run was checkpointed by {had} process(es) and is resumed by {world}; resume it with "
                        f"the same number (accelerate launch --num_processes {had}), or start a new run")


def rank_rng(saved: dict, rank: int) -> dict:
    """This rank's RNG states in a checkpoint (rank 0's are the checkpoint's usual ``torch`` / ``method``)."""
    rng = saved["rng"]
    return rng if rank == 0 else rng["ranks"][rank - 1]


def open_run_everywhere(open_run, source, reference, out, cfg, resume: bool = False, progress: bool = True):
    """``open_run`` on the main process; on the others the same result without touching the run folder."""
    state = process_state()
    if state.num_processes == 1:
        return open_run(source, reference, out, cfg, resume, progress)
    from accelerate.utils import broadcast_object_list

    if state.is_main_process:
        message, opened = None, None
        try:
            opened = open_run(source, reference, out, cfg, resume, progress)
        except BaseException as exc:
            message = str(exc) or type(exc).__name__
            raise
        finally:
            shared = None if opened is None else (opened[1], opened[3], opened[4])
            broadcast_object_list([message, opened is None, shared])
        return opened
    got = broadcast_object_list([None, None, None])
    message, finished, shared = got
    if message is not None:
        raise UserError(f"process {state.process_index}: the main process stopped: {message}")
    if finished:
        return None
    from ..models.base import load_base
    from .runs import RunDir

    cfg, source_set, reference_set = shared
    return RunDir(out), cfg, load_base(cfg.model), source_set, reference_set


def process_state():
    """accelerate's ``PartialState`` of this process. Without a GPU it is made with ``cpu=True``: then under a
    launcher that starts N processes (``accelerate launch --multi_gpu``, i.e. torchrun) they train together over
    gloo; without it accelerate would treat each of them as a separate single-process run."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return process_state().is_main_process
