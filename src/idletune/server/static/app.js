// idletune's web page: chat, live training status, imports. Plain JS, no build step, no dependencies.
"use strict";

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// ---- HTTP ------------------------------------------------------------------------------------

// The server's API key, when it has one: typed into the key form (or opened once as /?key=KEY),
// kept in this browser's localStorage and sent as "Authorization: Bearer KEY" on every call.
const KEY_STORE = "idletune.apiKey";

function takeKeyFromUrl() {
  const url = new URL(window.location.href);
  const key = url.searchParams.get("key");
  if (key === null) return;
  if (key) localStorage.setItem(KEY_STORE, key);
  url.searchParams.delete("key"); // keep it out of the address bar and the history
  window.history.replaceState(null, "", url.pathname + url.search + url.hash);
}

function authHeaders(headers = {}) {
  const key = localStorage.getItem(KEY_STORE);
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

// 401: the server wants a (different) key; show the key form with the server's message.
function askForKey(message) {
  const form = $("#key-form");
  $("#key-msg").textContent = message;
  if (form.hidden) {
    form.hidden = false;
    $("#api-key").focus();
  }
}

// fetch + JSON; throws an Error whose message is the server's own {"error": {"message"}} or says why.
async function api(path, { method = "GET", json, body, signal } = {}) {
  const opts = { method, signal, body, headers: authHeaders() };
  if (json !== undefined) {
    opts.headers = authHeaders({ "Content-Type": "application/json" });
    opts.body = JSON.stringify(json);
  }
  let res;
  try {
    res = await fetch(path, opts);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new Error("The server is unreachable; check that idletune serve is running.");
  }
  return readJson(res);
}

async function readJson(res) {
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  if (!res.ok) {
    const message = data && data.error && data.error.message;
    if (res.status === 401) askForKey(message || "This server needs an API key.");
    throw new Error(message || `The server answered ${res.status} ${res.statusText}.`);
  }
  return data;
}

// ---- Markdown: a small, safe subset. Everything is escaped first; only our own tags are added. ----

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function inlineMarkdown(raw) {
  const kept = []; // finished HTML (code spans, links) kept out of the later rules
  const keep = (html) => `\u0000${kept.push(html) - 1}\u0000`;
  let s = escapeHtml(raw.replace(/\u0000/g, ""));
  s = s.replace(/`([^`\n]+)`/g, (_, code) => keep(`<code>${code}</code>`));
  s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
    (_, text, href) => keep(`<a href="${href}" target="_blank" rel="noopener noreferrer">${text}</a>`));
  s = s.replace(/\*\*(\S(?:[^*\n]*\S)?)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^*\w])\*(\S(?:[^*\n]*\S)?)\*(?![\w*])/g, "$1<em>$2</em>");
  s = s.replace(/(^|[^\w])_(\S(?:[^_\n]*\S)?)_(?!\w)/g, "$1<em>$2</em>");
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => kept[i]);
}

function renderMarkdown(src) {
  const lines = src.replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  const isItem = (l) => /^\s*([-*+]|\d+[.)])\s+/.test(l);
  const startsBlock = (l) => /^\s*```/.test(l) || /^#{1,6}\s/.test(l) || isItem(l) || /^>/.test(l);
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i++; continue; }
    if (/^\s*```/.test(line)) { // fenced code; an unclosed fence (mid-stream) runs to the end
      const body = [];
      for (i++; i < lines.length && !/^\s*```/.test(lines[i]); i++) body.push(lines[i]);
      i++;
      out.push(`<pre><code>${escapeHtml(body.join("\n"))}</code></pre>`);
    } else if (/^#{1,6}\s/.test(line)) {
      const level = Math.min(6, line.match(/^#+/)[0].length + 2); // h3..h6 inside a message
      out.push(`<h${level}>${inlineMarkdown(line.replace(/^#+\s+/, ""))}</h${level}>`);
      i++;
    } else if (isItem(line)) {
      const tag = /^\s*\d/.test(line) ? "ol" : "ul";
      const items = [];
      for (; i < lines.length && isItem(lines[i]); i++) {
        items.push(`<li>${inlineMarkdown(lines[i].replace(/^\s*([-*+]|\d+[.)])\s+/, ""))}</li>`);
      }
      out.push(`<${tag}>${items.join("")}</${tag}>`);
    } else if (/^>/.test(line)) {
      const quoted = [];
      for (; i < lines.length && /^>/.test(lines[i]); i++) quoted.push(lines[i].replace(/^>\s?/, ""));
      out.push(`<blockquote>${renderMarkdown(quoted.join("\n"))}</blockquote>`);
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() && !(para.length && startsBlock(lines[i])); i++) para.push(lines[i]);
      out.push(`<p>${para.map(inlineMarkdown).join("<br>")}</p>`);
    }
  }
  return out.join("");
}

