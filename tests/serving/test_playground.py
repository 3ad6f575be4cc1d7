"""The playground page at /: static (no CDN, no external URL), valid JavaScript, and its
streaming client, run under Node against the live server, shows exactly the text generate()
gives. (The DOM part runs in Chromium: test_playground_browser.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import httpx
import pytest
import test_openai_api
from test_openai_api import NEW, reference, source_ids

from prefixtune.serving.playground import SCRIPT

from test_serve import SOURCES

served, live = test_openai_api.served, test_openai_api.live

pytestmark = pytest.mark.usefixtures("one_thread")
NODE = shutil.which("node")


def test_the_page_is_served_and_self_contained(live):
    _, _, _, url = live
    reply = httpx.get(f"{url}/", timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", reply.text)  # nothing loaded from elsewhere
    assert not re.search(r"<(script|link)[^>]+(src|href)=", reply.text)
    assert "/v1/completions" in reply.text and "/v1/models" in reply.text


@pytest.mark.skipif(NODE is None, reason="needs node")
def test_the_pages_streaming_client_shows_the_generated_text(live, tmp_path):
    server, root, ids, url = live
    harness = tmp_path / "run.js"
    harness.write_text(
        SCRIPT
        + f"""
const pieces = [];
streamCompletion({json.dumps(url)}, "", "p2", {json.dumps(SOURCES[1])},
                 {{max_tokens: {NEW}, temperature: 0}}, (p) => pieces.push(p))
  .then((out) => console.log(JSON.stringify(Object.assign(out, {{pieces}}))))
  .catch((err) => {{ console.error(err); process.exit(1); }});
"""
    )
    done = subprocess.run([NODE, str(harness)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    want = reference(server, root, "p2", source_ids(server, SOURCES[1]))
    assert out["text"] == want == "".join(out["pieces"])
    assert out["tokens"] >= 1 and out["finish"] in ("stop", "length")
    assert out["totalMs"] >= (out["firstMs"] or 0)
