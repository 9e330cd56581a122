"""A screenshot of serve.py's page after an answer, as the README shows it: the same headless Chromium
(Debian's `chromium` and `chromium-driver`, driven by Selenium) as tests/test_page.py.

    python tools/screenshot.py                                  # docs/page.png, the embedded tiny model
    python tools/screenshot.py --question "Describe the image." --image examples/shapes.png --out page.png

It starts serve.py on a free port, opens the page, chooses the image, asks, waits for the answer and its
chart, saves the window as PNG and stops the server.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


INSTALL = "apt-get install -y chromium chromium-driver"


def headless_chromium(width=900, height=1100):
    """Debian's Chromium, headless, under Selenium, with its own driver named: Selenium's manager, which
    would look a driver up online, is never asked."""
    import os
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                 "--hide-scrollbars"):
        options.add_argument(flag)
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        options.binary_location = binary
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)


def ask(browser, question, timeout=60):
    """Type a question on the page, send it, wait until its answer is complete; returns the answer's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    turns = len(browser.find_elements(By.CSS_SELECTOR, "#log .turn"))
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, timeout).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#log .turn .a[data-done]")) > turns
        or b.find_element(By.ID, "error").text)
    error = browser.find_element(By.ID, "error").text
    if error:
        raise RuntimeError(f"the page shows an error: {error}")
    return browser.find_elements(By.CSS_SELECTOR, "#log .turn .a")[-1].text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=str(ROOT / "examples" / "shapes.png"), help="(default: %(default)s)")
    p.add_argument("--question", default="Describe the image.", help="(default: %(default)s)")
    p.add_argument("--follow-up", default="", help="asked after it (default: none: the chart shows the first answer's split)")
    p.add_argument("--out", default=str(ROOT / "docs" / "page.png"), help="(default: %(default)s)")
    args = p.parse_args(argv)
    if not Path(args.image).is_file():
        p.error(f"image not found: {args.image}")
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        p.error("needs selenium: pip install -r requirements-dev.txt")
    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", "0"], stderr=subprocess.PIPE, text=True)
    browser = None
    try:
        line, deadline = "", time.monotonic() + 120
        while "ready" not in line:
            if time.monotonic() > deadline or server.poll() is not None:
                p.error("serve.py did not start: " + line.strip())
            line = server.stderr.readline()
        url = line.split(" at ")[1].split(" ")[0].removesuffix("/v1")
        try:
            browser = headless_chromium(820, 1000)
        except Exception as e:      # noqa: BLE001
            p.error(f"headless Chromium did not start ({type(e).__name__}); install it with: {INSTALL}")
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(Path(args.image).resolve()))
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "preview").is_displayed())
        ask(browser, args.question)
        if args.follow_up:
            ask(browser, args.follow_up)
        browser.save_screenshot(args.out)
        print(f"saved {args.out}")
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