// ---- Chat ------------------------------------------------------------------------------------

const chat = {
  turns: [],       // {role, content, id?, version?, node?} — what is sent back to the model
  controller: null, // AbortController of the answer being streamed
};

function newConversation() {
  if (chat.controller) chat.controller.abort();
  chat.turns = [];
  $("#messages").replaceChildren(el("p", { class: "empty" }, "New conversation. Ask something."));
  $("#prompt").focus();
}

function addBubble(role, cls = "") {
  const empty = $("#messages .empty");
  if (empty) empty.remove();
  const body = el("div", { class: "body" });
  const node = el("article", { class: `msg ${role} ${cls}`.trim() }, body);
  $("#messages").append(node);
  return node;
}

function scrollChat() {
  const box = $("#messages");
  box.scrollTop = box.scrollHeight;
}

function showChatError(message) {
  const node = addBubble("error");
  node.querySelector(".body").textContent = message;
  scrollChat();
}

async function sendMessage(text) {
  const conversation = chat.turns; // replaced by "New conversation"
  const user = { role: "user", content: text, node: addBubble("user") };
  user.node.querySelector(".body").textContent = text;
  conversation.push(user);
  const answer = { role: "assistant", content: "", id: null, version: null, node: addBubble("assistant", "streaming") };
  scrollChat();
  setStreaming(true);
  chat.controller = new AbortController();
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({ messages: conversation.map(({ role, content }) => ({ role, content })), stream: true }),
      signal: chat.controller.signal,
    });
    if (!res.ok) await readJson(res); // throws the server's message
    await readStream(res, (chunk) => {
      answer.id = chunk.id;
      answer.version = chunk.system_fingerprint;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        answer.content += delta.content;
        answer.node.querySelector(".body").innerHTML = renderMarkdown(answer.content);
        scrollChat();
      }
    });
    conversation.push(answer);
    finishAnswer(answer);
  } catch (e) {
    if (conversation !== chat.turns) return; // the conversation was closed meanwhile
    if (e.name === "AbortError" && answer.content) { // stopped: keep what was written
      conversation.push(answer);
      finishAnswer(answer, "stopped");
      return;
    }
    // Nothing usable: take the question back into the box so it can be sent again.
    conversation.pop();
    user.node.remove();
    answer.node.remove();
    $("#prompt").value = text;
    if (e.name !== "AbortError") {
      showChatError(e instanceof TypeError ? "The server is unreachable; the message was not answered." : e.message);
    }
  } finally {
    chat.controller = null;
    setStreaming(false);
  }
}

// Reads `data: {...}` lines of a server-sent-event response until `data: [DONE]`.
async function readStream(res, onChunk) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("The answer was cut off: the connection closed early.");
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "The server failed while answering.");
        onChunk(chunk);
      }
    }
  }
}

function setStreaming(on) {
  $("#send").hidden = on;
  $("#stop").hidden = !on;
}

// Thumbs-up icon (Material Icons "thumb_up", Apache-2.0); flipped by CSS for thumbs down.
const THUMB = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M1 21h4V9H1v12zm22-11c0-1.1-.9-2-2-2h-6.31' +
  'l.95-4.57.03-.32c0-.41-.17-.79-.44-1.06L14.17 1 7.59 7.59C7.22 7.95 7 8.45 7 9v10c0 1.1.9 2 2 2h9c.83 0 1.54-.5 ' +
  '1.84-1.22l3.02-7.05c.09-.23.14-.47.14-.73v-2z"/></svg>';

