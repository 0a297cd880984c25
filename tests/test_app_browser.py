"""End-to-end test of the demo in a real browser (Playwright + Debian's /usr/bin/chromium; never a downloaded one).

Also a script, to capture the page of any running app::

    python -m tests.test_app_browser --url http://127.0.0.1:7860 --out screenshots/

Screenshots go to ``screenshots/`` (git-ignored), one per tab.
"""

from __future__ import annotations

import argparse
import re
import socket
import tempfile
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "screenshots"
EXAMPLE = ROOT / "assets" / "examples" / "toy-red-checkered-circle.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000  # a busy 2-core machine runs the handlers slowly


def capture(url: str, out: Path, image: Path = EXAMPLE) -> list[Path]:
    """Open the app, reconstruct ``image``, visit every tab (running clusters, a chat turn and a generation) and save
    one screenshot per tab under ``out``. Raises if an expected result does not appear."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1440, "height": 1000})
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            expect(page.get_by_role("heading", name="DualToken", exact=False).first).to_be_visible()

            # Reconstruction: upload, run, both reconstructions and the metrics appear.
            page.locator("#recon-input input[type=file]").set_input_files(str(image))
            page.locator("#recon-run").click()
            table = page.locator("#recon-metrics")
            expect(table).to_contain_text("DualToken")
            expect(table).to_contain_text("VILA-U-style baseline")
            expect(table).to_contain_text(re.compile(r"\b\d+ of \d+\b"))  # pixel depths used, e.g. "4 of 4"
            for slider in ("#recon-dual", "#recon-baseline"):
                expect(page.locator(f"{slider} img")).to_have_count(2)
            expect(page.locator("#recon-pixel-map img")).to_have_count(1)
            expect(page.locator("#recon-note")).to_contain_text("centre crop")
            shots.append(_shot(page, out / "1-reconstruction.png"))

            page.get_by_role("tab", name="Token clusters").click()
            page.locator("#cluster-run").click()
            expect(page.locator("#cluster-table")).to_contain_text("semantic tokens")
            expect(page.locator("#cluster-summary")).to_contain_text("agree best")
            expect(page.locator("#cluster-pixel img")).to_have_count(1)
            shots.append(_shot(page, out / "2-clusters.png"))

            page.get_by_role("tab", name="VQA chat").click()
            page.locator("#chat-input input[type=file]").set_input_files(str(image))
            page.locator("#chat-input textarea").fill("what color is the object?")
            page.locator("#chat-input textarea").press("Enter")
            expect(page.locator('#chat-history [data-testid="user"]')).to_have_count(2)  # the image, the question
            expect(page.locator('#chat-history [data-testid="bot"]')).to_have_count(1)
            shots.append(_shot(page, out / "3-chat.png"))

            page.get_by_role("tab", name="Text-to-image").click()
            page.locator("#gen-run").click()
            expect(page.locator("#gen-note")).to_contain_text("Seed")
            expect(page.locator("#gen-gallery img").first).to_be_visible()
            shots.append(_shot(page, out / "4-text-to-image.png"))

            page.get_by_role("tab", name="Model").click()
            expect(page.locator("#model-table")).to_contain_text("pixel tokens")
            shots.append(_shot(page, out / "5-model.png"))
        finally:
            context.close()
    return shots


def _shot(page, path: Path) -> Path:
    # A component still showing its previous value while a new one runs carries the "pending" class; wait for the
    # queue to finish so the screenshot shows the result, not the greyed-out placeholder.
    page.wait_for_function("() => !document.querySelector('[class*=pending], [class*=generating]')",
                           timeout=120_000)
    page.wait_for_timeout(500)  # let images and plots finish painting
    page.screenshot(path=str(path), full_page=True)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from app.cli import launch
    from app.models import load_models
    from app.random_checkpoints import write_random_checkpoints
    from app.ui import build_demo

    paths = write_random_checkpoints(tmp_path_factory.mktemp("checkpoints"), micro=True)
    models = load_models(str(paths["tokenizer"]), str(paths["baseline"]), str(paths["unified"]),
                         teacher=str(tmp_path_factory.mktemp("no-teacher")), device="cpu")
    demo = build_demo(models)
    port = _free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_every_tab_in_a_browser(app_url, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    shots = capture(app_url, tmp_path)  # not into the working tree: SCREENSHOTS is the script's default
    assert [p.name for p in shots] == ["1-reconstruction.png", "2-clusters.png", "3-chat.png",
                                       "4-text-to-image.png", "5-model.png"]
    assert all(p.stat().st_size > 10_000 for p in shots)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Screenshot every tab of a running DualToken demo.")
    parser.add_argument("--url", default="http://127.0.0.1:7860", help="the running app")
    parser.add_argument("--out", type=Path, default=SCREENSHOTS, help="folder for the PNG screenshots")
    parser.add_argument("--image", type=Path, default=EXAMPLE, help="image to upload in Reconstruction and chat")
    args = parser.parse_args()
    for shot in capture(args.url, args.out, args.image):
        print(shot)
