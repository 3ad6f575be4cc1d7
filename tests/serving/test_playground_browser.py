"""The playground page in a real headless browser: Playwright drives the system's Chromium
(Debian's `chromium` package; `make test` installs it) against a live server on 127.0.0.1. Two
prefixes are picked, an input typed and run; each column must stream (several updates) to exactly
the text the same request gets through the API, with its token count. A screenshot is kept."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
import test_openai_api
from playwright.sync_api import sync_playwright

from test_serve import SOURCES

served, live = test_openai_api.served, test_openai_api.live

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
PICKED = ("p1", "p3")
MAX_TOKENS = 12
WAIT_MS = 60_000

# Counts the updates of each column's <pre> (one per streamed piece) as they happen.
WATCH = """() => {
  window.updates = {};
  new MutationObserver((records) => {
    for (const r of records) {
      const pre = r.target.nodeName === "PRE" ? r.target : r.target.parentElement;
      if (!pre || pre.nodeName !== "PRE") continue;
      const model = pre.parentElement.querySelector("h2").textContent;
      window.updates[model] = (window.updates[model] || 0) + 1;
    }
  }).observe(document.getElementById("columns"),
             {childList: true, characterData: true, subtree: true});
}"""
FINISHED = """(n) => {
  const stats = [...document.querySelectorAll("#columns section p")];
  return stats.length === n && stats.every((p) => p.textContent.length > 0);
}"""

COLUMNS = """(sections) => sections.map((s) => ({model: s.querySelector("h2").textContent,
  text: s.querySelector("pre").textContent, stats: s.querySelector("p").textContent}))"""


def _chromium() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; required in CI)")


def api_completion(url: str, model: str, prompt: str) -> tuple[str, int]:
    """(text, completion tokens) of the page's request, sent whole through the API."""
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    return out["choices"][0]["text"], out["usage"]["completion_tokens"]


def test_two_prefixes_stream_the_apis_text_in_chromium(live, tmp_path):
    chromium = _chromium()
    _, _, ids, url = live
    assert set(PICKED) <= set(ids)
    prompt = SOURCES[4]
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(chromium), headless=True,
            args=FLAGS, viewport={"width": 1100, "height": 700})  # fmt: skip
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(f"{url}/", timeout=WAIT_MS)
            for model in PICKED:
                page.check(f'#models input[value="{model}"]', timeout=WAIT_MS)
            page.fill("#input", prompt)
            page.fill("#max", str(MAX_TOKENS))
            page.evaluate(WATCH)
            page.click("#run")
            page.wait_for_function(FINISHED, arg=len(PICKED), timeout=WAIT_MS)
            columns = page.eval_on_selector_all("#columns section", COLUMNS)
            updates = page.evaluate("window.updates")
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert [c["model"] for c in columns] == list(PICKED)
    for column in columns:
        text, tokens = api_completion(url, column["model"], prompt)
        assert column["text"] == text and text, column
        assert re.fullmatch(rf"{tokens} tokens, first \d+ ms, total \d+ ms, (stop|length)",
                            column["stats"]), column  # fmt: skip
        assert updates.get(column["model"], 0) >= 2, (column, updates)  # streamed, not at once
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