// The footer under an answer: the weight version that wrote it, rating, correction.
function finishAnswer(answer, note) {
  answer.node.classList.remove("streaming");
  if (!answer.content.trim()) answer.node.querySelector(".body").innerHTML = '<p class="muted">(empty answer)</p>';
  const version = (answer.version || "").replace(/^idletune-/, "");
  const status = el("span", { class: "feedback-status" }, note || "");
  const rate = (value, button) => async () => {
    try {
      await api("/api/feedback", { method: "POST", json: { response_id: answer.id, rating: value } });
      for (const b of answer.node.querySelectorAll(".rate")) b.setAttribute("aria-pressed", String(b === button));
      status.textContent = value > 0 ? "thanks: rated good" : "rated bad: it will learn less from this";
    } catch (e) { status.textContent = e.message; status.classList.add("error"); }
  };
  const up = el("button", { class: "rate up", type: "button", title: "good answer", "aria-label": "good answer", "aria-pressed": "false" });
  const down = el("button", { class: "rate down", type: "button", title: "bad answer", "aria-label": "bad answer", "aria-pressed": "false" });
  up.innerHTML = down.innerHTML = THUMB; // an icon, not an emoji: it draws without an emoji font
  up.addEventListener("click", rate(1, up));
  down.addEventListener("click", rate(-1, down));
  const fix = el("button", { class: "correct", type: "button", onclick: () => editAnswer(answer, status) },
    "Correct this answer");
  answer.node.append(el("footer", {},
    el("span", { class: "version", title: "the weight version that wrote this answer" }, version), up, down, fix, status));
}

function editAnswer(answer, status) {
  if (answer.node.querySelector(".edit")) return;
  const box = el("textarea", { class: "edit", rows: "4", "aria-label": "the right answer" });
  box.value = answer.content;
  const form = el("form", { class: "edit-form" }, box,
    el("div", { class: "row" },
      el("button", { type: "submit", class: "primary" }, "Save correction"),
      el("button", { type: "button", onclick: () => form.remove() }, "Cancel")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const correction = box.value.trim();
    if (!correction) { status.textContent = "The correction is empty."; return; }
    const upTo = chat.turns.indexOf(answer);
    const messages = chat.turns.slice(0, upTo).map(({ role, content }) => ({ role, content }));
    try {
      await api("/api/feedback", { method: "POST", json: { messages, correction } });
      answer.content = correction; // later turns carry the corrected answer
      answer.node.querySelector(".body").innerHTML = renderMarkdown(correction);
      answer.node.classList.add("corrected");
      status.classList.remove("error");
      status.textContent = "corrected: queued at high priority";
      form.remove();
    } catch (e) { status.textContent = e.message; status.classList.add("error"); }
  });
  answer.node.append(form);
  box.focus();
}

// ---- Training status (live over /api/events) -------------------------------------------------

const fmt = {
  num: (x, digits = 4) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toPrecision(digits)),
  int: (x) => (x === null || x === undefined ? "–" : Math.round(x).toLocaleString("en")),
  ago: (s) => (s === null || s === undefined ? "" : s < 60 ? `${Math.round(s)} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`),
  n: (count, noun) => `${count} ${noun}${count === 1 ? "" : "s"}`,
  pairs: (obj) => Object.entries(obj || {}).map(([k, v]) => `${k} ${v}`).join(" · ") || "none",
};

const STATE_TEXT = {
  idle: "idle", training: "training", evaluating: "checking quality", paused: "paused",
  preempted: "preempted by a request", stopped: "stopped",
};

const chart = { points: [], loading: false }; // points: step metrics, oldest first
let lastStatus = null;

function setText(sel, text) { $(sel).textContent = text; }

