// heygem-watch dashboard: polls the JSON API (docs/web.md); all state lives in the ledger, so a reload loses nothing.
"use strict";

const STATUS_EVERY_MS = 1000;   // progress bar refresh
const HISTORY_EVERY_MS = 4000;  // history refresh when nothing changed
const $ = (sel) => document.querySelector(sel);
let lastStatusKey = "";
let templatesCache = [];
let historySeq = 0;      // responses of overlapping history requests are applied newest-first only

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function fmtTime(s) {
  if (s == null || !isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  const m = Math.floor(s / 60), r = s % 60;
  return m ? `${m}m ${String(r).padStart(2, "0")}s` : `${r}s`;
}
function fmtDur(s) { return s ? `${Number(s).toFixed(1)} s` : "–"; }
function enc(name) { return encodeURIComponent(name); }
// Polls (status every second, history every 4 s) mostly draw what is already there: an unchanged answer leaves the
// element alone (no re-parse of a 500-item queue, no lost hover or open <details>). False when nothing changed.
const drawn = new WeakMap();
function setHTML(el, html) {
  if (drawn.get(el) === html) return false;
  drawn.set(el, html);
  el.innerHTML = html;
  return true;
}

async function api(path, opts = {}) {
  const resp = await fetch(path, Object.assign({credentials: "same-origin"}, opts));
  if (resp.status === 401) { askToken(); throw new Error("token required"); }
  const body = resp.headers.get("content-type")?.includes("json") ? await resp.json() : null;
  if (!resp.ok) throw new Error(body?.error || body?.detail?.[0]?.msg || `HTTP ${resp.status}`);
  return body;
}

function askToken() {
  const d = $("#token-dialog");
  if (!d.open) d.showModal();
}
$("#token-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const fd = new FormData();
  fd.append("token", $("#token-input").value);
  const r = await fetch("/api/login", {method: "POST", body: fd});
  if (r.ok) { $("#token-dialog").close(); loadConfig(); refreshAll(); }
  else $("#token-msg").textContent = "wrong token";
});

// ------------------------------------------------------------------ status: running + queue
async function refreshStatus() {
  const st = await api("/api/status");
  const c = st.counts || {}, rc = st.recording_counts || {};
  // two kinds of count: renders (one per recording x template) and recordings; a failed recording has failed renders
  setHTML($("#counts"), '<span class="counts-label" title="one render per recording × template">renders</span>' +
    ["queued", "running", "done", "failed"].map((k) =>
      `<span class="chip ${k}" title="${k} renders">${k} ${c[k] ?? 0}</span>`).join("") +
    '<span class="counts-label">recordings</span>' +
    `<span class="chip rec-partial" title="recordings where some templates failed">partial ${rc.partial ?? 0}</span>` +
    `<span class="chip rec-failed" title="recordings where every template failed">failed ${rc.failed ?? 0}</span>`);
  const rd = st.renderer || {running: true};
  const banner = $("#renderer-banner");
  banner.classList.toggle("hidden", !!rd.running);
  if (!rd.running) {
    const since = rd.since ? ` since ${new Date(rd.since * 1000).toLocaleString()}` : " (never started on this server)";
    const waiting = c.queued ? `${c.queued} queued render(s) wait` : "new jobs wait";
    setHTML(banner, `<b>renderer not running</b>${
      esc(`${since}: ${waiting} until \`heygem-watch run\` (systemctl start heygem-watch) is started.`)}`);
  }
  setHTML($("#running-list"), st.running.length ? st.running.map(runView).join("")
    : '<p class="hint">Nothing is running.</p>');
  const ws = st.workers || [];  // render farm (HEYGEM_DISPATCH=celery): the workers the head has seen
  $("#workers").classList.toggle("hidden", !ws.length);
  setHTML($("#workers-list"), ws.map((w) => `<li class="worker ${w.state}" data-worker="${esc(w.hostname)}">` +
    `<b>${esc(w.hostname)}</b> ${w.state} &middot; heartbeat ${Math.round(w.ago_s)} s ago &middot; ` +
    (w.task ? `task #${w.task.id} ${esc(w.task.template)} ${w.task.done}/${w.task.total}` : "idle") +
    ` &middot; ${w.processed} done</li>`).join(""));
  setHTML($("#queue-list"), st.queued.length ? st.queued.map((q) =>
    `<li data-task="${q.task_id}">#${q.position ?? "?"} &nbsp;${esc(q.recording)} &times; ${esc(q.template)}</li>`).join("")
    : '<li class="hint">empty</li>');
  // when a task starts or ends, the history changes: refresh it now instead of waiting
  const key = JSON.stringify([c, st.running.map((r) => r.task.id)]);
  if (key !== lastStatusKey) { lastStatusKey = key; refreshHistory(); }
}

