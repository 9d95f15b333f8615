"""The chat page at / in a real browser (headless Chromium driven by selenium): a question typed in streams an
answer equal to the API's at temperature 0, the conversation carries into the next turn, the stop button aborts
the stream and the server frees the request, new-conversation clears, code blocks show as code. A screenshot is
saved under the test's tmp dir. Skips, saying why, where Chromium or its driver is not installed
(`apt-get install chromium chromium-driver`, as .ci/run does)."""

from __future__ import annotations

import shutil
import time

import pytest

from conftest import needs_shared

pytestmark = needs_shared

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (the dev extra has it)"
)
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_serve import make_model_dir, request, start_server, stop_server  # noqa: E402

KEY = "browser-key"
NAME = "tiny-chat"
BROWSER = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_model_dir(tmp_path_factory.mktemp("browser") / NAME)
    proc, url, _ = start_server(
        ["--model", str(folder), "--served-model-name", NAME, "--api-key", KEY, "--max-model-len", "512"]
        + ["--kv-cache-memory", "32MiB", "--max-num-seqs", "4"]
    )
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if BROWSER is None or DRIVER is None:
        pytest.skip("no Chromium and chromedriver here: apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    yield driver
    driver.quit()


def api_answer(url: str, messages: list[dict], max_tokens: int) -> str:
    body = {"model": NAME, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    status, answer = request(url, "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert status == 200, answer
    return answer["choices"][0]["message"]["content"]


def ask(driver, question: str):
    """Type the question, press Send, wait for the streamed answer to finish; the answer's element."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    box = driver.find_element(By.ID, "input")
    box.send_keys(question)
    driver.find_element(By.ID, "send").click()
    wait = WebDriverWait(driver, 120)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) > before)
    el = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    wait.until(lambda d: el.get_attribute("data-done") == "true")
    return el


def set_field(driver, field: str, value: str) -> None:
    el = driver.find_element(By.ID, field)
    el.clear()
    el.send_keys(value)


def test_chat_page_streams_the_api_answer_keeps_the_conversation_and_stops(server, browser, tmp_path):
    url, driver = server, browser
    driver.get(url + "/")
    assert driver.title == "qwen15 chat"
    set_field(driver, "api-key", KEY)
    set_field(driver, "temperature", "0")
    set_field(driver, "max-tokens", "12")
    system = driver.find_element(By.ID, "system").get_attribute("value")
    driver.execute_script(
        "window.updates = 0; new MutationObserver(() => window.updates++).observe("
        "document.getElementById('messages'), {subtree: true, childList: true, characterData: true});"
    )

    q1 = "What is the capital of France?"
    el = ask(driver, q1)
    a1 = el.get_attribute("data-raw")
    history = [{"role": "system", "content": system}, {"role": "user", "content": q1}]
    assert a1 and a1 == api_answer(url, history, 12)
    assert el.get_attribute("data-finish") in ("stop", "length")
    assert driver.execute_script("return window.updates") > 3  # it streamed: the answer grew chunk by chunk
    assert driver.find_element(By.ID, "model-name").text == NAME

    q2 = "And of Italy?"
    a2 = ask(driver, q2).get_attribute("data-raw")  # the page sends the whole conversation
    history += [{"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    assert a2 == api_answer(url, history, 12)
    driver.save_screenshot(str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").stat().st_size > 10_000

    # Stop: abort a long answer mid-stream; the server cancels the request and frees its slot
    before = metrics_with_key(url)
    set_field(driver, "max-tokens", "400")
    answers = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    driver.find_element(By.ID, "input").send_keys("Tell me a long story.")
    driver.find_element(By.ID, "send").click()
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) > answers)
    el = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    wait.until(lambda d: el.get_attribute("data-raw") or el.get_attribute("data-done"))
    assert el.get_attribute("data-raw"), el.text  # the answer is streaming
    driver.find_element(By.ID, "stop").click()
    wait.until(lambda d: el.get_attribute("data-done") == "true")
    assert el.get_attribute("data-finish") == "stopped"
    deadline = time.monotonic() + 20
    while True:
        m = metrics_with_key(url)
        if m["qwen15_requests_running"] == 0 and m["qwen15_kv_slots_used"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m["qwen15_sequences_cancelled_total"] == before["qwen15_sequences_cancelled_total"] + 1
    assert m["qwen15_generation_tokens_total"] - before["qwen15_generation_tokens_total"] < 300

    driver.find_element(By.ID, "new").click()
    assert driver.find_elements(By.CSS_SELECTOR, ".message") == []
    html = driver.execute_script("return renderMarkdown('use `x` here\\n```py\\nif a < 1:\\n    pass\\n```')")
    assert '<pre><code class="language-py">if a &lt; 1:\n    pass\n</code></pre>' in html
    assert "<code>x</code>" in html


def metrics_with_key(url: str) -> dict[str, float]:
    from qwen15.serve.metrics import parse

    status, text = request(url, "GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200
    return parse(text)