function renderStatus(s) {
  lastStatus = s;
  const sched = s.scheduler, t = s.training || {}, w = s.weights, q = s.queue;
  setText("#live-version", `v${s.live_version}`);
  const badge = $("#sched-state");
  badge.textContent = STATE_TEXT[sched.state] || sched.state;
  badge.dataset.state = sched.state;
  $("#pause").textContent = sched.paused ? "Resume" : "Pause";
  $("#pause").dataset.paused = String(sched.paused);

  const stat = (k, v) => { $(`#train-stats [data-k="${k}"]`).textContent = v; };
  stat("mode", s.mode === "lora" ? "LoRA" : s.mode);
  stat("step", fmt.int(t.step));
  stat("loss", fmt.num(t.loss));
  stat("lr", t.learning_rate === undefined ? "–" : Number(t.learning_rate).toExponential(1));
  stat("grad", fmt.num(t.grad_norm, 3));
  stat("examples", fmt.int(t.examples_processed));
  stat("tps", fmt.int(t.tokens_per_second));
  stat("rounds", `${sched.training_count} (${sched.rounds_rejected} rejected)`);

  const r = sched.last_round;
  if (roundWatch && r && r.time !== roundWatch.before) {  // the round "Train now" started is decided
    roundWatch = null;
    trainMessage(r.accepted ? `Round done: now serving v${r.version} (${r.learned} of ${fmt.n(r.examples, "example")} learned).`
      : `Round done, nothing published: ${r.reason}.`, !r.accepted);
  }
  setText("#last-round", r
    ? `${r.accepted ? "accepted" : "rejected"} · ${fmt.n(r.examples, "example")}, ${fmt.n(r.steps, "step")} in ${r.seconds} s` +
      (r.version !== undefined && r.version !== null ? ` → v${r.version}` : "") + ` · ${fmt.ago(sched.time_since_last_training)}`
    : "No round yet.");
  const g = w.last_gate_decision;
  const gate = $("#gate");
  gate.textContent = g ? `${g.accepted ? "✔ accepted" : "✘ rejected"}: ${g.reason}` : "No decision yet.";
  gate.dataset.accepted = g ? String(g.accepted) : "";
  const lr = w.last_rollback;
  setText("#rollbacks", `${fmt.n(w.rollbacks, "rollback")}, ${fmt.n(w.rejections, "rejected update")}` +
    (lr ? ` · last: v${lr.from} → v${lr.to} (${lr.reason})` : ""));
  $("#problems").replaceChildren(...(w.problems || []).map((p) => el("li", {}, typeof p === "string" ? p : JSON.stringify(p))));
  if (sched.last_error) $("#problems").append(el("li", {}, `last error: ${sched.last_error}`));

  for (const p of ["low", "normal", "high"]) {
    setText(`#q-${p}`, q.by_priority[p] ?? 0);
    setText(`#qp-${p}`, q.pending_by_priority[p] ?? 0);
  }
  setText("#q-status", fmt.pairs(q.by_status));
  setText("#q-source", fmt.pairs(q.by_source));

  // One new step since the last event: draw it; more (or a restart): reload the history.
  const last = chart.points[chart.points.length - 1];
  if (s.training && (!last || s.training.time !== last.time)) {
    if (last && s.training.step === last.step + 1) {
      chart.points.push(s.training);
      drawChart();
    } else loadMetrics();
  }
  if (snapshots.key !== `${s.live_version}/${w.snapshots_on_disk}/${w.rollbacks}`) loadSnapshots();
}

function drawChart() {
  chart.points = chart.points.slice(-500);
  const pts = chart.points.filter((m) => Number.isFinite(m.loss)); // in time order; steps restart with the server
  const line = $("#loss-chart polyline");
  if (!pts.length) { line.setAttribute("points", ""); return; }
  const losses = pts.map((m) => m.loss);
  const lo = Math.min(...losses), hi = Math.max(...losses);
  const x = (i) => (pts.length === 1 ? 150 : (i / (pts.length - 1)) * 296 + 2);
  const y = (loss) => (hi === lo ? 50 : 96 - ((loss - lo) / (hi - lo)) * 92);
  line.setAttribute("points", pts.map((m, i) => `${x(i).toFixed(1)},${y(m.loss).toFixed(1)}`).join(" "));
  setText("#chart-caption", `loss over the last ${fmt.n(pts.length, "step")}: ${fmt.num(pts[0].loss, 3)} → ` +
    `${fmt.num(pts[pts.length - 1].loss, 3)} (lowest ${fmt.num(lo, 3)}, highest ${fmt.num(hi, 3)})`);
}

async function loadMetrics() {
  if (chart.loading) return;
  chart.loading = true;
  try {
    const { data } = await api("/api/metrics?limit=500");
    // A server that keeps no history still has its latest step.
    chart.points = data.length || !lastStatus || !lastStatus.training ? data : [lastStatus.training];
    drawChart();
  } catch { /* the next status event tries again */ } finally { chart.loading = false; }
}

function setReachable(ok) {
  $("#unreachable").hidden = ok;
  const conn = $("#conn");
  conn.dataset.state = ok ? "live" : "down";
  conn.textContent = ok ? "live" : "unreachable";
  document.body.classList.toggle("offline", !ok);
}