function runView(r) {
  const t = r.task;
  const total = t.progress_total || 0, done = t.progress_done || 0;
  const pct = total ? Math.min(100, (100 * done) / total) : 0;
  const batch = r.n > 1 ? `Batch: ${r.k} of ${r.n} &middot; ` : "";
  return `<div class="run" data-task="${t.id}">
    <div class="run-title">${esc(r.recording.name)}</div>
    <div class="run-sub">${batch}template <b class="run-template">${esc(t.template_name)}</b>${
      t.worker ? ` &middot; on <span class="run-worker">${esc(t.worker)}</span>` : ""}</div>
    <div class="bar"><div class="progress-fill" data-done="${done}" style="width:${pct.toFixed(1)}%"></div></div>
    <div class="bar-text"><span class="frames">${done} / ${total || "?"} frames</span>
      <span>${t.fps ? t.fps.toFixed(1) : "–"} fps</span><span>ETA ${fmtTime(t.eta_s)}</span></div></div>`;
}

// ------------------------------------------------------------------ history
async function refreshHistory() {
  const seq = ++historySeq;
  const h = await api("/api/recordings?limit=100");
  if (seq !== historySeq) return;  // a newer request was sent meanwhile: its answer wins
  const open = new Set([...document.querySelectorAll("#history-list details[open][data-rec]")].map((d) => d.dataset.rec));
  // a "Render with…" being filled in stays open with its ticks across refreshes
  const picking = new Map([...document.querySelectorAll("#history-list details.rerun[open]")].map((d) =>
    [d.dataset.rerun, new Set([...d.querySelectorAll("input:checked")].map((i) => i.value))]));
  const html = h.days.length ? h.days.map((d) =>
    `<div class="day"><div class="day-title">${esc(d.day)}</div>${d.recordings.map(recView).join("")}</div>`).join("")
    : '<p class="hint">No recordings yet.</p>';
  if (!setHTML($("#history-list"), html)) return;  // unchanged: open logs and ticked boxes are still there
  for (const id of open) {
    const d = document.querySelector(`#history-list details[data-rec="${id}"]`);
    if (d) { d.open = true; loadLog(d); }
  }
  for (const [id, ticked] of picking) {
    const d = document.querySelector(`#history-list details.rerun[data-rerun="${id}"]`);
    if (d) { d.open = true; d.querySelectorAll("input").forEach((i) => { i.checked = ticked.has(i.value); }); }
  }
}

function recView(r) {
  const batch = r.batch ? `<span class="hint">batch &middot; ${r.n_done} of ${r.n_tasks} done</span>` : "";
  const zip = r.n_done ? `<a class="zip-link button" href="/api/recordings/${r.id}/zip" download>Download ZIP</a>` : "";
  const busy = r.tasks.some((t) => t.state === "queued" || t.state === "running");
  const del = busy ? "" : `<button class="danger del-rec" data-rec="${r.id}" data-name="${esc(r.name)}">Delete</button>`;
  // a partial or failed recording can be completed: only its failed templates run again
  const retry = r.n_failed ? `<button class="retry-rec" data-rec="${r.id}">Retry failed</button>` : "";
  // more templates for a known recording: the ones it lacks are rendered from its archived source
  const have = new Set(r.tasks.map((t) => t.template_name));
  const more = templatesCache.filter((t) => !have.has(t.name) && !t.unusable);
  const rerun = more.length ? `<details class="rerun" data-rerun="${r.id}"><summary>Render with…</summary>
      ${more.map((t) => `<label><input type="checkbox" value="${esc(t.name)}"> ${esc(t.name)}</label>`).join("")}
      <button class="rerun-go" data-rec="${r.id}">Queue</button></details>` : "";
  // the recording's reason (error.json when the daemon wrote one); each failed template says why in its card
  const ej = r.error_json;
  const reason = (ej && (ej.reason || ej.error)) || (r.state === "failed" ? r.error : "");
  const err = (reason ? `<div class="error-box">${esc(reason)}</div>` : "") + (r.n_failed || reason
    ? `<details data-rec="${r.id}"><summary>Show log</summary><pre>loading…</pre></details>` : "");
  return `<div class="rec" data-rec="${r.id}">
    <div class="rec-head"><span class="rec-name">${esc(r.name)}</span>
      <span class="state ${esc(r.state)}">${esc(r.state)}</span>${batch}
      <span class="hint">${r.created_at ? new Date(r.created_at * 1000).toLocaleString() : ""}</span>
      <span class="rec-actions">${zip}${retry}${del}</span></div>${rerun}
    ${err}<div class="results">${r.tasks.map(taskView).join("")}</div></div>`;
}

