"""``magicstudio ui`` through its HTTP API with ``gradio_client`` (the page's own endpoints): bad uploads, auth,
the queue (order, cancel, resume) and what the server refuses to serve. The trainings here are stand-in processes
(the real ones are in test_ui_jobs.py and the browser test); everything else is the real server.
"""

from __future__ import annotations

import socket
import stat
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

from magicstudio.ui.command import check_host, parse_auth, serve  # noqa: E402
from magicstudio.errors import UserError  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    started = []

    def start(data=None, auth=None):
        port = free_port()
        studio, demo = serve(data or tmp_path / "data", "toyworld", "127.0.0.1", port, auth, block=False)
        started.append((studio, demo))
        return studio, f"http://127.0.0.1:{port}/"

    yield start
    for studio, demo in started:
        demo.close()
        studio.close()


def photo_files(tmp_path) -> dict[str, Path]:
    from PIL import Image

    from magicstudio.data.samples import make_demo_sets

    from magicstudio.data.images import list_images

    src, ref = (list_images(d) for d in make_demo_sets(tmp_path / "photos"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.png").write_text("this is text, not a picture")  # an image extension, not an image
    good = src[0].read_bytes()
    (bad / f"cut{src[0].suffix}").write_bytes(good[: len(good) // 3])  # a truncated PNG
    Image.new("RGB", (20, 20), "red").save(bad / "tiny.png")
    Image.new("RGB", (300, 300), (128, 128, 128)).save(bad / "blank.png")  # decodes, but shows no face
    return {"source": src, "reference": ref, "bad": sorted(bad.iterdir())}


def test_bad_uploads_are_rejected_with_reasons_and_good_ones_prepared(server, tmp_path):
    studio, url = server()
    files = photo_files(tmp_path)
    c = Client(url, verbose=False)
    selfies = [handle_file(str(p)) for p in files["source"][:2] + files["bad"]]
    src_tiles, ref_tiles, rejected = c.predict(selfies, [handle_file(str(p)) for p in files["reference"]],
                                               api_name="/prepare")
    assert len(src_tiles) == 2 and len(ref_tiles) == len(files["reference"])
    lines = {ln.split("**")[2].strip().split(":")[0]: ln for ln in rejected.splitlines() if ln.startswith("- **selfies**")}
    assert "not an image" in lines["notes.png"]
    assert "damaged image" in lines[f"cut{files['source'][0].suffix}"]
    assert "20x20 is too small" in lines["tiny.png"]
    assert "face" in lines["blank.png"].split(":", 1)[1]  # decoded, then prepare found no face in it
    assert "only 2 usable photo(s)" in rejected
    # stored under server-made names inside --data, nothing else
    sessions = list((studio.data / "sessions").iterdir())
    assert len(sessions) == 1
    assert sorted(p.name for p in (sessions[0] / "source-photos").iterdir()) == [
        "names.json", "photo-00.png", "photo-01.png", "photo-02.png"]  # blank.png decoded; prepare rejected it
    uploads = [p for p in (studio.data / ".gradio").rglob("*") if p.is_file()]
    assert uploads, "Gradio's upload cache is not inside --data"


def test_more_photos_than_the_limit_are_refused_one_by_one(tmp_path):
    from PIL import Image

    from magicstudio.ui.uploads import MAX_FILES, store_photos

    paths = []
    for i in range(MAX_FILES + 2):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (80, 80), (i, 0, 0)).save(p)
        paths.append((str(p), f"../../{i}.png"))
    stored, rejected = store_photos(paths, tmp_path / "out")
    assert len(stored) == MAX_FILES and [r[1] for r in rejected] == [f"over the limit of {MAX_FILES} photos per set"] * 2
    assert rejected[0][0] == f"{MAX_FILES}.png"  # the client's path is cut to its name, only for the message
    assert all(p.parent == tmp_path / "out" for p in stored)


def test_auth_is_required_when_given(server):
    _, url = server(auth=("ann", "s3cret"))
    with pytest.raises(Exception):
        Client(url, verbose=False)
    with pytest.raises(Exception):
        Client(url, auth=("ann", "wrong"), verbose=False)
    c = Client(url, auth=("ann", "s3cret"), verbose=False)
    assert "No training yet" in c.predict(None, api_name="/progress")[0]


def test_host_warning_and_auth_parsing():
    assert check_host("127.0.0.1", None) is None and check_host("::1", None) is None
    assert "without --auth" in check_host("0.0.0.0", None)
    assert check_host("0.0.0.0", ("a", "b")) is None
    assert parse_auth("ann:pa:ss") == ("ann", "pa:ss")
    for bad in ("ann", ":x", "ann:"):
        with pytest.raises(UserError):
            parse_auth(bad)


def test_only_files_inside_data_are_served(server, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    _, url = server()
    for path in (str(secret), "/etc/passwd", "../secret.txt"):
        r = httpx.get(f"{url}gradio_api/file={path}")
        assert r.status_code in (403, 404) and "private" not in r.text and "root:" not in r.text


def test_queue_order_cancel_and_resume_through_the_api(server, tmp_path):
    studio, url = server()
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    studio.runner.python = str(fake)
    c = Client(url, verbose=False)
    c.predict(api_name="/samples")
    jobs = [c.predict("smoke", 8, api_name="/train")["value"] for _ in range(3)]
    status = [c.predict(j, api_name="/progress")[0] for j in jobs]
    assert "**running**" in status[0]
    assert "**queued**, position 1 in the queue" in status[1] and "position 2" in status[2]
    c.predict(jobs[0], api_name="/cancel")
    deadline = time.time() + 10
    while "**running**" not in c.predict(jobs[1], api_name="/progress")[0] and time.time() < deadline:
        time.sleep(0.2)
    assert "**cancelled**" in c.predict(jobs[0], api_name="/progress")[0]
    assert "**running**" in c.predict(jobs[1], api_name="/progress")[0]
    assert "position 1 in the queue" in c.predict(jobs[2], api_name="/progress")[0]
    c.predict(jobs[0], api_name="/resume")  # back in the queue, behind job 3
    assert "position 2 in the queue" in c.predict(jobs[0], api_name="/progress")[0]
    with pytest.raises(Exception, match="only a cancelled, failed or interrupted job can resume"):
        c.predict(jobs[1], api_name="/resume")
    with pytest.raises(Exception, match="no job"):
        c.predict(9999, api_name="/progress")
    with pytest.raises(Exception, match="no run named"):
        c.predict("../../etc", api_name="/export")


def test_magicface_tab_makes_portraits_with_segmentation_pictures(server):
    studio, url = server()
    c = Client(url, verbose=False)
    w1, i1, m1, w2, i2, m2, prompt = c.predict(api_name="/magicface_samples")
    assert (w1, w2) == ("person", "hair")
    files = [handle_file(p) for p in (i1, m1, i2, m2)]
    images, pictures = c.predict(w1, files[0], files[1], w2, files[2], files[3], prompt, 0, 1, 5, api_name="/magicface")
    assert len(images) == 1 and images[0]["caption"].endswith(".png")
    names = [p["caption"] for p in pictures]
    assert "references.png" in names and any(n.endswith("-masks.png") for n in names)
    with pytest.raises(Exception, match="hair"):  # a concept word the prompt does not name: one line
        c.predict(w1, files[0], files[1], w2, files[2], files[3], "a photo of a person", 0, 1, 5, api_name="/magicface")
    bad = Path(studio.data) / "bad.png"
    bad.write_text("text")
    with pytest.raises(Exception):  # refused (by Gradio's own decoding, or ours), and the server goes on
        c.predict(w1, handle_file(str(bad)), None, "", None, None, prompt, 0, 1, 5, api_name="/magicface")
    assert "No training yet" in c.predict(None, api_name="/progress")[0]


def test_a_failed_training_says_why_in_the_page_and_shows_its_log(server, tmp_path):
    studio, url = server()
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho '[1/8] textual_inversion loss 0.5'\necho 'error: out of memory on cpu: tried to "
                    "allocate 2.0 GiB' >&2\nexit 2\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    studio.runner.python = str(fake)
    c = Client(url, verbose=False)
    c.predict(api_name="/samples")
    job = c.predict("smoke", 8, api_name="/train")["value"]
    deadline = time.time() + 10
    while "**failed**" not in (text := c.predict(job, api_name="/progress"))[0] and time.time() < deadline:
        time.sleep(0.2)
    assert text[0].endswith("failed: out of memory on cpu: tried to allocate 2.0 GiB")
    assert "[1/8] textual_inversion loss 0.5" in text[3]  # the log's last lines
    table = c.predict(api_name="/runs")
    assert [row[2] for row in table["data"]] == ["failed"]


def test_the_ui_command_refuses_bad_flags_in_one_line(capsys):
    from magicstudio.__main__ import main

    assert main(["ui", "--auth", "nopassword"]) == 2
    assert "error: --auth must be USER:PASS" in capsys.readouterr().err
    assert main(["ui", "--port", "70000"]) == 2
    assert "between 1 and 65535" in capsys.readouterr().err