// The live status stream. fetch, not EventSource: EventSource cannot send the API key.
async function connectEvents() {
  let res;
  try {
    res = await fetch("/api/events?interval=1", { headers: authHeaders() });
    if (res.status === 401) { // not "unreachable": waiting for a key (the key form reconnects)
      await readJson(res).catch(() => {});
      return;
    }
    if (!res.ok) throw new Error(`status stream: ${res.status}`);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data) continue;
        const wasDown = $("#conn").dataset.state === "down";
        setReachable(true);
        renderStatus(JSON.parse(data));
        if (wasDown) loadMetrics(); // steps taken while we were away
      }
    }
  } catch { /* the server went away: retried below */ }
  setReachable(false);
  setTimeout(connectEvents, 3000);
}

// ---- Training controls and snapshots ---------------------------------------------------------

let roundWatch = null;  // {before: the last round's time when "Train now" was clicked}

function trainMessage(text, isError = false) {
  const msg = $("#train-msg");
  msg.textContent = text;
  msg.classList.toggle("error", isError);
}

async function control(button, path, done) {
  button.disabled = true;
  try {
    const out = await api(path, { method: "POST" });
    trainMessage(done(out));
  } catch (e) { trainMessage(e.message, true); } finally { button.disabled = false; }
}

const snapshots = { key: null };
const SHORT_DATE = { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" };

async function loadSnapshots() {
  const s = lastStatus;
  snapshots.key = s ? `${s.live_version}/${s.weights.snapshots_on_disk}/${s.weights.rollbacks}` : null;
  try {
    const { live_version: live, data } = await api("/api/snapshots");
    const select = $("#snapshots");
    // Version 0, the weights the server started from, can always be restored.
    const all = data.some((d) => d.version === 0) ? data : [{ version: 0, base: true }, ...data];
    select.replaceChildren(...all.slice().reverse().map((snap) => {
      const when = snap.created_at ? new Date(snap.created_at * 1000).toLocaleString([], SHORT_DATE) : "";
      const loss = snap.metrics && snap.metrics.loss !== undefined ? ` · loss ${fmt.num(snap.metrics.loss, 3)}` : "";
      const label = `v${snap.version}${snap.base ? " (start weights)" : ""}${snap.version === live ? " (live)" : ""}${loss} ${when}`;
      return el("option", { value: snap.version }, label.trim());
    }));
    // preselected: what the live version was trained from (an undo), else the one before it
    const parent = (data.find((d) => d.version === live) || {}).parent;
    select.value = String(all.some((d) => d.version === parent) && parent !== live ? parent
      : all.filter((d) => d.version < live).map((d) => d.version).pop() ?? live);
    setText("#snap-msg", "");
  } catch (e) { setText("#snap-msg", e.message); }
}

// ---- Import ----------------------------------------------------------------------------------

function jobCard(title) {
  const node = el("li", { class: "job", "data-status": "uploading" },
    el("div", { class: "job-head" }, el("b", {}, title), el("span", { class: "job-status" }, "sending…")),
    el("progress", { max: "1" }), el("div", { class: "job-result" }));
  $("#jobs").prepend(node);
  return node;
}

function showJob(node, job) {
  node.dataset.status = job.status;
  node.querySelector(".job-status").textContent = job.status;
  const bar = node.querySelector("progress");
  const p = job.progress || {};
  if (p.total) { bar.max = p.total; bar.value = p.done; } else bar.removeAttribute("value");
  bar.hidden = job.status === "done" || job.status === "failed";
  const out = node.querySelector(".job-result");
  if (job.status === "failed") {
    out.replaceChildren(el("p", { class: "error" }, (job.error && job.error.message) || "The import failed."));
  } else if (job.result) {
    const r = job.result;
    const meta = r.metadata || {};
    const lines = [el("p", {}, `${fmt.n(r.examples_generated, "example")} generated: ${r.examples_added ?? 0} new, ` +
      `${r.duplicates} already queued` + (r.held_out ? ` · ${r.held_out} of the new held out, to check that learning generalises` : "") +
      (meta.format ? ` · ${meta.format}` : "") + (meta.title ? ` · “${meta.title}”` : ""))];
    if (r.skipped && r.skipped.length) {
      lines.push(el("details", {}, el("summary", {}, `${r.skipped.length} skipped`),
        el("ul", {}, ...r.skipped.map(({what, why}) => el("li", {}, `${what}: ${why}`)))));
    }
    for (const w of r.warnings || []) lines.push(el("p", { class: "warn" }, w));
    out.replaceChildren(...lines);
  }
}

function showJobError(node, message) {
  node.dataset.status = "failed";
  node.querySelector(".job-status").textContent = "failed";
  node.querySelector("progress").hidden = true;
  node.querySelector(".job-result").replaceChildren(el("p", { class: "error" }, message));
}

// Sends one import, then polls its job until it is done or failed.
async function runImport(title, send) {
  const node = jobCard(title);
  try {
    let job = await send(node);
    showJob(node, job);
    while (job.status === "queued" || job.status === "running") {
      await new Promise((r) => setTimeout(r, 500));
      job = await api(`/api/import/${job.job_id}`);
      showJob(node, job);
    }
  } catch (e) { showJobError(node, e.message); }
}

// An upload with progress (fetch cannot report it): resolves to the JSON answer, rejects with the server's message.
function upload(path, body, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (ev) => ev.lengthComputable && onProgress(ev.loaded, ev.total);
    xhr.onerror = () => reject(new Error("The server is unreachable; check that idletune serve is running."));
    xhr.onload = () => readJson(new Response(xhr.responseText, { status: xhr.status, statusText: xhr.statusText })).then(resolve, reject);
    xhr.send(body);
  });
}

