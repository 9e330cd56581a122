"""serve.py's page at /, in a real browser: headless Chromium driven by Selenium (Debian's `chromium` and
`chromium-driver`). It uploads examples/shapes.png, asks, and must show infer.py's answer streamed in,
then the chart of that answer's time split with four positive figures and the image's token count; a
follow-up about the same image continues the conversation (the server prefills only its turn).

Under CI (`CI` set, as .ci/run runs) a browser that cannot start fails the test; elsewhere the test
skips and prints the line that installs one.
"""

import os
from pathlib import Path

import pytest

import serve
from support import chat as CH
from support import loading
from screenshot import INSTALL, ask, headless_chromium
from test_serve import TINY, running

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "examples" / "shapes.png"
pytestmark = pytest.mark.inference


def chromium():
    """A headless Chromium under Selenium, or a skip (outside CI) / failure (in CI) naming the install line."""
    try:
        return headless_chromium()
    except Exception as e:      # noqa: BLE001 - whatever stops the browser, the message says how to get one
        if os.environ.get("CI"):
            pytest.fail(f"headless Chromium did not start under CI ({type(e).__name__}: {str(e)[:300]})")
        pytest.skip(f"no headless Chromium here ({type(e).__name__}); install it with: {INSTALL}")


@pytest.fixture(scope="module")
def page():
    """(browser, the server's URL, the app, the tiny model) for the module."""
    tiny = loading.load_model(TINY)
    app = serve.create_app(*tiny, "fastvlm-tiny")
    pool, answer = app.state.pool, app.state.pool.answer
    app.state.results = []

    def recorded(*args, **kw):                  # each answer's timing, as the server sent it
        app.state.results.append(answer(*args, **kw))
        return app.state.results[-1]
    pool.answer = recorded
    browser = chromium()
    try:
        with running(app) as url:
            yield browser, url, app, tiny
    finally:
        browser.quit()


def chart(browser):
    from selenium.webdriver.common.by import By

    rows = browser.find_elements(By.CSS_SELECTOR, "#bars .row")
    return {r.get_attribute("data-name"): float(r.get_attribute("data-value")) for r in rows}


def fresh(browser, url):
    """The page loaded anew, its model named, the example image chosen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text == "fastvlm-tiny")
    browser.find_element(By.ID, "file").send_keys(str(SHAPES))
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "preview").is_displayed())


def test_the_page_answers_a_question_about_an_uploaded_image_and_shows_the_time_split(page):
    from selenium.webdriver.common.by import By

    browser, url, app, (model, tokenizer, _) = page
    fresh(browser, url)
    answer = ask(browser, "Describe the image.")
    assert answer == CH.answer(model, tokenizer, SHAPES, "Describe the image.") and len(answer.split()) >= 3
    figures = chart(browser)
    sent = app.state.results[-1].timing
    assert figures == {"preprocess": sent["preprocess_ms"], "vision encoder": sent["encoder_ms"],
                       "LLM prefill": sent["prefill_ms"], "decode": sent["decode_tokens_per_s"]}
    assert all(v > 0 for v in figures.values()), figures
    assert browser.find_element(By.ID, "chart").is_displayed()
    assert browser.find_element(By.ID, "image-tokens").text == "16"


def test_a_follow_up_continues_the_conversation(page):
    browser, url, app, (model, tokenizer, config) = page
    fresh(browser, url)
    ask(browser, "Describe the image.")
    answer = ask(browser, "How many shapes are there?")
    chat = CH.Chat(model, tokenizer, CH.load_image(SHAPES), config)
    chat.ask("Describe the image.")
    assert answer == chat.ask("How many shapes are there?")
    assert app.state.pool.last_prefill_tokens == chat.timing.prompt_tokens < 20      # only its own turn


def test_server_errors_are_shown_as_messages(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, url, app, _ = page
    fresh(browser, url)
    browser.execute_script("document.getElementById('question').value = arguments[0]", "word " * 9000)  # typing
    #                                                    45,000 characters one by one would take minutes
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "error").text)
    assert "context" in browser.find_element(By.ID, "error").text
    assert browser.find_elements(By.CSS_SELECTOR, "#log .turn") == []


def test_the_page_works_with_an_api_key(page):
    """With --api-key the page's first request fails (no key yet); once the key is entered the model is
    named and questions are answered."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, _, _, tiny = page
    app = serve.create_app(*tiny, "fastvlm-tiny", api_key="s3cret")
    with running(app) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda b: "API key" in b.find_element(By.ID, "error").text)
        browser.find_element(By.TAG_NAME, "summary").click()
        browser.find_element(By.ID, "key").send_keys("s3cret")
        browser.find_element(By.ID, "file").send_keys(str(SHAPES))
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "preview").is_displayed())
        assert ask(browser, "What color is the circle?") == "red"
        assert browser.find_element(By.ID, "model").text == "fastvlm-tiny"
