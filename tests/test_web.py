"""The chat page (scripts/web/) in a real headless Chromium driven by Selenium, against a real server on
the tiny chat model (tests/tiny_chat.py): streaming, the think block, tool calls, stop, text never
injected as HTML, history, errors. Needs Debian's chromium + chromium-driver (.ci/run installs them)."""
import shutil
import tempfile

import pytest

from tiny_chat import (HELLO, HELLO_REPLY, MATH, MATH_ANSWER, MATH_RESULT, SCRIPT, SCRIPT_REPLY, SING, THINK, THINK_ANSWER,
                       THINK_REASONING)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM),
    reason="the browser test needs chromium, chromedriver and selenium: apt-get install -y chromium chromium-driver && "
           "pip install selenium (what .ci/run does)")
WAIT = 120  # seconds: only a guard against a hang, never a speed check


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1200,900",
                 f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path_factory.mktemp('chromium'))}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(lambda d: condition(d), message=f"waiting for {what}")


def by_css(driver, selector):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, selector)


def set_value(driver, element_id, value):
    el = by_css(driver, f"#{element_id}")[0]
    el.clear()
    el.send_keys(str(value))


@pytest.fixture(scope="module")
def loaded(browser, chat_server):
    browser.get(chat_server["base"] + "/")
    wait_for(browser, lambda d: "tiny-chat" in by_css(d, "#model-info")[0].text, "the model's name from /v1/models")
    return browser


@pytest.fixture
def page(loaded):
    """The page on a new chat, greedy, tools off, model-default thinking."""
    by_css(loaded, "#new-chat")[0].click()
    set_value(loaded, "temperature", 0)
    set_value(loaded, "max-tokens", 200)
    if by_css(loaded, "#tools")[0].is_selected():
        by_css(loaded, "#tools")[0].click()
    loaded.execute_script("document.getElementById('thinking').value = 'default'")
    # record the body of every request the page sends
    loaded.execute_script("""
        window.__sent = [];
        if (!window.__fetch) window.__fetch = window.fetch;
        window.fetch = (url, options) => {
          if (options && options.body) window.__sent.push(JSON.parse(options.body));
          return window.__fetch(url, options);
        };""")
    return loaded


def sent(driver):
    return driver.execute_script("return window.__sent")


def busy(driver):
    return not by_css(driver, "#stop")[0].get_attribute("hidden")


def send(driver, text, wait=True):
    by_css(driver, "#input")[0].send_keys(text)
    by_css(driver, "#send")[0].click()
    if wait:
        wait_for(driver, lambda d: not busy(d) and by_css(d, "#send")[0].is_enabled(), f"the reply to {text!r}")
    return by_css(driver, ".turn.assistant")[-1]


def content_of(turn):
    """The text of the turn's replies (tool calls and think parts apart)."""
    return "".join(el.get_attribute("textContent") for el in turn.find_elements("css selector", ".content"))


def test_page_shows_the_model_name_stage_and_size(loaded):
    info = by_css(loaded, "#model-info")[0].text
    assert "tiny-chat" in info and "stage full_sft" in info and "parameters" in info and "64 hidden × 2 layers" in info
    assert "tools: calculator" in info
    assert by_css(loaded, "#tools-setting")[0].is_displayed()
    # on a server without tools the switch is hidden: the page's CSS must not show a hidden element
    loaded.execute_script("document.getElementById('tools-setting').hidden = true")
    assert not by_css(loaded, "#tools-setting")[0].is_displayed()
    loaded.execute_script("document.getElementById('tools-setting').hidden = false")


