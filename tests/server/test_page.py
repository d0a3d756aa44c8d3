"""The web page in a real browser: Debian's Chromium, driven by Playwright over the system browser (nothing is
downloaded). It picks the demo model, types a prompt, presses Ctrl+Enter, sees the progress bar move and the
picture appear in the gallery, then drops that picture in for image-to-image. Screenshots go to the test's
temporary folder."""
import base64
import io
import shutil

import httpx
import pytest
from PIL import Image

from server_testing import red_share

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the page's test needs playwright (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (Debian: apt-get install chromium)")
PROMPT = "a red circle on a white background"


@pytest.fixture
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            yield tab
        finally:
            browser.close()
            httpx.post(server.api + "/options", json={"sd_model_checkpoint": "tiny"}, timeout=120)


def progress_values(page, until: str) -> set[int]:
    """The progress bar's values, sampled until `until` (a selector) appears."""
    seen = set()
    for _ in range(1200):
        seen.add(int(page.get_attribute("#progress", "aria-valuenow")))
        if page.locator(until).count():
            return seen
        page.wait_for_timeout(50)
    raise AssertionError(f"{until} did not appear; the page says {page.inner_text('#status')!r}")


def test_the_page_generates_and_shows_progress(page, server, tmp_path):
    page.goto(server.url)
    page.wait_for_function("document.querySelectorAll('#model option').length == 2")
    page.select_option("#model", "demo")
    page.wait_for_function("document.querySelector('#status').textContent == 'demo loaded'")
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "60")
    page.fill("#cfg_scale", "5")
    page.fill("#seed", "1")
    page.screenshot(path=tmp_path / "before.png")
    page.keyboard.press("Control+Enter")
    page.wait_for_function("Number(document.querySelector('#progress').getAttribute('aria-valuenow')) > 20")
    page.screenshot(path=tmp_path / "during.png")
    seen = progress_values(page, "#gallery figure")
    page.screenshot(path=tmp_path / "after.png")
    assert any(0 < value < 100 for value in seen), seen  # the bar moved while the image was made
    caption = page.inner_text("#gallery figcaption")
    assert caption.startswith(PROMPT) and "Seed: 1," in caption and "Model: demo" in caption
    shown = page.get_attribute("#gallery img", "src")
    image = Image.open(io.BytesIO(base64.b64decode(shown.partition(",")[2])))
    assert image.size == (64, 64) and red_share(image) > 0.05  # a red circle
    assert page.get_attribute("#gallery a.download", "download") == "coreml-sd-1.png"

    # drop the picture back in: image-to-image from it
    page.evaluate("""async (url) => {
        const blob = await (await fetch(url)).blob();
        const transfer = new DataTransfer();
        transfer.items.add(new File([blob], "circle.png", { type: "image/png" }));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
    }""", shown)
    page.wait_for_selector("#init-image:not([hidden])")
    page.fill("#steps", "10")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery figure').length == 2")
    page.screenshot(path=tmp_path / "img2img.png", full_page=True)
    assert "Denoising strength: 0.75" in page.inner_text("#gallery figure:first-child figcaption")
    print(f"screenshots in {tmp_path}")
