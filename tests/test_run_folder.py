"""Issue 18: run-folder lock (two real processes), file modes, short temp names, pickle verdicts."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import pytest
import torch

from magicstudio.errors import UserError
from magicstudio.io import acquire_lock, atomic_write, read_pickle, release_lock, LOCK_FILE


def _holder(folder):
    code = ("import sys,time; from magicstudio.io import acquire_lock; acquire_lock(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_is_refused_with_the_holders_pid_and_kill_9_frees_it(demo_sets, tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        r = subprocess.run([sys.executable, "-c", "import sys; from magicstudio.cli.main import main; sys.exit(main())",
                            "capture", "train", "--source", str(demo_sets[0]), "--reference", str(demo_sets[1]),
                            "--out", str(out), "--model", "tiny", "--preset", "smoke", "--ti-steps", "1",
                            "--lora-steps", "1", "--resolution", "64", "--quiet"], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert f"pid {holder.pid}" in r.stderr and "in use" in r.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written by the refused one
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock
        holder.wait()
    acquire_lock(out)
    release_lock(out)


def test_files_honour_the_umask_and_temp_names_are_short(tmp_path):
    old = os.umask(0o027)
    try:
        name = "p" * 250 + ".png"
        path = atomic_write(tmp_path / name, lambda p: p.write_bytes(b"x"))
    finally:
        os.umask(old)
    assert path.read_bytes() == b"x" and (path.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo never",))


def test_pickle_verdicts(tmp_path):
    evil, plain, junk = tmp_path / "evil.pt", tmp_path / "plain.pt", tmp_path / "junk.pt"
    evil.write_bytes(pickle.dumps({"a": _Evil()}, protocol=5))
    plain.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=5))
    junk.write_bytes(b"hello world garbage")
    for path, words in ((evil, "refused as unsafe"), (plain, "plain Python pickle"), (junk, "damaged")):
        with pytest.raises(UserError) as exc:
            read_pickle(path)
        assert words in str(exc.value) and "weights_only" not in str(exc.value)
    torch.save({"a": _Evil()}, tmp_path / "zip.pt")
    with pytest.raises(UserError, match="refused as unsafe"):
        read_pickle(tmp_path / "zip.pt")


def test_non_finite_weights_are_refused_with_the_file_named(tmp_path):
    from magicstudio.io import load_tensors, save_tensors

    path = save_tensors(tmp_path / "lora.safetensors", {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(UserError, match="non-finite"):
        load_tensors(path)