def test_reply_streams_into_the_page(page):
    # record every text the reply's element shows while it streams
    page.execute_script("""
        window.__seen = [];
        new MutationObserver(() => {
          const all = document.querySelectorAll('.turn.assistant .content');
          if (all.length) window.__seen.push(all[all.length - 1].textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    turn = send(page, HELLO)
    assert content_of(turn) == HELLO_REPLY
    seen = [s for s in page.execute_script("return window.__seen") if s]
    partial = sorted({s for s in seen if s != HELLO_REPLY}, key=len)
    assert len(partial) >= 3, seen  # the text arrived in pieces, not at once
    assert all(HELLO_REPLY.startswith(s) for s in partial)


def test_think_part_is_shown_apart_and_folds(page):
    turn = send(page, THINK)
    think = turn.find_elements("css selector", "details.think")[0]
    assert think.is_displayed()
    assert think.find_element("css selector", ".think-text").get_attribute("textContent") == THINK_REASONING
    assert content_of(turn) == THINK_ANSWER  # the answer holds no thinking
    assert think.get_attribute("open") is None  # folded once the answer came
    think.find_element("css selector", "summary").click()
    assert think.get_attribute("open") is not None
    request = sent(page)[-1]
    assert (request["temperature"], request["max_tokens"], request["stream"]) == (0, 200, True)
    assert "enable_thinking" not in request and "server_tools" not in request

    # thinking switched on: the prompt pre-fills <think>, the server still splits the reply right
    page.execute_script("document.getElementById('thinking').value = 'on'")
    by_css(page, "#new-chat")[0].click()
    turn = send(page, THINK)
    assert turn.find_element("css selector", ".think-text").get_attribute("textContent") == THINK_REASONING
    assert content_of(turn) == THINK_ANSWER
    assert sent(page)[-1]["enable_thinking"] is True


def test_a_script_tag_in_a_reply_is_shown_as_text(page):
    from selenium.common.exceptions import NoAlertPresentException
    turn = send(page, SCRIPT)
    assert content_of(turn) == SCRIPT_REPLY
    assert "<script>alert(1)</script>" in turn.text  # shown, as text
    assert by_css(page, "#messages script") == []  # not an element
    with pytest.raises(NoAlertPresentException):
        page.switch_to.alert.text


def test_stop_ends_a_generation(page):
    set_value(page, "max-tokens", 2000)
    turn = send(page, SING, wait=False)
    wait_for(page, lambda d: content_of(turn).count("la") >= 5, "the song to start")
    by_css(page, "#stop")[0].click()
    wait_for(page, lambda d: not busy(d), "the page to stop")
    sung = content_of(turn)
    note = turn.find_element("css selector", ".note").text
    assert note.startswith("stopped"), note  # not "cut off at max tokens": it was stopped midway
    assert sung.count("la") < 2000
    # the stopped reply is kept as it is, and the server takes the next message
    history = page.execute_script("return state.history")
    assert history[-1] == {"role": "assistant", "content": sung}
    by_css(page, "#new-chat")[0].click()
    assert content_of(send(page, HELLO)) == HELLO_REPLY


def test_tool_calls_and_results_are_shown(page):
    by_css(page, "#tools")[0].click()  # on: the server runs the calculator for the page
    turn = send(page, MATH)
    assert sent(page)[-1]["server_tools"] is True
    box = turn.find_element("css selector", ".tool-call")
    assert box.find_element("css selector", ".tool-head").text == "tool call: calculator"
    assert box.find_element("css selector", ".tool-args").text == '{"expression": "12*7"}'
    assert box.find_element("css selector", ".tool-result").text == "→ " + MATH_RESULT
    assert content_of(turn) == MATH_ANSWER and "<tool_call>" not in turn.text
    history = page.execute_script("return state.history")
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[2]["tool_call_id"] == history[1]["tool_calls"][0]["id"] and history[2]["content"] == MATH_RESULT


def test_history_goes_with_each_message_and_new_chat_clears_it(page):
    send(page, HELLO)
    second = content_of(send(page, SCRIPT))
    first_request, second_request = sent(page)
    assert first_request["messages"] == [{"role": "user", "content": HELLO}]
    assert second_request["messages"] == [{"role": "user", "content": HELLO}, {"role": "assistant", "content": HELLO_REPLY},
                                          {"role": "user", "content": SCRIPT}]
    assert page.execute_script("return state.history") == second_request["messages"] + [{"role": "assistant", "content": second}]
    assert len(by_css(page, ".turn")) == 4
    by_css(page, "#new-chat")[0].click()
    assert by_css(page, ".turn") == [] and page.execute_script("return state.history") == []


def test_errors_are_readable(page, chat_server):
    # a bad request: more tokens than the server's max_seq_len
    set_value(page, "max-tokens", 5000)
    turn = send(page, HELLO)
    error = by_css(page, "#error")[0]
    assert error.is_displayed() and "(400)" in error.text and "max_tokens 5000" in error.text
    assert turn.find_element("css selector", ".error").text == error.text
    assert by_css(page, "#input")[0].get_attribute("value") == HELLO  # back in the box, to try again
    assert page.execute_script("return state.history") == []

    # the server cannot be reached (the browser's network switched off)
    set_value(page, "max-tokens", 50)
    by_css(page, "#input")[0].clear()
    page.execute_cdp_cmd("Network.enable", {})
    page.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                              "uploadThroughput": -1})
    try:
        send(page, HELLO)
        assert "Cannot reach the server" in by_css(page, "#error")[0].text
    finally:
        page.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                                  "uploadThroughput": -1})
    by_css(page, "#input")[0].clear()
    assert content_of(send(page, HELLO)) == HELLO_REPLY
    assert not by_css(page, "#error")[0].is_displayed()
