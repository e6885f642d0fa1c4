// arenahost console: talks to the JSON API only (see docs/api.md).
"use strict";

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem("arenahost-token") || ""; }

// api calls the JSON API and throws an Error whose message is the server's
// {error, code, detail} (or why the call failed) for any non-2xx answer.
async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  if (token()) opts.headers["Authorization"] = "Bearer " + token();
  let res;
  try {
    res = await fetch(path, opts);
  } catch (e) {
    throw new Error(`${method} ${path}: ${e.message} (is arenahost running?)`);
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!res.ok) {
    const why = data && data.detail ? data.detail : (data && data.error) || text || res.statusText;
    const err = new Error(`${method} ${path}: ${res.status} ${why}`);
    err.status = res.status;
    throw err;
  }
  return data;
}

function showError(id, err) {
  const el = $(id);
  if (!err) { el.hidden = true; el.textContent = ""; return; }
  el.textContent = err.message || String(err);
  el.hidden = false;
}

function bytes(n) {
  if (n === undefined || n === null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function cell(tr, text) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null || text === "" ? "–" : String(text);
  tr.appendChild(td);
  return td;
}

// ---- health and arena ----
async function refreshArena() {
  try {
    const a = await api("GET", "/v1/arena");
    const g = $("arena-gauge");
    g.max = Math.max(a.capacity, 1);
    g.value = a.allocated;
    $("arena-text").textContent =
      `${bytes(a.allocated)} of ${bytes(a.capacity)} allocated (${(100 * a.allocated / Math.max(a.capacity, 1)).toFixed(2)}%), fragmentation ${(100 * a.fragmentation).toFixed(1)}%`;
    $("arena-allocated").textContent = bytes(a.allocated);
    $("arena-capacity").textContent = bytes(a.capacity);
    $("arena-peak").textContent = bytes(a.peak);
    $("arena-frag").textContent = `${(100 * a.fragmentation).toFixed(1)}%`;
    $("arena-segments").textContent = `${a.segments} (${a.backend})`;
    $("health").textContent = "connected";
    showError("arena-error", null);
  } catch (e) {
    $("health").textContent = "disconnected";
    showError("arena-error", e);
  }
}

// ---- plugins ----
async function refreshPlugins() {
  let ps;
  try {
    ps = await api("GET", "/v1/plugins");
  } catch (e) {
    showError("plugins-error", e);
    return;
  }
  refreshPipelines();
  const body = $("plugins-body");
  const focused = document.activeElement && document.activeElement.dataset.plugin;
  body.replaceChildren();
  if (!ps.length) {
    const tr = body.insertRow();
    const td = cell(tr, "no plugins (see --plugins)");
    td.colSpan = 9;
  }
  for (const p of ps) {
    const tr = body.insertRow();
    tr.dataset.plugin = p.name;
    cell(tr, p.name);
    cell(tr, p.version);
    cell(tr, p.kind);
    cell(tr, p.generation).className = "generation";
    cell(tr, p.state).className = "state state-" + p.state;
    cell(tr, p.pid || "");
    cell(tr, p.restarts);
    cell(tr, p.last_error);
    const td = document.createElement("td");
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = "Reload";
    b.dataset.plugin = p.name;
    b.setAttribute("aria-label", `Reload ${p.name}`);
    b.addEventListener("click", () => reloadPlugin(p.name, b));
    td.appendChild(b);
    tr.appendChild(td);
    if (focused === p.name) b.focus();
  }
}

async function reloadPlugin(name, button) {
  button.disabled = true;
  button.textContent = "Reloading…";
  try {
    await api("POST", `/v1/plugins/${encodeURIComponent(name)}/reload`);
    showError("plugins-error", null);
  } catch (e) {
    showError("plugins-error", e);
  } finally {
    await refreshPlugins();
  }
}

// ---- LoRAs ----
async function refreshLoRAs() {
  const list = $("lora-list");
  let ls;
  try {
    ls = await api("GET", "/v1/loras");
  } catch (e) {
    showError("lora-error", e);
    return;
  }
  list.replaceChildren();
  const loras = ls.filter((l) => l.kind === "lora");
  if (!loras.length) {
    list.textContent = "No LoRAs in the LoRA directory.";
    return;
  }
  loras.forEach((l, i) => {
    const row = document.createElement("fieldset");
    row.className = "lora";
    const legend = document.createElement("legend");
    legend.textContent = l.name;
    row.appendChild(legend);
    const use = document.createElement("input");
    use.type = "checkbox";
    use.id = `lora-use-${i}`;
    use.dataset.name = l.name;
    use.className = "lora-use";
    const useLabel = document.createElement("label");
    useLabel.htmlFor = use.id;
    useLabel.textContent = "use";
    const slider = document.createElement("input");
    slider.type = "range";
    slider.min = "-2"; slider.max = "2"; slider.step = "0.05"; slider.value = "1";
    slider.id = `lora-strength-${i}`;
    slider.className = "lora-strength";
    const sLabel = document.createElement("label");
    sLabel.htmlFor = slider.id;
    sLabel.textContent = "strength";
    const out = document.createElement("output");
    out.htmlFor = slider.id;
    out.value = "1.00";
    slider.addEventListener("input", () => { out.value = Number(slider.value).toFixed(2); });
    const info = document.createElement("span");
    info.className = "muted";
    const r = l.lora || {};
    info.textContent = `${r.format || "?"}, ${r.modules || 0} modules, rank ${(r.ranks || []).join("/") || "?"}${r.base_model ? ", " + r.base_model : ""}`;
    row.append(use, useLabel, sLabel, slider, out, info);
    list.appendChild(row);
  });
  showError("lora-error", null);
}

function count(v) { return Array.isArray(v) ? v.length : (v ?? "–"); }

function unmatchedKey(u) {
  if (typeof u === "string") return u;
  return u.key ? (u.reason ? `${u.key}: ${u.reason}` : u.key) : JSON.stringify(u);
}

// renderReport shows POST /v1/loras/apply's answer: {model, mode, loras,
// path, elapsed_ns, report: {mode, loras: [{file, matched, unmatched}],
// retention, peak_scratch_bytes, side_bytes, elapsed_ns, warnings}}.
function renderReport(res) {
  const rep = res.report || res;
  const box = $("lora-report");
  box.replaceChildren();
  const h = document.createElement("h3");
  h.textContent = "Last report";
  box.appendChild(h);
  const t = document.createElement("table");
  t.id = "lora-report-table";
  t.innerHTML = "<thead><tr><th scope='col'>LoRA</th><th scope='col'>Strength</th><th scope='col'>Matched keys</th><th scope='col'>Unmatched keys</th></tr></thead>";
  const tb = t.createTBody();
  (rep.loras || []).forEach((l, i) => {
    const tr = tb.insertRow();
    const asked = res.report && res.loras && res.loras[i];
    cell(tr, l.name || (asked && asked.name) || (l.file || "").split("/").pop());
    cell(tr, l.strength !== undefined ? Number(l.strength).toFixed(2) : "");
    cell(tr, count(l.matched)).className = "matched";
    const td = cell(tr, count(l.unmatched || []));
    td.className = "unmatched";
    if (Array.isArray(l.unmatched) && l.unmatched.length) {
      const d = document.createElement("details");
      const s = document.createElement("summary");
      s.textContent = "keys";
      d.appendChild(s);
      const pre = document.createElement("pre");
      pre.textContent = l.unmatched.map(unmatchedKey).join("\n");
      d.appendChild(pre);
      td.appendChild(d);
    }
  });
  box.appendChild(t);
  const dl = document.createElement("dl");
  dl.className = "figures";
  const fig = (k, v, id) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    if (id) dd.id = id;
    dl.append(dt, dd);
  };
  fig("Mode", rep.mode || res.mode || "–", "lora-report-mode");
  if (rep.layers_touched !== undefined) fig("Layers touched", rep.layers_touched);
  fig("Retention", typeof rep.retention === "number" ? rep.retention.toFixed(4) : "– (side mode is exact)");
  const ns = rep.elapsed_ns ?? res.elapsed_ns;
  fig("Time", ns !== undefined ? `${(ns / 1e6).toFixed(1)} ms` : "–");
  fig("Peak scratch", bytes(rep.peak_scratch_bytes));
  if (rep.side_bytes) fig("Side factors", bytes(rep.side_bytes));
  box.appendChild(dl);
  for (const w of rep.warnings || []) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = "warning: " + w;
    box.appendChild(p);
  }
  const raw = document.createElement("details");
  const s = document.createElement("summary");
  s.textContent = "raw report";
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(res, null, 2);
  raw.append(s, pre);
  box.appendChild(raw);
}

