"""Phase 13: the chat page at ``/`` in headless Chromium (Playwright), against the real server and model.

The page must show the model's answer as it streams (the answer bubble grows in several steps) and end
with the same text ``LLM.chat`` gives (greedy). Needs the ``playwright`` package and a Chromium: the one
``playwright install chromium`` fetches, Debian's ``chromium`` package, or ``$MINIVLLM_CHROMIUM``.
Without one the test skips and says so, except on CI (``CI=true``, as ``.ci/run`` runs): there a missing
browser fails the run (``make test`` installs Debian's chromium when it runs as root).
"""

import os
import shutil
from pathlib import Path

import pytest

from minivllm.llm import LLM
from minivllm.sampling_params import SamplingParams
from minivllm.server import ServerThread, build_app

QUESTION = "What is the capital of France?"


def _chromium(playwright) -> str | None:
    """A Chromium executable: $MINIVLLM_CHROMIUM, Playwright's own download, or a system package."""
    candidates = [os.environ.get("MINIVLLM_CHROMIUM")]
    try:
        candidates.append(playwright.chromium.executable_path)
    except Exception:  # Playwright's browser was never downloaded
        pass
    candidates += [shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def _missing(reason: str) -> None:
    (pytest.fail if os.environ.get("CI", "").lower() in ("true", "1") else pytest.skip)(reason)


def test_chat_page_streams_the_answer_in_chromium():
    try:
        from playwright import sync_api
    except ImportError:
        _missing("the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        executable = _chromium(playwright)
        if executable is None:
            _missing("no Chromium: `playwright install chromium` could not download one and no system "
                        "package is installed (apt-get install chromium), nor is $MINIVLLM_CHROMIUM set")
        llm = LLM(device="cpu", max_model_len=256)
        ref = llm.chat([{"role": "user", "content": QUESTION}], SamplingParams(temperature=0, max_tokens=8),
                       use_tqdm=False)[0].outputs[0]
        want = ref.text
        app = build_app(llm.engine, model_name="smollm2")
        with ServerThread(app) as server:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(server.url + "/")
                page.wait_for_function("document.getElementById('model').textContent === 'smollm2'")
                page.fill("#max_tokens", "8")
                page.fill("#temperature", "0")
                page.evaluate("""() => {   // record every text the answer bubble shows while it streams
                    window.seen = [];
                    new MutationObserver(() => {
                        const a = document.querySelector('.assistant');
                        if (a) window.seen.push(a.textContent);
                    }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
                }""")
                page.fill("#prompt", QUESTION)
                page.press("#prompt", "Enter")
                page.wait_for_selector(".assistant[data-state=done]", timeout=60_000)
                answer = page.text_content(".assistant")
                seen = [s for s in page.evaluate("window.seen") if s]
                stats = page.text_content("#stats")
                errors = page.query_selector_all(".error")
                if os.environ.get("MINIVLLM_SCREENSHOTS"):  # a folder to look at the page in
                    page.screenshot(path=str(Path(os.environ["MINIVLLM_SCREENSHOTS"]) / "13_chat_page.png"))
            finally:
                browser.close()
        assert answer == want
        assert len(set(seen)) >= 3 and all(want.startswith(s) for s in seen), "text should arrive piece by piece"
        assert not errors
        assert stats.startswith(f"{len(ref.token_ids)} tokens in") and stats.endswith(f"({ref.finish_reason})"), stats
    llm.engine.check_no_leaks()