function taskView(t) {
  const media = t.media || {};
  // before there is a result, the template's picture stands in, greyed
  const thumb = t.has_output ? `<img class="thumb" loading="lazy" src="/api/tasks/${t.id}/thumb" alt="">`
    : `<img class="thumb waiting" loading="lazy" src="/api/templates/${enc(t.template_name)}/thumb" alt=""
        onerror="this.style.visibility='hidden'">`;
  const links = t.has_output ? `<a href="#" class="play-btn" data-task="${t.id}" data-title="${esc(t.output_name)}">▶ Play</a>
      <a class="mp4-link" href="/api/tasks/${t.id}/video?download=true" download>Download MP4</a>` : "";
  const where = t.state === "queued" && t.position ? ` #${t.position} in queue` : "";
  return `<div class="result" data-task="${t.id}" data-state="${esc(t.state)}">${thumb}<div class="result-info">
    <span><b>${esc(t.template_name)}</b></span>
    <span><span class="state ${esc(t.state)}">${esc(t.state)}</span>${where} &nbsp;${fmtDur(media.duration_s)}</span>
    ${links}${t.error ? `<span class="task-error" title="${esc(t.error)}">${esc(t.error.split(": ").pop())}</span>` : ""}
    </div></div>`;
}

async function loadLog(det) {
  const r = await api(`/api/recordings/${det.dataset.rec}/log`);
  det.querySelector("pre").textContent = r.lines.length ? r.lines.join("\n") : "(no log)";
}

$("#history-list").addEventListener("click", async (ev) => {
  const play = ev.target.closest(".play-btn");
  if (play) {
    ev.preventDefault();
    $("#player-title").textContent = play.dataset.title;
    $("#player").src = `/api/tasks/${play.dataset.task}/video`;
    $("#player-dialog").showModal();
    $("#player").play().catch(() => {});
  }
  const retry = ev.target.closest(".retry-rec");
  if (retry) {
    try {
      const r = await api(`/api/recordings/${retry.dataset.rec}/retry`, {method: "POST"});
      alert(`queued again: ${r.queued.join(", ")}`);
    } catch (e) { alert(e.message); }
    refreshAll();
  }
  const go = ev.target.closest(".rerun-go");
  if (go) {
    const fd = new FormData();
    go.closest(".rerun").querySelectorAll("input:checked").forEach((i) => fd.append("templates", i.value));
    try {
      const r = await api(`/api/recordings/${go.dataset.rec}/rerun`, {method: "POST", body: fd});
      alert((r.queued.length ? `queued: ${r.queued.join(", ")}` : "nothing new to queue")
        + (r.existing.length ? `; already there: ${r.existing.join(", ")}` : ""));
    } catch (e) { alert(e.message); }
    refreshAll();
  }
  const del = ev.target.closest(".del-rec");
  if (del && confirm(`Delete the results of “${del.dataset.name}”? This removes the MP4 files.`)) {
    try { await api(`/api/recordings/${del.dataset.rec}`, {method: "DELETE"}); } catch (e) { alert(e.message); }
    refreshHistory();
  }
});
$("#history-list").addEventListener("toggle", (ev) => {
  if (ev.target.open && ev.target.dataset.rec) loadLog(ev.target);
}, true);
$("#player-close").addEventListener("click", () => { $("#player").pause(); $("#player-dialog").close(); });
$("#player-dialog").addEventListener("close", () => $("#player").pause());