async function applyLoRAs(ev) {
  ev.preventDefault();
  const loras = [];
  document.querySelectorAll(".lora").forEach((row) => {
    const use = row.querySelector(".lora-use");
    if (use.checked) loras.push({ name: use.dataset.name, strength: Number(row.querySelector(".lora-strength").value) });
  });
  if (!loras.length) {
    showError("lora-error", new Error("apply: choose at least one LoRA (tick “use”)"));
    return;
  }
  $("lora-apply").disabled = true;
  try {
    const rep = await api("POST", "/v1/loras/apply", { model: $("lora-model").value, mode: $("lora-mode").value, loras });
    showError("lora-error", null);
    renderReport(rep);
  } catch (e) {
    showError("lora-error", e);
  } finally {
    $("lora-apply").disabled = false;
    refreshArena();
  }
}

async function removeLoRAs() {
  try {
    await api("DELETE", "/v1/loras?model=" + encodeURIComponent($("lora-model").value));
    showError("lora-error", null);
    $("lora-report").textContent = "LoRAs removed; the model's weights are restored.";
  } catch (e) {
    showError("lora-error", e);
  } finally {
    refreshArena();
  }
}

// ---- jobs ----
let events = null;

// refreshPipelines fills the pipeline choice from GET /v1/pipelines: every
// plugin of kind "pipeline", those that cannot run (unavailable, failed,
// starting) disabled with their reason as a tooltip, and the server's
// default selected until the user picks another runnable one.
let pipelineChosen = false;
async function refreshPipelines() {
  let info;
  try {
    info = await api("GET", "/v1/pipelines");
  } catch (e) {
    showError("job-error", e);
    return;
  }
  const sel = $("job-pipeline");
  const note = info.default ? `default: ${info.default}` : (info.reason || "no pipeline can run");
  const key = JSON.stringify([info.default, info.pipelines.map((p) => [p.name, p.state, p.reason || ""])]);
  if (sel.dataset.key === key) return;
  sel.dataset.key = key;
  const cur = sel.value;
  sel.replaceChildren();
  if (!info.pipelines.length) sel.add(new Option("(no pipeline plugin)", ""));
  for (const p of info.pipelines) {
    const o = new Option(p.runnable ? p.name : `${p.name} (${p.state})`, p.name);
    o.disabled = !p.runnable;
    if (p.reason) o.title = p.reason;
    sel.add(o);
  }
  const keep = pipelineChosen && info.pipelines.some((p) => p.name === cur && p.runnable);
  sel.value = keep ? cur : (info.default || "");
  $("job-pipeline-note").textContent = note;
}

