"""Training jobs that are never lost: a SQLite table in ``--data`` and one runner that trains one job at a time.

Each job is a ``python -m magicstudio capture train ... --out RUN`` subprocess in its own session (a crash or an
out-of-memory kill in training cannot take the server down), its output captured to ``DATA/logs/job-N.log``.
A job's state is derived from what the process and the run folder say, never assumed:

    queued       waiting; its position in the queue is shown
    running      the subprocess is alive
    done         the subprocess ended AND the run folder has its DONE marker (``training.runs``)
    failed       it ended without DONE; ``reason`` is the one-line error from its log
    cancelled    the user stopped it (Resume continues from its last checkpoint)
    interrupted  the server stopped while it ran (found on start-up; Resume continues it)
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import UserError
from ..training.runs import RunDir

QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED = "queued", "running", "done", "failed", "cancelled", "interrupted"
FINISHED = (DONE, FAILED, CANCELLED, INTERRUPTED)
RESUMABLE = (FAILED, CANCELLED, INTERRUPTED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,              -- the run folder
    args TEXT NOT NULL,             -- JSON list: the `capture train` arguments after --out RUN
    settings TEXT NOT NULL,         -- JSON object shown in the Runs tab
    state TEXT NOT NULL,
    queued_at REAL NOT NULL,        -- queue order (a resumed job queues again)
    started_at REAL,
    finished_at REAL,
    start_step INTEGER DEFAULT 0,   -- the run's step when this attempt started (for the ETA)
    pid INTEGER,
    resume INTEGER DEFAULT 0,
    cancel INTEGER DEFAULT 0,
    reason TEXT DEFAULT '',
    log TEXT NOT NULL
);
"""


class JobStore:
    """The ``jobs`` table (plain sqlite3; one connection shared by the server's threads under a lock)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    def _run(self, sql: str, params=()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, params).fetchall()]

    def add(self, run: str | os.PathLike, args: list[str], settings: dict, log: str | os.PathLike) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO jobs (run, args, settings, state, queued_at, log) VALUES (?, ?, ?, ?, ?, ?)",
                (str(run), json.dumps(args), json.dumps(settings), QUEUED, time.time(), str(log)))
            return int(cur.lastrowid)

    def get(self, job_id: int) -> dict:
        rows = self._run("SELECT * FROM jobs WHERE id = ?", (int(job_id),))
        if not rows:
            raise UserError(f"no job {job_id}")
        return _decode(rows[0])

    def all(self) -> list[dict]:
        return [_decode(r) for r in self._run("SELECT * FROM jobs ORDER BY id DESC")]

    def update(self, job_id: int, **fields) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._run(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), int(job_id)))

    def queue(self) -> list[int]:
        """Queued job ids, next first."""
        return [r["id"] for r in self._run("SELECT id FROM jobs WHERE state = ? ORDER BY queued_at, id", (QUEUED,))]

    def position(self, job_id: int) -> int | None:
        """1 for the next job to start, None when not queued."""
        q = self.queue()
        return q.index(job_id) + 1 if job_id in q else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _decode(row: dict) -> dict:
    row["args"] = json.loads(row["args"])
    row["settings"] = json.loads(row["settings"])
    return row


def pid_runs(pid: int | None, run: str) -> bool:
    """Whether process ``pid`` is alive and is the training of ``run`` (its command line names the folder)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(run).encode() in cmdline and b"train" in cmdline


