"""The UI's job store and runner with real subprocesses: real trainings on the toy-world model (a few steps), and
small stand-in programs where only the process's exit matters (a clean exit without DONE, a kill, an error line).
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from magicstudio.ui.jobs import (CANCELLED, DONE, FAILED, INTERRUPTED, QUEUED, RUNNING, JobStore, Runner,
                                 failure_reason, progress_of)

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def toy_sets(tmp_path_factory):
    from magicstudio.data import toyworld as tw

    root = tmp_path_factory.mktemp("toysets")
    return (tw.write_concept_set(tw.concept_set("identity", 0, 3), root / "src", "source"),
            tw.write_concept_set(tw.concept_set("style", 0, 3), root / "ref", "reference"))


def env():
    return {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_args(toy_sets, ti=2, lora=4):
    src, ref = toy_sets
    return ["--source", str(src), "--reference", str(ref), "--model", "toyworld", "--preset", "smoke",
            "--ti-steps", str(ti), "--lora-steps", str(lora), "--checkpoint-every", "2", "--quiet"]


def wait(runner, job, until, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        runner.tick()
        j = runner.store.get(job)
        if until(j):
            return j
        time.sleep(0.2)
    raise AssertionError(f"timed out; job is {runner.store.get(job)}; log:\n{Path(j['log']).read_text()[-2000:]}")


def fake_python(tmp_path, body: str) -> str:
    """A stand-in for the interpreter: a shell script that ignores the training arguments."""
    p = tmp_path / "fake-python"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


def test_done_needs_the_marker_even_when_the_process_exits_0(tmp_path):
    runner = Runner(JobStore(tmp_path / "jobs.sqlite"), python=fake_python(tmp_path, "exit 0"))
    job = runner.submit(tmp_path / "run", [], {}, tmp_path / "job.log")
    j = wait(runner, job, lambda j: j["state"] != RUNNING, 10)
    assert j["state"] == FAILED and "without writing the run's DONE marker" in j["reason"]


def test_a_failure_shows_the_cli_error_line_and_a_kill_names_the_signal(tmp_path, toy_sets):
    store = JobStore(tmp_path / "jobs.sqlite")
    runner = Runner(store, env=env())
    args = train_args(toy_sets)
    args[1] = str(tmp_path / "nowhere")  # --source that does not exist: the real CLI's one-line reason
    job = runner.submit(tmp_path / "run", args, {}, tmp_path / "job.log")
    j = wait(runner, job, lambda j: j["state"] != RUNNING)
    assert j["state"] == FAILED and j["reason"] == f"source folder not found: {tmp_path / 'nowhere'}"
    killed = Runner(JobStore(tmp_path / "k.sqlite"), python=fake_python(tmp_path, "echo working; kill -9 $$"))
    job = killed.submit(tmp_path / "run2", [], {}, tmp_path / "k.log")
    j = wait(killed, job, lambda j: j["state"] != RUNNING, 10)
    assert j["reason"] == "the training process was killed by SIGKILL (out of memory?)"


def test_failure_reason_prefers_the_last_error_line(tmp_path):
    log = tmp_path / "log"
    log.write_text("step 1\nerror: first\nmore\nerror: the real one\n")
    assert failure_reason(log, 2) == "the real one"
    log.write_text("Traceback\n  File x\nRuntimeError: boom\n")
    assert failure_reason(log, 1) == "the training process exited with code 1: RuntimeError: boom"


def test_one_training_at_a_time_in_queue_order_and_cancel(tmp_path):
    runner = Runner(JobStore(tmp_path / "jobs.sqlite"), python=fake_python(tmp_path, "sleep 30"))
    jobs = [runner.submit(tmp_path / f"run{i}", [], {}, tmp_path / f"{i}.log") for i in range(3)]
    store = runner.store
    assert [store.get(j)["state"] for j in jobs] == [RUNNING, QUEUED, QUEUED]
    assert [store.position(j) for j in jobs] == [None, 1, 2]
    assert runner.cancel(jobs[2]) == CANCELLED  # a queued job leaves the queue at once
    assert store.position(jobs[1]) == 1
    runner.cancel(jobs[0])
    j = wait(runner, jobs[0], lambda j: j["state"] != RUNNING, 10)
    assert j["state"] == CANCELLED
    assert store.get(jobs[1])["state"] == RUNNING  # the next in line started
    runner.stop()


def test_cancel_then_resume_after_a_restart_continues_from_the_checkpoint(tmp_path, toy_sets):
    """One real training: running -> Cancel -> cancelled (and still cancelled for a new server on the same --data)
    -> Resume -> done, the second attempt continuing from the run's checkpoint with --resume."""
    db, run = tmp_path / "jobs.sqlite", tmp_path / "run"
    runner = Runner(JobStore(db), env=env())
    job = runner.submit(run, train_args(toy_sets, 2, 24), {"preset": "smoke"}, tmp_path / "job.log")
    assert runner.store.get(job)["state"] == RUNNING  # nothing else runs: it starts at once
    wait(runner, job, lambda j: (run / "checkpoints" / "step-000002" / "COMPLETE").is_file())
    assert progress_of(runner.store.get(job))["eta"] is not None
    runner.cancel(job)
    j = wait(runner, job, lambda j: j["state"] != RUNNING)
    assert j["state"] == CANCELLED and not (run / "DONE").exists()
    stopped_at = progress_of(j)["step"]
    assert 2 <= stopped_at < 26
    restarted = Runner(JobStore(db), env=env())  # a new server on the same --data
    assert restarted.store.get(job)["state"] == CANCELLED
    restarted.resume(job)
    j = wait(restarted, job, lambda j: j["state"] not in (QUEUED, RUNNING), 180)
    assert j["state"] == DONE, j["reason"]
    assert (run / "DONE").is_file()
    log = Path(j["log"]).read_text().split("capture train")
    assert len(log) == 3 and "--resume" not in log[1] and "--resume" in log[2]
    p = progress_of(j)
    assert (p["step"], p["total"], p["phase"]) == (26, 26, "lora")
    assert [s for s, _ in p["losses"]] == list(range(1, 27)) and p["loss"] == p["losses"][-1][1]
    assert JobStore(db).get(job)["state"] == DONE  # and the next server still lists it done