// POST /v1/jobs takes {pipeline, params, preview}; the pipeline reads
// steps, seed, width and height (and ignores what it does not know).
async function startJob(ev) {
  ev.preventDefault();
  // No choice: the server runs its default pipeline, or answers 503 with
  // the reason none can run, which the error line shows.
  const pipeline = $("job-pipeline").value || undefined;
  const params = {
    steps: Number($("job-steps").value),
    seed: Number($("job-seed").value),
    width: Number($("job-width").value),
    height: Number($("job-height").value),
  };
  const prompt = $("job-prompt").value.trim();
  if (prompt) params.prompt = prompt;
  $("job-start").disabled = true;
  try {
    const job = await api("POST", "/v1/jobs", { pipeline, params });
    showError("job-error", null);
    const id = encodeURIComponent(job.id);
    const links = job.links || {};
    $("job-status").textContent = `job ${job.id}: ${job.state || "queued"}`;
    const frames = new Set();
    const fr = $("job-frames");
    fr.dataset.frames = "0";
    fr.textContent = "";
    const img = $("job-preview");
    img.src = links.mjpeg || `/v1/jobs/${id}/preview.mjpeg`;
    img.hidden = false;
    if (events) events.close();
    events = new EventSource(links.events || `/v1/jobs/${id}/events`);
    const onEvent = (m) => {
      let d;
      try { d = JSON.parse(m.data); } catch (_) { return; }
      const step = d.total ? ` step ${d.step}/${d.total}` : "";
      const eta = d.eta_seconds > 0 && !["done", "failed", "cancelled"].includes(d.state) ? `, ETA ${d.eta_seconds.toFixed(1)} s` : "";
      $("job-status").textContent = `job ${job.id}: ${d.state}${step}${eta}`;
      if (d.frame) {
        frames.add(d.frame);
        fr.dataset.frames = String(frames.size);
        fr.textContent = `${frames.size} preview frames (latest from step ${d.frame_step}${d.dropped ? `, ${d.dropped} dropped` : ""})`;
      }
      if (d.error) showError("job-error", new Error(`job ${job.id}: ${d.error}`));
      if (["done", "failed", "cancelled"].includes(d.state)) events.close();
    };
    for (const t of ["state", "progress", "frame", "message"]) events.addEventListener(t, onEvent);
    events.onerror = () => { if (events) events.close(); };
  } catch (e) {
    showError("job-error", e);
  } finally {
    $("job-start").disabled = false;
  }
}

// ---- wiring ----
document.addEventListener("DOMContentLoaded", () => {
  $("token").value = token();
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("arenahost-token", $("token").value);
  });
  $("lora-form").addEventListener("submit", applyLoRAs);
  $("lora-remove").addEventListener("click", removeLoRAs);
  $("job-form").addEventListener("submit", startJob);
  $("job-pipeline").addEventListener("change", () => { pipelineChosen = true; });
  refreshArena();
  refreshPlugins();
  refreshLoRAs();
  setInterval(refreshArena, 2000);
  setInterval(() => {
    // Do not rebuild the table under a pending reload.
    if (!document.querySelector("#plugins-body button:disabled")) refreshPlugins();
  }, 3000);
});