function importFiles(files) {
  for (const file of files) {
    const body = new FormData();
    body.append("file", file);
    runImport(file.name, (node) => upload("/api/import/file", body, (done, total) => {
      const bar = node.querySelector("progress");
      bar.max = total;
      bar.value = done;
      node.querySelector(".job-status").textContent = `uploading ${Math.round((100 * done) / total)} %`;
    }));
  }
}

// ---- Wiring ----------------------------------------------------------------------------------

function selectTab(name) {
  for (const b of document.querySelectorAll(".tabs button")) b.setAttribute("aria-selected", String(b.dataset.tab === name));
  for (const p of document.querySelectorAll(".panel")) p.toggleAttribute("data-active", p.dataset.panel === name);
}

document.addEventListener("DOMContentLoaded", () => {
  takeKeyFromUrl();
  $("#key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    localStorage.setItem(KEY_STORE, $("#api-key").value.trim());
    window.location.reload(); // start over with the key: status stream, metrics, snapshots
  });
  for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => selectTab(b.dataset.tab));

  $("#chat-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("#prompt").value.trim();
    if (!text || chat.controller) return;
    $("#prompt").value = "";
    sendMessage(text);
  });
  $("#prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("#chat-form").requestSubmit(); }
  });
  $("#stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("#new-chat").addEventListener("click", newConversation);

  $("#pause").addEventListener("click", (ev) => {
    const paused = ev.target.dataset.paused === "true";
    control(ev.target, paused ? "/api/training/resume" : "/api/training/pause", (out) => {
      if (lastStatus) renderStatus({ ...lastStatus, scheduler: out.scheduler });
      return out.scheduler.paused ? "Background training paused." : "Background training resumed.";
    });
  });
  $("#train-now").addEventListener("click", (ev) => {
    const before = lastStatus && lastStatus.scheduler.last_round ? lastStatus.scheduler.last_round.time : null;
    control(ev.target, "/api/training/force", (out) => {
      if (!out.result.pending) return "Nothing is pending: teach it something (correct an answer, import) first.";
      roundWatch = { before };  // the outcome replaces this message when the round is decided
      return `Training round started on ${fmt.n(out.result.pending, "pending example")}.`;
    });
  });
  $("#rollback-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const version = Number($("#snapshots").value);
    if (!window.confirm(`Serve the weights of v${version} from now on?`)) return;
    try {
      const out = await api("/api/snapshots/rollback", { method: "POST", json: { version } });
      trainMessage(`Rolled back: now serving v${out.live_version}.`);
      loadSnapshots();
    } catch (e) { trainMessage(e.message, true); }
  });

  $("#url-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const url = $("#url").value.trim();
    const depth = Number($("#depth").value);
    runImport(url, () => api("/api/import/url", { method: "POST", json: { url, depth } }));
    $("#url").value = "";
  });
  $("#text-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("#paste").value, name = $("#paste-name").value.trim() || null;
    runImport(name || "pasted text", () => api("/api/import/text", { method: "POST", json: { text, name } }));
    $("#paste").value = $("#paste-name").value = "";
  });
  $("#files").addEventListener("change", (ev) => { importFiles(ev.target.files); ev.target.value = ""; });
  const drop = $("#drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); importFiles(ev.dataTransfer.files); });

  connectEvents();
  loadMetrics();
  loadSnapshots();
});