def test_a_server_restart_shows_a_dead_training_interrupted_with_its_step(tmp_path):
    db = tmp_path / "jobs.sqlite"
    runner = Runner(JobStore(db), python=fake_python(tmp_path, "sleep 30"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 7, "loss": 0.4}\n')
    job = runner.submit(run, ["train"], {}, tmp_path / "job.log")
    os.killpg(runner.store.get(job)["pid"], signal.SIGKILL)  # the server dies and takes its training with it
    runner._proc.wait()
    j = Runner(JobStore(db), python=runner.python).store.get(job)
    assert j["state"] == INTERRUPTED and j["reason"] == "the server stopped while this job was training (at step 7)"
    resumed = Runner(JobStore(db), python=runner.python)
    resumed.resume(job)
    j = resumed.store.get(job)
    assert j["state"] == RUNNING and j["resume"] == 1 and j["start_step"] == 7
    assert resumed._proc.args[-1] == "--resume"
    resumed.stop()


def test_a_training_that_outlives_the_server_is_adopted_not_interrupted(tmp_path):
    db = tmp_path / "jobs.sqlite"
    runner = Runner(JobStore(db), python=fake_python(tmp_path, "sleep 30"))
    job = runner.submit(tmp_path / "run", ["train"], {}, tmp_path / "job.log")
    second = runner.submit(tmp_path / "run2", ["train"], {}, tmp_path / "job2.log")
    restarted = Runner(JobStore(db), python=runner.python)  # the old process is still alive
    restarted.tick()
    assert restarted.store.get(job)["state"] == RUNNING and restarted.store.get(second)["state"] == QUEUED
    os.killpg(restarted.store.get(job)["pid"], signal.SIGTERM)
    runner._proc.wait()
    restarted.tick()
    assert restarted.store.get(job)["state"] == FAILED and restarted.store.get(second)["state"] == RUNNING
    restarted.stop()


def test_a_job_that_cannot_start_fails_with_the_reason_and_the_queue_goes_on(tmp_path):
    runner = Runner(JobStore(tmp_path / "jobs.sqlite"), python=str(tmp_path / "no-such-python"))
    first = runner.submit(tmp_path / "run1", [], {}, tmp_path / "1.log")
    j = runner.store.get(first)
    assert j["state"] == FAILED and j["reason"] == "could not start the training process: No such file or directory"
    runner.python = fake_python(tmp_path, "sleep 30")
    second = runner.submit(tmp_path / "run2", [], {}, tmp_path / "2.log")
    assert runner.store.get(second)["state"] == RUNNING
    runner.stop()
