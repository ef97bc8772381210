"""The training loop every method shares: phases, accumulation, checkpoints, resume, logging.

A method gives a list of ``Phase`` objects and implements ``TrainableMethod``; ``train`` runs the phases in
order under accelerate (device placement, mixed precision, multi-GPU launch), writes one ``metrics.jsonl``
record per optimizer step, checkpoints atomically every N steps (keeping the last K), resumes from the latest
checkpoint with the saved optimizer and RNG state, and stops on a non-finite loss keeping the last good
checkpoint. Ctrl-C writes a checkpoint of the last finished step (``TrainingInterrupted`` names it; feedback.py).
Every core trains by default; with ``deterministic`` the same seed on CPU gives identical weights,
with or without an interruption in between.
Under ``accelerate launch --num_processes N`` each rank draws its own data and the trainable gradients are
averaged before every optimizer step (``distributed.py``); only the main process writes the run folder.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ..errors import UserError
from .config import LR_SCHEDULES
from . import distributed as D
from .feedback import Interrupts, Progress, TrainingInterrupted, write_loss_curves
from .runs import RunDir

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class Phase:
    name: str
    steps: int
    setup: Callable[[], list[dict]]  # prepares the modules for this phase; returns optimizer param groups
    lr_schedule: str = "constant"  # constant | linear (decay to 0 over the phase) | cosine; see make_lr_scheduler
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    lr_warmup_steps: int = 0  # linear warm-up from 0 over the phase's first steps
    # a multiplier of every group's lr at step k of the phase (torch's LambdaLR), in place of lr_schedule: for a
    # method whose stages share one optimizer (MagicTailor's warm-up and DS-Bal)
    lr_factor: Callable[[int], float] | None = None


@dataclass
class Term:
    """What one loss term of a micro-step received: the seam the wiring tests read (tests/test_step_wiring.py).

    ``value``: the term itself, with its graph, before its weight; the step's total is ``sum(weight * value)``.
    ``concept`` / ``index``: which image (index into which concept set) the term was computed on; ``mask``: the
    mask it was given (latent size) and ``mask_kind`` its name ("face", "non-face", "none"); ``tokens``: the
    placeholder tokens it acts through; ``prompt``; ``t`` and ``t_range`` ([lo, hi)) the timestep(s) drawn.
    """

    value: torch.Tensor
    weight: float
    concept: str | None = None
    index: int | list[int] | None = None
    mask: torch.Tensor | None = None
    mask_kind: str | None = None
    tokens: tuple[str, ...] = ()
    prompt: str | list[str] | None = None
    t: torch.Tensor | None = None
    t_range: tuple[int, int] | None = None


@dataclass
class StepOutput:
    loss: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)
    task: str = ""
    record: dict[str, Term] = field(default_factory=dict)  # term name -> what it received (see ``Term``)


class TrainableMethod(Protocol):
    generator: torch.Generator

    def phases(self) -> list[Phase]: ...

    def micro_step(self, phase: str, step: int) -> StepOutput: ...

    def trainable_state(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def sample(self, run: RunDir, step: int):  # returns the grid (PIL image) it wrote, or None
        ...

    def finalize(self, run: RunDir) -> None: ...


def make_lr_scheduler(optimizer, kind: str, steps: int, warmup: int = 0):
    """diffusers' ``get_scheduler`` for one phase of ``steps`` optimizer steps: ``constant`` (with ``warmup``:
    diffusers' ``constant_with_warmup``), ``linear`` (to 0 at the phase's end) or ``cosine``, each after a linear
    warm-up of ``warmup`` steps."""
    from diffusers.optimization import get_scheduler

    if kind not in LR_SCHEDULES:
        raise UserError(f"unknown learning-rate schedule {kind!r}; choose one of {', '.join(LR_SCHEDULES)}")
    name = "constant_with_warmup" if kind == "constant" and warmup else kind
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(1, steps))


def _phase_at(phases: list[Phase], step: int) -> tuple[int, int]:
    """(phase index, phase start) of global optimizer step ``step``."""
    start = 0
    for i, ph in enumerate(phases):
        if step < start + ph.steps:
            return i, start
        start += ph.steps
    return len(phases), start


def train(method: TrainableMethod, run: RunDir, *, grad_accum: int = 1, checkpoint_every: int = 100,
          keep_checkpoints: int = 2, sample_every: int = 0, resume: bool = False, mixed_precision: str = "no",
          log_every: int = 1, progress: bool = True, accelerator=None, tensorboard: bool = True,
          deterministic: bool = False) -> int:
    """Run all phases of ``method`` into ``run``; returns the number of optimizer steps taken now.

    ``deterministic`` (opt-in) on a CPU trains with one intra-op thread: PyTorch's multi-threaded CPU kernels sum
    in a varying order (differences of ~1e-9 that grow to ~1e-6 within a few steps), so only then does the same
    seed give bit-identical weights, with or without a resume in between. It costs the other cores: 1.65x per
    step on 2 cores for the SD1.5 architecture at 256 px (issue 19). GPUs are not affected by it.
    """
    from ..allocator import tune

    tune()  # glibc keeps the big activation buffers between steps (faster on CPU; allocator.py)
    threads = torch.get_num_threads()
    on_cpu = accelerator is None and not torch.cuda.is_available()
    if deterministic and on_cpu:
        torch.set_num_threads(1)
    try:
        return _train(method, run, grad_accum, checkpoint_every, keep_checkpoints, sample_every, resume,
                      mixed_precision, log_every, progress, accelerator, tensorboard)
    finally:
        torch.set_num_threads(threads)


def _train(method, run, grad_accum, checkpoint_every, keep_checkpoints, sample_every, resume, mixed_precision,
           log_every, progress, accelerator, tensorboard) -> int:
    from accelerate import Accelerator

    phases = method.phases()
    total = sum(p.steps for p in phases)
    accelerator = accelerator or Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    step, saved = 0, None
    world, rank = accelerator.num_processes, accelerator.process_index
    latest = run.latest_checkpoint()
    if resume and latest is not None:
        saved = run.load_checkpoint(latest[1])
        D.check_resume(saved, world)
        step = int(saved["step"])
        if accelerator.is_main_process:
            run.truncate_metrics(step)
        log.info("resuming %s at step %d", run.path, step)
    elif latest is not None:
        raise UserError(f"{run.path} already has checkpoints; pass --resume to continue it, or choose another --out")
    elif rank:  # a fresh multi-process run: every rank draws its own data (distributed.rank_seed)
        method.generator.manual_seed(D.rank_seed(method.generator.initial_seed(), rank))
    if step >= total:
        if saved is not None and accelerator.is_main_process:
            # stopped after the last checkpoint but before the outputs were written: write them now
            for phase in phases:
                phase.setup()  # the trainable modules (e.g. LoRA adapters) must exist to take the state
            method.load_trainable_state(saved["trainable"])
            _finish(method, run, total)
        return 0

    writer = _tensorboard(run) if tensorboard and accelerator.is_main_process else None
    bar = Progress(total, step, progress and accelerator.is_main_process)
    bar.say(f"training {' + '.join(f'{p.steps} {p.name}' for p in phases)} steps"
            + (f", from step {step} (resumed)" if step else "") + f" into {run.path} (Ctrl-C: checkpoint and stop)")
    first = step
    mark = None  # the state of the last finished step (or phase start): what Ctrl-C checkpoints
    interrupts = Interrupts().install()
    try:
        while step < total:
            index, start = _phase_at(phases, step)
            phase = phases[index]
            with interrupts.critical():
                groups = phase.setup()
            if saved is not None:
                method.load_trainable_state(saved["trainable"])
            params = [p for g in groups for p in g["params"]]
            optimizer = torch.optim.AdamW(groups, weight_decay=phase.weight_decay)
            if saved is not None and saved.get("phase") == phase.name and saved.get("optimizer"):
                optimizer.load_state_dict(saved["optimizer"])
            scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, phase.lr_factor) if phase.lr_factor is not None
                         else make_lr_scheduler(optimizer, phase.lr_schedule, phase.steps, phase.lr_warmup_steps))
            with warnings.catch_warnings():  # replaying the schedule before any optimizer step is intended
                warnings.simplefilter("ignore")
                for _ in range(step - start):
                    scheduler.step()
            if saved is not None:
                torch.set_rng_state(D.rank_rng(saved, rank)["torch"])
                method.generator.set_state(D.rank_rng(saved, rank)["method"])
                saved = None
            if world > 1:
                D.broadcast_parameters(params)
            # not the scheduler: accelerate would step it N times per step under N processes
            optimizer = accelerator.prepare(optimizer)
            mark = (step, phase.name, optimizer, {"torch": torch.get_rng_state(), "method": method.generator.get_state()})
            while step < start + phase.steps:
                terms_sum: dict[str, float] = {}
                terms_n: dict[str, int] = {}
                tasks, failure = [], None
                for _ in range(grad_accum):
                    with accelerator.autocast():
                        out = method.micro_step(phase.name, step)
                    if not torch.isfinite(out.loss.detach()):
                        failure = (f"loss became {out.loss.item()} at step {step + 1} ({phase.name}, task {out.task}"
                                   f"{f', process {rank}' if world > 1 else ''})")
                        if world == 1:
                            raise _diverged(run, failure)
                        break
                    accelerator.backward(out.loss / grad_accum)
                    tasks.append(out.task)
                    for k, v in out.terms.items():
                        terms_sum[k] = terms_sum.get(k, 0.0) + float(v)
                        terms_n[k] = terms_n.get(k, 0) + 1
                if world > 1:
                    D.sync_gradients(params, world, accelerator.device, failure)
                with interrupts.critical():  # the update: Ctrl-C waits for the finished step
                    if phase.grad_clip:
                        accelerator.clip_grad_norm_(params, phase.grad_clip)
                    try:
                        optimizer.step()
                    except RuntimeError as exc:  # e.g. lr 1e38: "value cannot be converted to type float without overflow"
                        if "overflow" not in str(exc):
                            raise
                        raise _diverged(run, f"the update overflowed at step {step + 1} ({phase.name}, learning rate "
                                             f"{optimizer.param_groups[0]['lr']:g})") from None
                    after = getattr(method, "after_optimizer_step", None)
                    if after is not None:  # e.g. MagiCapture official: embedding norms pulled toward 0.4 in phase 1
                        after(phase.name, optimizer.param_groups[0]["lr"])
                    if not optimizer.step_was_skipped:  # what accelerate's prepared scheduler did in one process
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    rng = {"torch": torch.get_rng_state(), "method": method.generator.get_state()}
                    mark = (step, phase.name, optimizer, rng)
                record = {"step": step, "phase": phase.name, "task": "+".join(tasks),
                          "lr": optimizer.param_groups[0]["lr"]}
                record.update({k: terms_sum[k] / terms_n[k] for k in terms_sum})
                checkpoint = checkpoint_every and (step % checkpoint_every == 0 or step == total)
                if checkpoint and world > 1:  # every rank's streams, so a resume continues each of them
                    ranks = D.gather_rng(method.generator, world)
                    rng.update(processes=world, ranks=ranks[1:])
                if accelerator.is_main_process:
                    if step % log_every == 0 or step == total:
                        run.log_metrics(record)
                    if writer is not None:
                        for k, v in record.items():
                            if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                                writer.add_scalar(f"{phase.name}/{k}", v, step)
                    bar.update(step, phase.name, record.get("loss"))
                    if checkpoint:
                        with interrupts.critical():
                            _save(method, run, step, phase.name, optimizer, rng, keep_checkpoints)
                    if sample_every and step % sample_every == 0 and step != total:
                        grid = method.sample(run, step)
                        if writer is not None and grid is not None:
                            import numpy as np

                            writer.add_image("samples", np.asarray(grid.convert("RGB")), step, dataformats="HWC")
    except KeyboardInterrupt:
        interrupts.restore()  # a second Ctrl-C while the checkpoint is written stops at once
        bar.close()
        raise _interrupted(method, run, mark, total, keep_checkpoints, world,
                           accelerator.is_main_process) from None
    finally:
        interrupts.restore()
        bar.close()
        if writer is not None:
            writer.close()
    if accelerator.is_main_process:
        _check_trainable(method, run, step, phases[-1].name)
        _finish(method, run, total)
    return step - first


def _save(method, run: RunDir, step: int, phase: str, optimizer, rng: dict, keep: int) -> None:
    _check_trainable(method, run, step, phase)  # a non-finite state is never saved
    run.save_checkpoint(step, {"step": step, "phase": phase, "trainable": method.trainable_state(),
                               "optimizer": optimizer.state_dict(), "rng": rng}, keep=keep)


def _interrupted(method, run: RunDir, mark, total: int, keep: int, world: int, main: bool) -> TrainingInterrupted:
    """Ctrl-C: checkpoint the last finished step (``mark``: step, phase, optimizer, RNG state at its end; unless a
    checkpoint of it exists) and say where it is. Several processes keep their last periodic checkpoint (a rank's
    RNG state cannot be gathered once one of them stopped)."""
    latest = run.latest_checkpoint()
    if mark is not None and main and world == 1 and mark[0] > 0 and (latest is None or latest[0] < mark[0]):
        step, phase, optimizer, rng = mark
        try:
            _save(method, run, step, phase, optimizer, rng, max(keep, 1))
        except TrainingDiverged:
            pass  # the last finite checkpoint stays the latest
        latest = run.latest_checkpoint()
    if latest is None:
        return TrainingInterrupted(run.path, 0, total, None)
    return TrainingInterrupted(run.path, latest[0], total, latest[1])


def _diverged(run: RunDir, what: str) -> TrainingDiverged:
    """The divergence message: what happened (steps counted from 1, as in metrics.jsonl) and the last checkpoint,
    which is always finite (a non-finite state is never saved)."""
    last = run.latest_checkpoint()
    where = (f"; the last checkpoint, all finite, is {last[1]} (step {last[0]}; continue from it with --resume)"
             if last else "; no checkpoint was written before it")
    return TrainingDiverged(f"training diverged: {what}; stopping{where}. Try a lower learning rate.")


def _check_trainable(method, run: RunDir, step: int, phase: str) -> None:
    """TrainingDiverged when a trainable value is NaN or infinite (the loss may still look finite)."""
    for key, value in method.trainable_state().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise _diverged(run, f"the trainable weights became non-finite ({key!r}) by step {step} ({phase})")


def _finish(method, run: RunDir, total: int) -> None:
    """The run's outputs (weights, exports, final samples), then the DONE marker, last."""
    method.finalize(run)
    write_loss_curves(run.read_metrics(), run.path / "loss.png")
    run.done_path.write_text(f"{total}\n")


def _tensorboard(run: RunDir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: metrics.jsonl still has everything
        log.warning("tensorboard is not installed; logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(run.path / "logs"))