// ------------------------------------------------------------------ templates
// Template names often share a long prefix (videoretalking_face2.mp4, videoretalking_face3.mp4), so a label cut at
// its end shows the same text for all of them: cut in the middle, keep the end, and where two labels still look
// alike, show from the point where those names differ. The full name is the label's tooltip.
const LABEL_MAX = 40;  // characters at most; fitLabels() shortens them until they fit their box
function midCut(name, max = LABEL_MAX) {
  if (name.length <= max) return name;
  const tail = Math.ceil((max - 1) * 0.6);
  return name.slice(0, max - 1 - tail) + "…" + name.slice(name.length - tail);
}
function shortLabels(names, max = LABEL_MAX) {
  // the extension says nothing when no other template has the same stem: leave it out (more room for the name)
  const stem = (n) => n.replace(/\.[^.]{1,5}$/, "");
  const base = new Map(names.map((n) => [n, names.filter((m) => stem(m) === stem(n)).length > 1 ? n : stem(n)]));
  const out = new Map(names.map((n) => [n, midCut(base.get(n), max)]));
  for (const n of names) {
    const twins = names.filter((m) => m !== n && out.get(m) === out.get(n));
    if (!twins.length) continue;
    for (const m of [n, ...twins]) {
      const b = base.get(m);
      let p = 0;  // where m stops sharing a prefix with the others
      for (const o of [n, ...twins]) {
        if (o === m) continue;
        const ob = base.get(o);
        let i = 0;
        while (i < b.length && b[i] === ob[i]) i++;
        p = Math.max(p, i);
      }
      const rest = b.slice(Math.max(0, p - 4));
      out.set(m, b.slice(0, 4) + "…" + (rest.length > max - 5 ? midCut(rest, max - 5) : rest));
    }
  }
  return out;
}

function fitLabels(spans) {
  const names = spans.map((sp) => sp.closest(".choice").title);
  for (let max = LABEL_MAX; max >= 8; max -= 1) {
    const labels = shortLabels(names, max);
    spans.forEach((sp, i) => { sp.textContent = labels.get(names[i]); });
    if (spans.every((sp) => sp.scrollWidth <= sp.clientWidth)) return;
  }
}

async function refreshTemplates() {
  const r = await api("/api/templates");
  const names = (ts) => JSON.stringify(ts.map((t) => [t.name, t.unusable]));
  const changed = names(templatesCache) !== names(r.templates);
  templatesCache = r.templates;
  if (changed) refreshHistory();  // its "Render with…" lists the library's templates
  const checked = new Set([...document.querySelectorAll("#template-choices input:checked")].map((i) => i.value));
  const batch = $("#mode-batch").checked;
  $("#template-choices").innerHTML = r.templates.length ? r.templates.map((t) =>
    `<label class="choice${t.unusable ? " unusable" : ""}" title="${esc(t.name)}"><img src="/api/templates/${enc(t.name)}/thumb?v=${t.size}" alt="" loading="lazy">
      <span>${esc(t.name)}</span><input type="${batch ? "checkbox" : "radio"}" name="templates" value="${esc(t.name)}"
      ${checked.has(t.name) && !t.unusable ? "checked" : ""} ${t.unusable ? "disabled" : ""}></label>`).join("")
    : '<span class="hint">no templates yet — upload one below</span>';
  fitLabels([...document.querySelectorAll("#template-choices .choice span")]);
  $("#template-list").innerHTML = r.templates.map(tplView).join("") || '<p class="hint">The library is empty.</p>';
  if (r.templates.some((t) => t.face?.state === "pending")) setTimeout(refreshTemplates, 3000);
}

function tplView(t) {
  const f = t.face || {};
  const cls = f.state === "done" ? (f.ok ? "ok" : "bad") : f.state === "error" ? "bad" : "pending";
  const face = f.state === "done" ? `face ${Math.round(100 * f.face_fraction)}%` : (f.message || f.state);
  const dur = t.is_image ? "still image" : fmtDur(t.duration_s);
  return `<div class="tpl" data-name="${esc(t.name)}"><img src="/api/templates/${enc(t.name)}/thumb?v=${t.size}" alt="" loading="lazy">
    <div class="tpl-name">${esc(t.name)}</div>
    <div>${t.width}×${t.height} &middot; ${t.fps ?? "–"} fps &middot; ${dur}</div>
    ${t.unusable ? `<div class="face bad unusable" title="recordings skip this template">unusable: ${esc(t.unusable)}</div>`
      : `<div class="face ${cls}" title="${esc(f.message || "")}">${esc(face)}</div>`}
    <button class="danger del-tpl" data-name="${esc(t.name)}">Delete</button></div>`;
}

