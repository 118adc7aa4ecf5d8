"""`python examples/app.py` in a real browser: the test starts the app (the shipped digits model on the CPU) on a free
localhost port and drives Debian's Chromium, headless, with Playwright: Generate and In-paint produce non-blank
images of the requested size, a result goes on to Refine, and invalid input shows the pipeline's message on the page.

Needs the `test` extra (gradio, through `app`, and playwright) and Debian's `chromium` at /usr/bin/chromium
(`.ci/run` installs both; no browser is downloaded). Without them the tests skip, or fail where
FLEXVAR_REQUIRE_ALL_TESTS=1, which `.ci/run` sets so that CI never skips them. The page's screenshot is saved as
`app.png` in the test's temporary folder, and also, small, at the path in FLEXVAR_APP_SCREENSHOT if set (the
README's picture):

    FLEXVAR_APP_SCREENSHOT=docs/images/app.png python -m pytest -q tests/test_app_browser.py
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, require

CHROMIUM = "/usr/bin/chromium"
# Headless as root in a sandbox without outside network: no sandbox, no GPU, no background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT_VARIABLE = "FLEXVAR_APP_SCREENSHOT"
START_TIMEOUT_S = 240  # loading torch, gradio and the model on a busy 2-core machine
RESULT_TIMEOUT_MS = 180_000

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the browser fixture
    sync_playwright = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`python examples/app.py --port PORT --device cpu` running until the module's tests end; its URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", GRADIO_SERVER_NAME="127.0.0.1",
               GRADIO_TEMP_DIR=str(log_path.parent / "gradio"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")])))
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / "examples" / "app.py"), "--port", str(port),
                                    "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"examples/app.py exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"examples/app.py did not answer in {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-4000:]


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    """A headless Debian Chromium with a fresh profile; requests that leave localhost are refused and recorded in
    `context.outside_requests`."""
    require(sync_playwright is not None, "playwright", "pip install -e '.[test]'")
    require(Path(CHROMIUM).is_file(), f"Chromium ({CHROMIUM})", "apt-get install chromium")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900},
        )
        context.outside_requests = []

        def local_only(route):
            if route.request.url.startswith(("http://127.0.0.1", "data:", "blob:")):
                route.continue_()
            else:
                context.outside_requests.append(route.request.url)
                route.abort()

        context.route("**/*", local_only)
        yield context
        context.close()


@pytest.fixture
def page(browser_context, app_url):
    page = browser_context.new_page()
    page.set_default_timeout(60_000)
    expect.set_options(timeout=30_000)
    page.goto(app_url)
    page.get_by_role("button", name="Generate", exact=True).wait_for()
    yield page
    page.close()
    assert browser_context.outside_requests == []


def pick_classes(page, tab: str, searches: list[str]) -> None:
    """Clear a tab's class picker and pick each class by typing a search and clicking the first match."""
    picker = page.locator(f"#{tab}-classes")
    picker.get_by_title("Clear").click()
    field = picker.locator("input")
    for search in searches:
        field.fill(search)
        page.get_by_role("option").first.click()


def set_number(page, selector: str, value) -> None:
    field = page.locator(selector).locator("input[type=number]")
    field.fill(str(value))
    field.press("Tab")


def gallery_images(page, gallery: str, count: int) -> list[Image.Image]:
    """Wait for `count` images in a result gallery (a single one is shown twice: preview and thumbnail) and download
    them as the page shows them."""
    selector = f"#{gallery}-gallery img"
    distinct_sources = "selector => [...new Set([...document.querySelectorAll(selector)].map(image => image.src))]"
    page.wait_for_function(f"selector => ({distinct_sources})(selector).length === {count}", arg=selector,
                           timeout=RESULT_TIMEOUT_MS)
    sources = page.evaluate(distinct_sources, selector)
    return [Image.open(io.BytesIO(page.request.get(source).body())).convert("RGB") for source in sources]


def assert_not_blank(image: Image.Image) -> None:
    assert np.asarray(image, dtype=np.float32).std() > 10, "a blank (single-colour) image"


