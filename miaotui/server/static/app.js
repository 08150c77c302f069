"use strict";
// The chat page: streams /v1/chat/completions (SSE) into Markdown rendered from escaped text,
// keeps the conversation in the page, times each answer (TTFT, tok/s), and shows server errors.
(function () {
  const $ = (id) => document.getElementById(id);
  const history = []; // {role, content} of the finished turns
  let controller = null; // the AbortController of the answer in flight
  let modelName = null;

  $("api-key").value = localStorage.getItem("miaotui-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("miaotui-api-key", $("api-key").value);
    loadModel();
  });

  function headers(json) {
    const h = json ? { "Content-Type": "application/json" } : {};
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function errorText(res) {
    const body = await res.text();
    try {
      return `${res.status}: ${JSON.parse(body).error.message}`;
    } catch (e) {
      return `${res.status}: ${body || res.statusText}`;
    }
  }

  async function loadModel() {
    try {
      const res = await fetch("/v1/models", { headers: headers(false) });
      if (!res.ok) throw new Error(await errorText(res));
      modelName = (await res.json()).data[0].id;
      $("model-name").textContent = modelName;
    } catch (e) {
      $("model-name").textContent = "(" + e.message + ")";
    }
  }

  function addMessage(role, text) {
    const el = document.createElement("div");
    el.className = "msg " + role;
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text; // user text is shown as typed, never parsed
    const stats = document.createElement("div");
    stats.className = "stats";
    el.append(content, stats);
    $("messages").append(el);
    el.scrollIntoView({ block: "end" });
    return el;
  }

  function showError(el, message) {
    el.dataset.state = "error";
    const err = document.createElement("div");
    err.className = "error";
    err.textContent = message;
    el.append(err);
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("record").disabled = busy && !recording;
    $("stop").disabled = !busy;
  }

  // Reads an SSE body, calling onEvent(parsed JSON) per `data:` line until [DONE].
  async function readEvents(res, onEvent) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          onEvent(JSON.parse(data));
        }
      }
    }
  }

  function chatBody() {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    const body = {
      messages: messages.concat(history),
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number($("temperature").value),
      max_tokens: Number($("max-tokens").value),
    };
    if (modelName) body.model = modelName;
    return body;
  }

  // One answer: timings are taken in the page, so they include the network and the SSE path.
  async function answer(el) {
    const content = el.querySelector(".content");
    const stats = el.querySelector(".stats");
    const t = { start: performance.now(), first: null, last: null, tokens: 0, reason: null };
    let text = "";
    const showStats = () => {
      const parts = [];
      if (t.first !== null) parts.push(`TTFT ${Math.round(t.first - t.start)} ms`);
      if (t.tokens > 1 && t.last > t.first) {
        parts.push(`${((t.tokens - 1) / ((t.last - t.first) / 1000)).toFixed(1)} tok/s`);
      }
      parts.push(`${t.tokens} tokens`);
      if (t.reason) parts.push(t.reason);
      stats.textContent = parts.join(" · ");
    };
    el.dataset.state = "streaming";
    controller = new AbortController();
    try {
      const res = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(true),
        body: JSON.stringify(chatBody()),
        signal: controller.signal,
      });
      if (!res.ok) return showError(el, await errorText(res));
      await readEvents(res, (event) => {
        if (event.error) throw new Error(`${event.error.code}: ${event.error.message}`);
        if (event.usage) t.tokens = event.usage.completion_tokens;
        const choice = event.choices && event.choices[0];
        if (!choice) return;
        if (choice.delta && choice.delta.content) {
          const now = performance.now();
          if (t.first === null) t.first = now;
          t.last = now;
          t.tokens += 1;
          text += choice.delta.content;
          content.innerHTML = window.renderMarkdown(text);
          el.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) t.reason = choice.finish_reason;
        showStats();
      });
      el.dataset.state = "done";
    } catch (e) {
      if (e.name === "AbortError") {
        el.dataset.state = "stopped";
        t.reason = "stopped";
      } else {
        showError(el, e.message);
      }
    } finally {
      controller = null;
      showStats();
      if (text) history.push({ role: "assistant", content: text });
    }
  }

  // Translate mode: every sentence is translated at once on the server; each one is shown as
  // it arrives, in its paragraph, the ones still running as "...".
  async function translate(el, source) {
    const content = el.querySelector(".content");
    const stats = el.querySelector(".stats");
    el.dataset.state = "streaming";
    controller = new AbortController();
    const start = performance.now();
    let paragraphs = []; // per paragraph, its sentences' translations (null: not yet)
    let done = 0;
    const show = () => {
      content.textContent = paragraphs.map((p) => p.map((t) => t ?? "...").join(" ")).join("\n\n");
      const seconds = (performance.now() - start) / 1000;
      const total = paragraphs.reduce((n, p) => n + p.length, 0);
      stats.textContent = `${done} of ${total} sentences in ${seconds.toFixed(1)} s`;
      el.scrollIntoView({ block: "end" });
    };
    try {
      const res = await fetch("/v1/translate", {
        method: "POST",
        headers: headers(true),
        body: JSON.stringify({ text: source, target_language: $("target").value, stream: true }),
        signal: controller.signal,
      });
      if (!res.ok) return showError(el, await errorText(res));
      const where = []; // sentence index -> [paragraph, position]
      await readEvents(res, (event) => {
        if (event.error) throw new Error(`${event.error.code || "error"}: ${event.error.message}`);
        if (event.object === "translation.start") {
          paragraphs = event.paragraphs.map((n) => new Array(n).fill(null));
          paragraphs.forEach((p, i) => p.forEach((_, j) => where.push([i, j])));
        } else if (event.object === "translation.sentence") {
          const [i, j] = where[event.index];
          paragraphs[i][j] = event.text;
          done += 1;
        } else if (event.object === "translation") {
          content.textContent = event.text; // the server's assembly is the answer
          el.dataset.state = "done";
          return;
        }
        show();
      });
      if (el.dataset.state !== "done") return showError(el, "the translation stream ended early");
      {
        const total = paragraphs.reduce((n, p) => n + p.length, 0);
        const seconds = (performance.now() - start) / 1000;
        stats.textContent = `${total} sentences in ${seconds.toFixed(1)} s`;
      }
    } catch (e) {
      if (e.name === "AbortError") el.dataset.state = "stopped";
      else showError(el, e.message);
    } finally {
      controller = null;
    }
  }

  async function submit(text) {
    if (!text.trim() || controller) return;
    addMessage("user", text);
    const el = addMessage("assistant", "");
    setBusy(true);
    try {
      if ($("mode").value === "translate") {
        el.classList.add("translation");
        await translate(el, text);
      } else {
        history.push({ role: "user", content: text });
        await answer(el);
      }
    } finally {
      setBusy(false);
    }
  }

  // ---- voice in: audio -> /v1/audio/transcriptions -> the transcript is the user's turn ----
  let recording = null; // the function that stops the recording in progress

  async function transcribe(blob) {
    const note = addMessage("system-note", "transcribing...");
    try {
      const form = new FormData();
      form.append("file", await window.speechAudio.toWav16k(blob), "speech.wav");
      form.append("model", "whisper-1");
      const res = await fetch("/v1/audio/transcriptions", {
        method: "POST",
        headers: headers(false),
        body: form,
      });
      if (!res.ok) return showError(note, await errorText(res));
      note.remove();
      await submit((await res.json()).text.trim());
    } catch (e) {
      showError(note, "audio: " + e.message);
    }
  }

  $("record").addEventListener("click", async () => {
    if (recording) {
      const stop = recording;
      recording = null;
      $("record").textContent = "Record";
      return transcribe(await stop());
    }
    try {
      recording = await window.speechAudio.startRecording();
      $("record").textContent = "Stop recording";
    } catch (e) {
      showError(addMessage("system-note", ""), "microphone: " + e.message);
    }
  });

  $("upload").addEventListener("change", async () => {
    const file = $("upload").files[0];
    $("upload").value = "";
    if (file) await transcribe(file);
  });

  // ---- wiring ----
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value;
    $("prompt").value = "";
    submit(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    $("messages").replaceChildren();
  });
  const showMode = () => (document.body.dataset.mode = $("mode").value);
  $("mode").addEventListener("change", showMode);
  showMode();
  loadModel();
})();