def failure_reason(log: str | os.PathLike, returncode: int | None) -> str:
    """The one line that says why a training ended without its DONE marker."""
    lines = []
    try:
        lines = [ln.strip() for ln in Path(log).read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        pass
    for ln in reversed(lines):
        if ln.startswith("error: "):  # the CLI's one-line reason (UserError, OSError, unexpected exception)
            return ln[len("error: "):]
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"the training process was killed by {name}{hint}"
    if returncode == 0:
        return "the training process ended without writing the run's DONE marker"
    last = lines[-1] if lines else "no output"
    return f"the training process exited with code {returncode}: {last[:200]}"


class Runner:
    """Starts queued jobs one at a time and watches the running one (a daemon thread, or ``tick()`` by hand)."""

    def __init__(self, store: JobStore, python: str = sys.executable, env: dict | None = None, poll: float = 0.5):
        self.store, self.python, self.poll = store, python, poll
        self.env = dict(os.environ if env is None else env)
        self._proc: subprocess.Popen | None = None
        self._job: int | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.recover()

    # -- start-up
    def recover(self) -> None:
        """Jobs the database says are running but whose process is gone were interrupted by a server stop; a
        training that outlived the server (still alive, still on its run) is adopted and watched by pid."""
        for job in self.store.all():
            if job["state"] != RUNNING:
                continue
            if pid_runs(job["pid"], job["run"]):
                continue
            step = progress_of(job)["step"]
            self.store.update(job["id"], state=INTERRUPTED, finished_at=time.time(),
                              reason=f"the server stopped while this job was training (at step {step})")

    # -- user actions
    def submit(self, run: str | os.PathLike, args: list[str], settings: dict, log: str | os.PathLike) -> int:
        job = self.store.add(run, args, settings, log)
        self.wake()
        return job

    def cancel(self, job_id: int) -> str:
        with self._lock:
            job = self.store.get(job_id)
            if job["state"] == QUEUED:
                self.store.update(job_id, state=CANCELLED, finished_at=time.time(), reason="cancelled before it started")
                return CANCELLED
            if job["state"] != RUNNING:
                raise UserError(f"job {job_id} is {job['state']}, not running or queued")
            self.store.update(job_id, cancel=1)
            _signal_group(job["pid"], signal.SIGTERM)
            return RUNNING

    def resume(self, job_id: int) -> None:
        """Queue a cancelled, failed or interrupted job again; it continues from the run's latest checkpoint."""
        job = self.store.get(job_id)
        if job["state"] not in RESUMABLE:
            raise UserError(f"job {job_id} is {job['state']}: only a cancelled, failed or interrupted job can resume")
        self.store.update(job_id, state=QUEUED, queued_at=time.time(), resume=1,
                          cancel=0, reason="", pid=None, started_at=None, finished_at=None)
        self.wake()

    # -- the loop
    def start(self) -> "Runner":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="magicstudio-jobs", daemon=True)
            self._thread.start()
        return self

    def wake(self) -> None:
        if self._thread is None:
            self.tick()

    def stop(self, kill_running: bool = True) -> None:
        """Stop the loop; the running training is stopped too (it will show as interrupted, resumable)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if kill_running and self._proc is not None and self._proc.poll() is None:
                _signal_group(self._proc.pid, signal.SIGTERM)
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    _signal_group(self._proc.pid, signal.SIGKILL)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the loop must survive anything (a locked db, a full disk): retry later
                print(f"magicstudio ui: job runner: {type(exc).__name__}: {exc}", file=sys.stderr)
            self._stop.wait(self.poll)

    def tick(self) -> None:
        with self._lock:
            self._watch()
            if self._busy():
                return
            queue = self.store.queue()
            if queue:
                self._launch(self.store.get(queue[0]))

    def _busy(self) -> bool:
        if self._proc is not None:
            return True
        return any(pid_runs(j["pid"], j["run"]) for j in self.store.all() if j["state"] == RUNNING)

    def _watch(self) -> None:
        if self._proc is not None:
            rc = self._proc.poll()
            if rc is None:
                return
            self._finish(self._job, rc)
            self._proc = self._job = None
        for job in self.store.all():  # adopted trainings (they outlived an earlier server): no exit code
            if job["state"] == RUNNING and not pid_runs(job["pid"], job["run"]):
                self._finish(job["id"], None)

    def _launch(self, job: dict) -> None:
        run = Path(job["run"])
        argv = [self.python, "-m", "magicstudio", "capture", "train", *job["args"], "--out", str(run)]
        if job["resume"]:
            argv.append("--resume")
        Path(job["log"]).parent.mkdir(parents=True, exist_ok=True)
        with open(job["log"], "ab") as log:
            log.write(f"\n$ {' '.join(argv[1:])}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              env=self.env, start_new_session=True)
            except OSError as exc:  # no interpreter, no memory for a process: this job fails, the queue goes on
                self.store.update(job["id"], state=FAILED, finished_at=time.time(),
                                  reason=f"could not start the training process: {exc.strerror or exc}")
                return
        self._job = job["id"]
        self.store.update(job["id"], state=RUNNING, pid=self._proc.pid, started_at=time.time(),
                          start_step=progress_of(job)["step"])

    def _finish(self, job_id: int, rc: int | None) -> None:
        job = self.store.get(job_id)
        now = time.time()
        if RunDir(job["run"]).is_done():
            self.store.update(job_id, state=DONE, finished_at=now, reason="")
        elif job["cancel"]:
            self.store.update(job_id, state=CANCELLED, finished_at=now, reason="cancelled")
        else:
            self.store.update(job_id, state=FAILED, finished_at=now, reason=failure_reason(job["log"], rc))


def _signal_group(pid: int | None, sig: int) -> None:
    if not pid:
        return
    try:
        os.killpg(pid, sig)  # the job's session: the trainer and any helper it started
    except ProcessLookupError:
        pass


def progress_of(job: dict) -> dict:
    """Live step/phase/loss and ETA of a job, from its run's ``metrics.jsonl`` and ``config.yaml``."""
    run = RunDir(job["run"])
    metrics = run.read_metrics()
    last = metrics[-1] if metrics else {}
    total = 0
    try:
        cfg = run.read_config()
        total = int(cfg.get("ti_steps", 0)) + int(cfg.get("lora_steps", 0))
    except UserError:
        pass
    step = int(last.get("step", 0))
    eta = None
    started = job.get("started_at")
    done_now = step - int(job.get("start_step") or 0)
    if job.get("state") == RUNNING and started and done_now > 0 and total:
        eta = (time.time() - started) / done_now * max(0, total - step)
    samples = sorted(run.samples.glob("*.png")) if run.samples.is_dir() else []
    return {"step": step, "total": total, "phase": last.get("phase", ""), "loss": last.get("loss"), "eta": eta,
            "losses": [(int(m["step"]), float(m["loss"])) for m in metrics if "loss" in m and "step" in m],
            "sample": str(samples[-1]) if samples else None}
