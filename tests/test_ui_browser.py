"""The studio in a real browser: headless Debian ``chromium`` driven by Playwright (``executable_path``; Playwright's
own browser download is not used), on the toy-world model. Upload photos (one of them not a photo), see the crops
with their masks and the rejection, train a short run, watch the step move, reload the page mid-training and find
the job, generate, see the images, download the exports zip, restart the server and find the run done.

Screenshots go to ``tmp_path`` (and to ``$MAGICSTUDIO_SCREENSHOTS`` when set: ``docs/ui`` holds the README's).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import zipfile
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on this machine (apt-get install chromium; .ci/run does)", allow_module_level=True)
pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install magicstudio[ui-test])")

from magicstudio.ui.command import serve  # noqa: E402

STEPS = 12  # 3 textual-inversion + 9 LoRA steps
SLOW = float(os.environ.get("MAGICSTUDIO_TEST_SLOWDOWN", "1"))  # waits x this on an overloaded machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shot(target, tmp_path: Path, name: str) -> None:
    """A screenshot of the page's viewport or of one element."""
    target.screenshot(path=str(tmp_path / f"{name}.png"))
    out = os.environ.get("MAGICSTUDIO_SCREENSHOTS")
    if out:
        from PIL import Image

        Path(out).mkdir(parents=True, exist_ok=True)
        img = Image.open(tmp_path / f"{name}.png").convert("RGB")
        img.quantize(colors=128).save(Path(out) / f"{name}.png", optimize=True)  # small enough to commit


def status_step(page) -> tuple[str, int]:
    text = page.locator("#status").inner_text()
    m = re.search(r"step (\d+)/(\d+)", text)
    return text, int(m.group(1)) if m else 0


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def photos(tmp_path):
    from magicstudio.data.images import list_images
    from magicstudio.data.samples import make_demo_sets

    src, ref = (list_images(d) for d in make_demo_sets(tmp_path / "photos"))
    bad = tmp_path / "holiday.jpg"
    bad.write_text("not a photo at all")
    return [str(p) for p in src] + [str(bad)], [str(p) for p in ref]


def test_the_studio_end_to_end_in_chromium(tmp_path, photos):
    data = tmp_path / "data"
    port = free_port()
    studio, demo = serve(data, "toyworld", "127.0.0.1", port, block=False)
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.set_default_timeout(120_000)  # a busy CI machine is slow
            page.goto(url)
            selfies, styles = photos
            page.locator("#selfies input[type=file]").set_input_files(selfies)
            page.locator("#styles input[type=file]").set_input_files(styles)
            page.locator("#selfies").get_by_text("holiday").first.wait_for()
            page.locator("#styles").get_by_text("style_4").first.wait_for()
            page.locator("#prepare").click()
            page.locator("#source-tiles img").nth(3).wait_for(timeout=240_000)  # the four selfies' crops with their masks
            page.locator("#reference-tiles img").nth(3).wait_for()
            rejected = page.locator("#rejected")
            sync_api.expect(rejected).to_contain_text("holiday.jpg: not an image")
            assert page.locator("#source-tiles img").count() == 4
            shot(page, tmp_path, "studio-photos")

            page.locator("#steps input").fill(str(STEPS))
            page.locator("#steps input").press("Enter")
            page.locator("#train").click()
            first = wait_for(lambda: status_step(page)[1] >= 1 and status_step(page), 300 * SLOW, "the first training step")
            assert "**" not in first[0] and "running" in first[0] and f"/{STEPS}" in first[0]
            later = wait_for(lambda: status_step(page)[1] > first[1] and status_step(page), 120 * SLOW, "the step to move")
            page.reload()  # mid-training: the job is still there, still moving
            again = wait_for(lambda: status_step(page)[1] >= later[1] and status_step(page), 60 * SLOW, "the job after reload")
            assert "running" in again[0] or "done" in again[0]
            if "running" in again[0]:
                shot(page.locator("#progress").first, tmp_path, "studio-training")
            done = wait_for(lambda: "done" in page.locator("#status").inner_text() and page.locator("#status").inner_text(),
                            300 * SLOW, "the training to finish")
            assert f"step {STEPS}/{STEPS}" in done
            page.locator("#sample img").wait_for()  # the latest sample image
            if not (tmp_path / "studio-training.png").exists():
                shot(page.locator("#progress").first, tmp_path, "studio-training")

            page.get_by_role("tab", name="Gallery").click()
            page.locator("#gallery-refresh").click()
            run_name = Path(studio.store.all()[0]["run"]).name
            sync_api.expect(page.locator("#gallery-run input")).to_have_value(run_name)
            page.locator("#n-images input[type=number]").fill("2")
            page.locator("#n-images input[type=number]").press("Enter")
            page.locator("#gen-steps input[type=number]").fill("10")
            page.locator("#gen-steps input[type=number]").press("Enter")
            page.locator("#generate").click()
            page.locator("#images img").nth(1).wait_for(timeout=int(180_000 * SLOW))
            sync_api.expect(page.locator("#gen-note")).to_contain_text("2 image(s) saved")
            shot(page, tmp_path, "gallery")
            generated = sorted((data / "runs" / run_name / "generated").glob("*.png"))
            assert [p.name for p in generated] == ["000-seed0.png", "001-seed1.png"]

            page.locator("#zip").click()
            link = page.locator("#zip-file a").first
            link.wait_for()
            with page.expect_download() as dl:
                link.click()
            zpath = tmp_path / "exports.zip"
            dl.value.save_as(zpath)
            names = zipfile.ZipFile(zpath).namelist()
            assert f"{run_name}/pytorch_lora_weights.safetensors" in names
            assert {f"{run_name}/embeddings/v1.safetensors", f"{run_name}/embeddings/v2.safetensors"} <= set(names)

            demo.close()  # restart the server on the same --data
            studio.close()
            port = free_port()
            studio, demo = serve(data, "toyworld", "127.0.0.1", port, block=False)
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Runs").click()
            table = page.locator("#runs-table")
            sync_api.expect(table).to_contain_text(run_name)
            sync_api.expect(table).to_contain_text("done")
            browser.close()
    finally:
        demo.close()
        studio.close()