def save_screenshot(page, tmp_path: Path) -> None:
    """The page as `app.png` in `tmp_path`, and as a small palette PNG at $FLEXVAR_APP_SCREENSHOT if set."""
    raw = tmp_path / "app.png"
    page.screenshot(path=str(raw), full_page=True)
    target = os.environ.get(SCREENSHOT_VARIABLE)
    if target:
        target = Path(target)
        small = Image.open(raw).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        temporary = target.with_name(target.name + ".tmp")
        small.save(temporary, format="PNG", optimize=True)
        temporary.replace(target)


def test_generate_refine_and_a_bad_size(page, tmp_path):
    # Classes searched by name and by id, 2 images each, the 2:1 preset: four 96x192 images.
    pick_classes(page, "generate", ["seven", "3"])
    set_number(page, "#images-per-class", 2)
    page.get_by_label("2:1").check()
    expect(page.locator("#generate-width input")).to_have_value("192")
    page.get_by_role("button", name="Generate", exact=True).click()
    images = gallery_images(page, "generate", 4)
    for image in images:
        assert image.size == (192, 96)
        assert_not_blank(image)
    settings = page.locator("#generate-settings")
    expect(settings).to_contain_text(re.compile(r"output 96x192 · \d+ scales \(token grids 1x1, .*, 12x24\)"))
    expect(page.locator("#generate-gallery")).to_contain_text("7, seven")
    save_screenshot(page, tmp_path)

    # The first result goes on to Refine (as the default class, 2 images: the sampling settings are shared).
    page.get_by_role("button", name="Refine the selected image").click()
    expect(page.locator("#refine-image img")).to_have_count(1)
    page.get_by_role("button", name="Refine", exact=True).click()
    for image in gallery_images(page, "refine", 2):
        assert image.size == (192, 96)
        assert_not_blank(image)
    expect(page.locator("#refine-settings")).to_contain_text("strength 0.6 · output 96x192")

    # A size that is not a multiple of the token size: the pipeline's message, no traceback.
    page.get_by_role("tab", name="Generate").click()
    set_number(page, "#generate-height", 100)
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.get_by_text("must each be a positive multiple of 8").first).to_be_visible()
    assert "Traceback" not in page.content()


def test_inpaint_with_the_brush(page, tmp_path):
    source = np.zeros((96, 96, 3), dtype=np.uint8)
    source[:, :48] = (30, 60, 150)
    source[:, 48:] = (200, 120, 40)
    Image.fromarray(source).save(tmp_path / "source.png")

    page.get_by_role("tab", name="In-paint").click()
    editor = page.locator("#inpaint-editor")
    editor.get_by_role("button", name="Upload").wait_for()
    editor.locator("input[type=file]").set_input_files(tmp_path / "source.png")
    expect(editor.get_by_text("Upload an image")).to_have_count(0)
    pick_classes(page, "inpaint", ["eight"])
    page.get_by_label("Keep unmasked pixels").check()

    # Nothing painted yet: the pipeline's empty-mask message.
    page.get_by_role("button", name="In-paint", exact=True).click()
    expect(page.get_by_text("has no white pixel").first).to_be_visible()

    # Paint a vertical stroke down the right half of the picture with the brush.
    editor.get_by_role("button", name="Brush", exact=True).click()
    box = editor.locator("canvas").first.bounding_box()
    x = box["x"] + box["width"] * 0.75
    page.mouse.move(x, box["y"] + box["height"] * 0.1)
    page.mouse.down()
    page.mouse.move(x, box["y"] + box["height"] * 0.9, steps=12)
    page.mouse.up()
    page.get_by_role("button", name="In-paint", exact=True).click()

    result = gallery_images(page, "inpaint", 1)[0]
    assert result.size == (96, 96)
    assert_not_blank(result)
    difference = np.abs(np.asarray(result, dtype=np.int16) - source)
    assert difference[:, :40].max() <= 1  # the unpainted left part: the input's pixels, kept
    assert difference[:, 56:].mean() > 5  # the painted part: regenerated
    expect(page.locator("#inpaint-settings")).to_contain_text("unmasked pixels kept · output 96x96")