$("#template-list").addEventListener("click", async (ev) => {
  const b = ev.target.closest(".del-tpl");
  if (b && confirm(`Delete template “${b.dataset.name}” from the library?`)) {
    try { await api(`/api/templates/${enc(b.dataset.name)}`, {method: "DELETE"}); } catch (e) { alert(e.message); }
    refreshTemplates();
  }
});
$("#library-upload-input").addEventListener("change", async (ev) => {
  const fd = new FormData();
  for (const f of ev.target.files) fd.append("files", f);
  $("#library-msg").textContent = "uploading…";
  try {
    await api("/api/templates", {method: "POST", body: fd});
    $("#library-msg").textContent = "added";
    $("#library-msg").className = "msg ok";
    setTimeout(() => { $("#library-msg").textContent = ""; }, 4000);
  } catch (e) { $("#library-msg").textContent = e.message; $("#library-msg").className = "msg error"; }
  ev.target.value = "";
  refreshTemplates();
});

// ------------------------------------------------------------------ new job
function setMode() {
  const batch = $("#mode-batch").checked;
  $("#pick-hint").textContent = batch ? "pick several" : "pick one";
  $("#template-upload-input").multiple = batch;
  refreshTemplates();
}
$("#mode-single").addEventListener("change", setMode);
$("#mode-batch").addEventListener("change", setMode);

const drop = $("#recording-drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) $("#recording-input").files = e.dataTransfer.files;
});

$("#job-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const msg = $("#submit-msg");
  const rec = $("#recording-input").files[0];
  const picked = [...document.querySelectorAll("#template-choices input:checked")].map((i) => i.value);
  const uploads = [...$("#template-upload-input").files];
  if (!rec) { msg.textContent = "choose a recording"; msg.className = "msg error"; return; }
  if (!picked.length && !uploads.length) { msg.textContent = "pick or upload a template"; msg.className = "msg error"; return; }
  const fd = new FormData();
  fd.append("recording", rec);
  picked.forEach((n) => fd.append("templates", n));
  uploads.forEach((f) => fd.append("template_files", f));
  // XMLHttpRequest rather than fetch: it reports upload progress for large recordings
  const xhr = new XMLHttpRequest();
  const bar = $("#upload-progress");
  bar.classList.remove("hidden");
  $("#submit-btn").disabled = true;
  msg.textContent = "uploading…"; msg.className = "msg";
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.firstElementChild.style.width = `${(100 * e.loaded) / e.total}%`; };
  xhr.onloadend = () => {
    $("#submit-btn").disabled = false;
    bar.classList.add("hidden");
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
    if (xhr.status === 401) { askToken(); return; }
    if (xhr.status >= 200 && xhr.status < 300) {
      const had = body.existing?.length ? `; already had ${body.existing.join(", ")}` : "";
      msg.textContent = (body.duplicate_of == null ? `queued: ${body.task_ids.length} job(s) for ${body.name}`
        : body.queued?.length ? `already known (recording #${body.duplicate_of}): queued ${body.queued.join(", ")}${had}`
        : `already known: same content as recording #${body.duplicate_of} — nothing new to render${had}`)
        + (body.note ? ` — ${body.note}` : "");
      msg.className = body.note ? "msg warn" : "msg ok";
      const batch = $("#mode-batch").checked;
      $("#job-form").reset();
      $(batch ? "#mode-batch" : "#mode-single").checked = true;
      setMode();
      refreshStatus();
    } else {
      msg.textContent = body.error || body.detail?.[0]?.msg || `upload failed (HTTP ${xhr.status})`;
      msg.className = "msg error";
    }
  };
  xhr.open("POST", "/api/submit");
  xhr.send(fd);
});

// ------------------------------------------------------------------ loop
async function refreshAll() {
  try { await Promise.all([refreshTemplates(), refreshStatus(), refreshHistory()]); } catch (e) { /* shown on next tick */ }
}
async function loadConfig() {
  try {
    const c = await api("/api/config");
    $("#recording-input").accept = c.extensions.join(",");
    $("#recording-hint").textContent = `${c.extensions.join(" ")} · up to ${c.max_upload_mb} MB`;
  } catch (e) { /* token dialog */ }
}
loadConfig();
refreshAll();
setInterval(() => refreshStatus().catch(() => {}), STATUS_EVERY_MS);
setInterval(() => refreshHistory().catch(() => {}), HISTORY_EVERY_MS);
