"""GET /: the playground, one static page (no build step, no CDN) that streams the same input
through up to four prefixes side by side, with token counts and latencies, over the OpenAI
routes. Its `streamCompletion` function also runs under Node (tests drive it there)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

SCRIPT = r"""
async function streamCompletion(base, key, model, prompt, options, onText) {
  // POST /v1/completions with stream: true; calls onText(piece) per chunk; resolves to
  // {text, tokens, firstMs, totalMs, finish}.
  const started = performance.now();
  const headers = {"Content-Type": "application/json"};
  if (key) headers["Authorization"] = "Bearer " + key;
  const body = Object.assign({model, prompt, stream: true,
                              stream_options: {include_usage: true}}, options);
  const reply = await fetch(base + "/v1/completions", {method: "POST", headers,
                                                        body: JSON.stringify(body)});
  if (!reply.ok) {
    const error = await reply.json().catch(() => ({}));
    throw new Error((error.error && error.error.message) || ("HTTP " + reply.status));
  }
  const reader = reply.body.getReader();
  const decoder = new TextDecoder();  // stream: true keeps split UTF-8 sequences whole
  const out = {text: "", tokens: 0, firstMs: null, totalMs: null, finish: null};
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") { out.totalMs = performance.now() - started; return out; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) out.tokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices || []) {
        if (choice.text) {
          if (out.firstMs === null) out.firstMs = performance.now() - started;
          out.text += choice.text;
          onText(choice.text);
        }
        if (choice.finish_reason) out.finish = choice.finish_reason;
      }
    }
  }
  out.totalMs = performance.now() - started;
  return out;
}

if (typeof document !== "undefined") {
  const $ = (id) => document.getElementById(id);
  const key = () => $("key").value.trim();

  async function loadModels() {
    const headers = key() ? {"Authorization": "Bearer " + key()} : {};
    const reply = await fetch("/v1/models", {headers});
    const list = $("models");
    list.textContent = "";
    if (!reply.ok) { list.textContent = "GET /v1/models: HTTP " + reply.status; return; }
    for (const model of (await reply.json()).data) {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox"; box.value = model.id;
      box.addEventListener("change", () => {
        const picked = list.querySelectorAll("input:checked");
        if (picked.length > 4) box.checked = false;  // at most four columns
      });
      label.append(box, " " + model.id + (model.length ? " (" + model.length + ")" : ""));
      list.append(label);
    }
  }

  async function run() {
    const picked = [...$("models").querySelectorAll("input:checked")].map((b) => b.value);
    const columns = $("columns");
    columns.textContent = picked.length ? "" : "pick at least one prefix above";
    const options = {max_tokens: Number($("max").value), temperature: Number($("temp").value)};
    await Promise.all(picked.map(async (model) => {
      const column = document.createElement("section");
      const title = document.createElement("h2");
      const text = document.createElement("pre");
      const stats = document.createElement("p");
      title.textContent = model;
      column.append(title, text, stats);
      columns.append(column);
      try {
        const out = await streamCompletion("", key(), model, $("input").value, options,
                                           (piece) => { text.textContent += piece; });
        stats.textContent = out.tokens + " tokens, first " + Math.round(out.firstMs ?? 0) +
          " ms, total " + Math.round(out.totalMs) + " ms, " + out.finish;
      } catch (err) {
        stats.textContent = "error: " + err.message;
      }
    }));
  }

  $("reload").addEventListener("click", loadModels);
  $("run").addEventListener("click", run);
  loadModels();
}
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>prefixtune playground</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; margin: 1.5rem; }
#models label { margin-right: 1rem; white-space: nowrap; }
textarea { width: 100%; height: 5rem; }
#columns { display: grid; grid-template-columns: repeat(auto-fit, minmax(14rem, 1fr)); gap: 1rem; }
pre { white-space: pre-wrap; background: #f4f4f4; padding: .5rem; min-height: 3rem; }
</style></head>
<body>
<h1>prefixtune playground</h1>
<p>Pick up to four prefixes, type an input, and compare their streamed outputs.</p>
<p>API key (only with --api-key): <input id="key" type="password" size="16">
<button id="reload">reload prefixes</button></p>
<div id="models"></div>
<p><textarea id="input" placeholder="name : The Eagle | food : French"></textarea></p>
<p>max tokens <input id="max" type="number" value="48" min="1" style="width:5rem">
temperature <input id="temp" type="number" value="0" min="0" max="2" step="0.1"
style="width:5rem"> <button id="run">run</button></p>
<div id="columns"></div>
<script>__SCRIPT__</script>
</body></html>
""".replace("__SCRIPT__", SCRIPT)


def register_playground(app: FastAPI, server: Any) -> None:
    """Add GET / (the playground page) to `app`."""

    @app.get("/", include_in_schema=False)
    def playground() -> HTMLResponse:
        return HTMLResponse(PAGE)
