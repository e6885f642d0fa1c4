// arenahost console: an operator's view of models and their LoRAs, jobs,
// plugins and memory. It talks to the JSON API only (see docs/api.md) and
// needs no build step.
"use strict";

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem("arenahost-token") || ""; }

// api calls the JSON API and throws an Error whose message is the server's
// detail (or why the call failed) for any non-2xx answer.
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
    let why = data && data.detail ? data.detail : (data && data.error) || text || res.statusText;
    if (res.status === 401) why += " — enter the server's token at the top of the page";
    if (res.status === 403 && data && data.code === "forbidden") why += " — the saved token is wrong";
    const err = new Error(why);
    err.status = res.status;
    throw err;
  }
  return data;
}

// ---- small helpers ----
function showError(id, err) {
  const el = $(id);
  if (!err) { el.hidden = true; el.textContent = ""; return; }
  el.textContent = err.message || String(err);
  el.hidden = false;
}

// say shows an action's outcome in place and clears the matching error.
function say(id, text, errId) {
  $(id).textContent = text;
  if (errId) showError(errId, null);
}

function bytes(n) {
  if (n === undefined || n === null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function clock(t) {
  if (!t) return "–";
  const d = new Date(t);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
}

function ago(t) {
  if (!t) return "";
  const s = Math.max(0, (Date.now() - new Date(t).getTime()) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function seconds(s) {
  if (!s && s !== 0) return "–";
  return s < 10 ? `${s.toFixed(1)} s` : `${Math.round(s)} s`;
}

function ordinal(n) {
  const s = n % 100 >= 11 && n % 100 <= 13 ? "th" : ({ 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th");
  return n + s;
}

// cell appends a <td> with text and its column name (shown beside the value
// when tables stack on narrow screens).
function cell(tr, text, label, cls) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null || text === "" ? "–" : String(text);
  if (label) td.dataset.label = label;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function button(text, label, onClick, cls) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  if (label) b.setAttribute("aria-label", label);
  if (cls) b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

// busy disables b while fn runs and restores its label.
async function busy(b, text, fn) {
  const old = b.textContent;
  b.disabled = true;
  b.textContent = text;
  try { return await fn(); } finally { b.disabled = false; b.textContent = old; }
}

// keepFocus rebuilds a container with fn and gives focus back to the
// element with the same data-key the user had focused.
function keepFocus(container, fn) {
  const a = document.activeElement;
  const key = a && container.contains(a) ? a.dataset.key : null;
  fn();
  if (key) {
    const el = container.querySelector(`[data-key="${CSS.escape(key)}"]`);
    if (el) el.focus();
  }
}

// row makes a detached table row whose key syncRows matches it by.
function row(key) {
  const tr = document.createElement("tr");
  tr.dataset.rowkey = key;
  return tr;
}

// syncRows makes tbody hold the fresh rows, in order, while keeping every
// existing row and cell whose content did not change: a button the user is
// about to click is not swapped under the pointer by a periodic refresh.
function syncRows(tbody, fresh) {
  keepFocus(tbody, () => {
    const old = new Map();
    for (const tr of Array.from(tbody.rows)) old.set(tr.dataset.rowkey || "", tr);
    const keep = new Set();
    let prev = null;
    for (const f of fresh) {
      let tr = old.get(f.dataset.rowkey);
      if (tr && tr.cells.length === f.cells.length && !keep.has(tr)) {
        const oc = Array.from(tr.cells), fc = Array.from(f.cells);
        fc.forEach((c, i) => { if (oc[i].outerHTML !== c.outerHTML) tr.replaceChild(c, oc[i]); });
        tr.className = f.className;
        for (const k of Object.keys(tr.dataset)) if (!(k in f.dataset)) delete tr.dataset[k];
        Object.assign(tr.dataset, f.dataset);
      } else {
        tr = f;
      }
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (tr !== want) tbody.insertBefore(tr, want);
      keep.add(tr);
      prev = tr;
    }
    for (const tr of Array.from(tbody.rows)) if (!keep.has(tr)) tr.remove();
  });
}

// ---- field validation: messages beside the field, never a silent refusal ----
function fieldError(input, msg) {
  const err = $(input.id + "-err");
  if (err) err.textContent = msg || "";
  if (msg) input.setAttribute("aria-invalid", "true"); else input.removeAttribute("aria-invalid");
  if (err && msg) input.setAttribute("aria-describedby", err.id);
  return !msg;
}

function wholeNumber(input, lo, hi, what) {
  const v = input.value.trim();
  if (v === "") { fieldError(input, `${what}: enter a whole number from ${lo} to ${hi}`); return null; }
  if (!/^-?\d+$/.test(v)) { fieldError(input, `${what}: “${v}” is not a whole number (${lo} to ${hi})`); return null; }
  const n = Number(v);
  if (n < lo || n > hi) { fieldError(input, `${what}: ${n} is out of range, use ${lo} to ${hi}`); return null; }
  fieldError(input, "");
  return n;
}

function side(input, what) {
  const n = wholeNumber(input, 16, 4096, what);
  if (n === null) return null;
  if (n % 16) {
    const lo = Math.max(16, n - (n % 16));
    fieldError(input, `${what}: ${n} is not a multiple of 16 (try ${lo} or ${lo + 16})`);
    return null;
  }
  return n;
}

function strengthOf(input) {
  const v = input.value.trim().replace(",", ".");
  const n = Number(v);
  if (v === "" || !Number.isFinite(n)) { fieldError(input, `strength: “${input.value}” is not a number (e.g. 0.8)`); return null; }
  if (n < -4 || n > 4) { fieldError(input, `strength: ${n} is out of range, use −4 to 4`); return null; }
  fieldError(input, "");
  return n;
}

function modelName(input) {
  const v = input.value.trim();
  if (v === "") { fieldError(input, ""); return ""; }
  if (v.length > 128) { fieldError(input, "name: at most 128 characters"); return null; }
  const bad = v.match(/[^A-Za-z0-9._-]/);
  if (bad) { fieldError(input, `name: “${bad[0]}” is not allowed; use letters, digits, “-”, “_” and “.”`); return null; }
  if (state.models.some((m) => m.name === v)) { fieldError(input, `name: a model named “${v}” is loaded; unload it or pick another name`); return null; }
  fieldError(input, "");
  return v;
}

// ---- state ----
const state = {
  models: [],
  selected: "",        // the model whose LoRAs are shown
  loraState: null,     // GET /v1/loras/state of the selected model
  library: [],         // GET /v1/loras
  digests: {},         // model name → digest (cleared when its LoRAs change)
  jobs: [],
  job: "",             // the job whose preview is shown
  events: null,
  eventsJob: "",
  plugins: [],
  openLogs: new Set(),
  history: [],
  lastSample: "",
  rebinding: false,
  unloading: new Set(), // models whose unload is in flight
};

// ---- models ----
async function refreshModels() {
  try {
    state.models = await api("GET", "/v1/models");
    showError("models-error", null);
  } catch (e) {
    showError("models-error", e);
    return;
  }
  if (!state.models.some((m) => m.name === state.selected)) {
    state.selected = state.models.length ? state.models[0].name : "";
    state.loraState = null;
  }
  renderModels();
  refreshModelFiles();
  for (const m of state.models) {
    if (!(m.name in state.digests) && m.bytes <= 256 << 20 && !state.unloading.has(m.name)) computeDigest(m.name);
  }
}

function renderModels() {
  const rows = [];
  if (!state.models.length) {
    const tr = row("empty");
    cell(tr, "No model is loaded. Load one below.").colSpan = 6;
    rows.push(tr);
  }
  {
    for (const m of state.models) {
      const tr = row("model:" + m.name);
      rows.push(tr);
      tr.dataset.model = m.name;
      if (m.name === state.selected) tr.className = "selected";
      const name = cell(tr, m.name, "Name", "name");
      if (m.name === state.selected) {
        const s = document.createElement("span");
        s.className = "badge";
        s.textContent = "selected";
        name.append(" ", s);
      }
      const fm = cell(tr, m.format, "Format", "format");
      const lay = document.createElement("div");
      lay.className = "muted";
      lay.textContent = m.layout ? `layout ${m.layout}` : "layout unknown";
      fm.append(lay);
      const sz = cell(tr, bytes(m.bytes), "Size", "size");
      const sub = document.createElement("div");
      sub.className = "muted";
      sub.textContent = `${m.tensors} tensors, ${m.weights} NF4`;
      sz.append(sub);
      const dg = cell(tr, "", "Digest", "digest");
      const d = state.digests[m.name];
      dg.replaceChildren();
      if (d && d.sha256) {
        const code = document.createElement("code");
        code.textContent = d.sha256.slice(0, 12) + "…";
        code.title = `SHA-256 of the tensors as held now: ${d.sha256}`;
        dg.append(code);
      } else if (d && d.error) {
        dg.textContent = "failed: " + d.error;
      } else if (d && d.pending) {
        dg.textContent = "computing…";
      } else {
        dg.append(button("Compute", `Compute the digest of ${m.name}`, () => computeDigest(m.name)));
      }
      const lo = cell(tr, m.name === state.selected && state.loraState ? loraLine(state.loraState) : "–", "LoRAs", "loras");
      lo.dataset.model = m.name;
      const act = cell(tr, "", "", "actions");
      act.replaceChildren();
      const sel = button("Select", `Select ${m.name}`, () => selectModel(m.name));
      sel.dataset.key = "select:" + m.name;
      sel.className = "select";
      if (m.name === state.selected) sel.disabled = true;
      const un = button("Unload", `Unload ${m.name}`, (ev) => unloadModel(m.name, ev.currentTarget));
      un.dataset.key = "unload:" + m.name;
      un.className = "unload";
      act.append(sel, un);
    }
  }
  syncRows($("models-body"), rows);
}

function loraLine(st) {
  if (!st || !st.loras || !st.loras.length) return "none";
  return `${st.loras.length} in ${st.mode} mode:\n` + st.loras.map((l) => `${l.name} ${Number(l.strength).toFixed(2)}`).join("\n");
}

// computeDigest asks for the model's digest; an answer to an older request
// than the newest is dropped (the bytes may have changed since).
async function computeDigest(name) {
  if (state.unloading.has(name)) return;
  const mine = { pending: true };
  state.digests[name] = mine;
  renderModels();
  let d;
  try {
    d = await api("GET", `/v1/models/${encodeURIComponent(name)}/digest`);
  } catch (e) {
    d = { error: e.message };
  }
  if (state.digests[name] !== mine) return;
  state.digests[name] = d;
  renderModels();
}

async function refreshModelFiles() {
  let files;
  try {
    files = await api("GET", "/v1/models/files");
  } catch (e) {
    fieldError($("load-file"), "cannot list the models directory: " + e.message);
    return;
  }
  const sel = $("load-file");
  const cur = sel.value;
  const key = JSON.stringify(files.map((f) => [f.path, f.loaded]));
  if (sel.dataset.key === key) return;
  sel.dataset.key = key;
  sel.replaceChildren();
  if (!files.length) sel.add(new Option("(the models directory holds no .safetensors file)", ""));
  for (const f of files) {
    const loaded = f.loaded && f.loaded.length ? ` — loaded as ${f.loaded.join(", ")}` : "";
    const o = new Option(`${f.path} (${bytes(f.bytes)})${loaded}`, f.path);
    o.dataset.name = f.name;
    sel.add(o);
  }
  if (files.some((f) => f.path === cur)) sel.value = cur;
}

async function loadModel(ev) {
  ev.preventDefault();
  const sel = $("load-file");
  const path = sel.value;
  if (!path) { fieldError(sel, "choose a file to load"); return; }
  fieldError(sel, "");
  const nameInput = $("load-name");
  let name = modelName(nameInput);
  if (name === null) { nameInput.focus(); return; }
  if (name === "") {
    const def = sel.selectedOptions[0].dataset.name;
    if (state.models.some((m) => m.name === def)) {
      fieldError(nameInput, `name: “${def}” (the file's name) is loaded already; enter another name`);
      nameInput.focus();
      return;
    }
  }
  await busy($("load-btn"), "Loading…", async () => {
    try {
      const body = { path };
      if (name) body.name = name;
      const m = await api("POST", "/v1/models", body);
      say("models-result", `Loaded ${m.name} from ${path}: ${bytes(m.bytes)}, ${m.tensors} tensors.`, "models-error");
      nameInput.value = "";
      state.selected = m.name;
      state.loraState = null;
    } catch (e) {
      say("models-result", "");
      showError("models-error", new Error(`load ${path}: ${e.message}`));
    }
  });
  await refreshModels();
  refreshLoRAState();
  refreshUsage();
}

async function unloadModel(name, b) {
  state.unloading.add(name); // no digest of a model on its way out
  await busy(b, "Unloading…", async () => {
    try {
      await api("DELETE", `/v1/models/${encodeURIComponent(name)}`);
      delete state.digests[name];
      say("models-result", `Unloaded ${name}; its arena regions are free.`, "models-error");
    } catch (e) {
      say("models-result", "");
      showError("models-error", new Error(`unload ${name}: ${e.message}`));
    }
  });
  await refreshModels();
  state.unloading.delete(name);
  refreshLoRAState();
  refreshUsage();
}

function selectModel(name) {
  state.selected = name;
  state.loraState = null;
  say("models-result", `Selected ${name}: its LoRAs are shown below.`, "models-error");
  renderModels();
  refreshLoRAState();
}

// ---- LoRAs of the selected model ----
async function refreshLibrary() {
  try {
    state.library = (await api("GET", "/v1/loras")).filter((l) => l.kind === "lora");
  } catch (e) {
    fieldError($("lora-file"), "cannot list the LoRA directory: " + e.message);
    return;
  }
  const sel = $("lora-file");
  const cur = sel.value;
  sel.replaceChildren();
  if (!state.library.length) sel.add(new Option("(no LoRA in the LoRA directory)", ""));
  for (const l of state.library) {
    const r = l.lora || {};
    sel.add(new Option(`${l.name} (${r.format || "?"}, ${r.modules || 0} modules, rank ${(r.ranks || []).join("/") || "?"})`, l.name));
  }
  if (state.library.some((l) => l.name === cur)) sel.value = cur;
}

async function refreshLoRAState() {
  $("lora-model").textContent = state.selected || "(no model)";
  if (!state.selected) {
    state.loraState = null;
    renderApplied();
    return;
  }
  if (state.rebinding) return;
  try {
    state.loraState = await api("GET", "/v1/loras/state?model=" + encodeURIComponent(state.selected));
    showError("lora-error", null);
  } catch (e) {
    state.loraState = null;
    showError("lora-error", e);
  }
  renderApplied();
  updateLoRACell();
}

// updateLoRACell shows the selected model's LoRA set in its models row.
function updateLoRACell() {
  const lo = document.querySelector(`#models-body td.loras[data-model="${CSS.escape(state.selected)}"]`);
  if (lo) lo.textContent = loraLine(state.loraState);
}

function renderApplied() {
  const st = state.loraState;
  const body = $("applied-body");
  const sum = $("lora-summary");
  if (!st) { sum.textContent = "–"; body.replaceChildren(); return; }
  const rep = st.report || {};
  const parts = [];
  if (st.loras.length) {
    parts.push(`mode ${st.mode}`);
    parts.push(st.mode === "fuse"
      ? `retention ${typeof rep.retention === "number" ? (100 * rep.retention).toFixed(2) + "%" : "–"} (fused NF4 keeps this share of the exact change)`
      : "exact (side factors, no retention loss)");
    if (st.mode === "fuse" || st.journal_bytes || st.journal_file_bytes) {
      parts.push(`journal ${bytes(st.journal_bytes || 0)} in the arena` + (st.journal_file_bytes ? ` + ${bytes(st.journal_file_bytes)} referenced in the model file` : "") +
        (st.journal_memory_bytes ? ` (a copy of ${bytes(st.journal_memory_bytes)} kept in host memory for fast restores)` : ""));
    } else {
      parts.push("journal: none needed (the weights are untouched)");
    }
    if (st.fused && st.fused.length) parts.push(`${st.fused.length} weights fused`);
    if (st.binding_generation) parts.push(`binding generation ${st.binding_generation}`);
  } else {
    parts.push("no LoRA applied; the weights are the file's");
  }
  sum.textContent = parts.join(" · ");
  sum.dataset.mode = st.mode || "";
  sum.dataset.binding = String(st.binding_generation || 0);
  if (st.mode) $("lora-mode").value = st.mode;
  // Do not move the sliders under the user's hand.
  if (body.contains(document.activeElement) && document.activeElement.type === "range" && (state.rebinding || state.dragging)) return;
  const rows = [];
  if (!st.loras.length) {
    const tr = row("empty");
    cell(tr, "no LoRA applied").colSpan = 3;
    rows.push(tr);
  }
  {
    st.loras.forEach((l, i) => {
      const tr = row("lora:" + l.name);
      rows.push(tr);
      tr.dataset.lora = l.name;
      const nm = cell(tr, l.name, "LoRA", "name");
      const r = rep.loras && rep.loras[i];
      if (r) {
        const m = document.createElement("span");
        m.className = "muted";
        const un = Array.isArray(r.unmatched) ? r.unmatched.length : 0;
        m.textContent = ` ${r.matched} keys matched${un ? `, ${un} unmatched` : ""}`;
        nm.append(m);
      }
      const td = cell(tr, "", "Strength", "strength");
      td.replaceChildren();
      const id = `applied-strength-${i}`;
      const lab = document.createElement("label");
      lab.htmlFor = id;
      lab.className = "sr-only";
      lab.textContent = `strength of ${l.name}`;
      const slider = document.createElement("input");
      slider.type = "range";
      slider.min = "-2"; slider.max = "2"; slider.step = "0.05";
      slider.setAttribute("value", String(l.strength));
      slider.value = String(l.strength);
      slider.id = id;
      slider.dataset.key = "strength:" + l.name;
      slider.dataset.lora = l.name;
      slider.className = "strength";
      const out = document.createElement("output");
      out.htmlFor = id;
      out.textContent = Number(l.strength).toFixed(2);
      slider.addEventListener("input", () => { out.value = Number(slider.value).toFixed(2); });
      slider.addEventListener("change", () => { state.dragging = false; rebind(); });
      slider.addEventListener("pointerdown", () => { state.dragging = true; });
      slider.addEventListener("pointerup", () => { state.dragging = false; });
      td.append(lab, slider, out);
      const act = cell(tr, "", "", "actions");
      act.replaceChildren();
      const rm = button("Remove", `Remove ${l.name} from ${state.selected}`, (ev) => removeOne(l.name, ev.currentTarget), "remove");
      rm.dataset.key = "remove:" + l.name;
      act.append(rm);
    });
  }
  syncRows(body, rows);
}

// applySet posts the whole set for the selected model and shows the result.
async function applySet(loras, mode, what) {
  const model = state.selected;
  const t0 = performance.now();
  const res = loras.length
    ? await api("POST", "/v1/loras/apply", { model, mode, loras })
    : await api("DELETE", "/v1/loras?model=" + encodeURIComponent(model));
  const ms = res && typeof res.elapsed_ns === "number" ? res.elapsed_ns / 1e6 : performance.now() - t0;
  delete state.digests[model];
  state.loraState = res;
  renderApplied();
  updateLoRACell();
  // The bytes changed (fuse) or were restored: show the digest as held now.
  const m = state.models.find((x) => x.name === model);
  if (m && m.bytes <= 256 << 20) computeDigest(model);
  const how = { set_strengths: "rebound live (same factors, new strengths)", apply: "applied", noop: "unchanged", remove: "removed" }[res.path] || res.path;
  say("lora-result", `${what}: ${how} on ${model} in ${ms.toFixed(1)} ms${res.binding_generation ? `, binding generation ${res.binding_generation}` : ""}.`, "lora-error");
  $("lora-result").dataset.path = res.path || "";
  if (res.report) renderReport(res);
  return res;
}

function currentSet() {
  const st = state.loraState || { loras: [] };
  return st.loras.map((l) => ({ name: l.name, strength: l.strength }));
}

// rebind sends the sliders' strengths; moves made while one is in flight
// are sent together once it answers, so answers never arrive out of order.
async function rebind() {
  if (!state.loraState) return;
  if (state.rebinding) { state.rebindAgain = true; return; }
  const set = currentSet();
  for (const s of document.querySelectorAll("#applied-body input.strength")) {
    const e = set.find((x) => x.name === s.dataset.lora);
    if (e) e.strength = Number(s.value);
  }
  state.rebinding = true;
  try {
    await applySet(set, state.loraState.mode || "side", "strengths " + set.map((l) => `${l.name} ${l.strength.toFixed(2)}`).join(", "));
  } catch (e) {
    say("lora-result", "");
    showError("lora-error", new Error("change strength: " + e.message + " (the previous strengths stay applied)"));
    state.rebinding = false;
    await refreshLoRAState();
  } finally {
    state.rebinding = false;
  }
  if (state.rebindAgain) {
    state.rebindAgain = false;
    return rebind();
  }
  refreshUsage();
}

async function addLoRA(ev) {
  ev.preventDefault();
  if (!state.selected) { showError("lora-error", new Error("load a model first")); return; }
  const fileSel = $("lora-file");
  if (!fileSel.value) { fieldError(fileSel, "choose a LoRA"); return; }
  fieldError(fileSel, "");
  const s = strengthOf($("lora-strength"));
  if (s === null) { $("lora-strength").focus(); return; }
  const set = currentSet().filter((l) => l.name !== fileSel.value);
  set.push({ name: fileSel.value, strength: s });
  const mode = $("lora-mode").value;
  await busy($("lora-apply"), "Applying…", async () => {
    try {
      await applySet(set, mode, `${fileSel.value} at ${s.toFixed(2)}`);
    } catch (e) {
      say("lora-result", "");
      showError("lora-error", new Error(`apply ${fileSel.value}: ${e.message} (nothing changed)`));
    }
  });
  refreshUsage();
}

async function removeOne(name, b) {
  const set = currentSet().filter((l) => l.name !== name);
  await busy(b, "Removing…", async () => {
    try {
      await applySet(set, (state.loraState && state.loraState.mode) || "side", `remove ${name}`);
    } catch (e) {
      say("lora-result", "");
      showError("lora-error", new Error(`remove ${name}: ${e.message}`));
    }
  });
  refreshUsage();
}

async function removeAll(ev) {
  await busy(ev.currentTarget, "Removing…", async () => {
    try {
      await applySet([], "side", "remove all");
    } catch (e) {
      say("lora-result", "");
      showError("lora-error", new Error(`remove all: ${e.message}`));
    }
  });
  refreshUsage();
}

function unmatchedKey(u) {
  if (typeof u === "string") return u;
  return u.key ? (u.reason ? `${u.key}: ${u.reason}` : u.key) : JSON.stringify(u);
}

// renderReport shows an apply's report: per LoRA its matched and unmatched
// keys, then mode, retention, time and scratch.
function renderReport(res) {
  const rep = res.report || {};
  const box = $("lora-report");
  box.replaceChildren();
  const t = document.createElement("table");
  t.id = "lora-report-table";
  t.className = "stack";
  const head = t.createTHead().insertRow();
  for (const h of ["LoRA", "Strength", "Matched keys", "Unmatched keys"]) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = h;
    head.appendChild(th);
  }
  const tb = t.createTBody();
  (rep.loras || []).forEach((l, i) => {
    const tr = tb.insertRow();
    const asked = res.loras && res.loras[i];
    cell(tr, (asked && asked.name) || (l.file || "").split("/").pop(), "LoRA");
    cell(tr, asked ? Number(asked.strength).toFixed(2) : "", "Strength");
    cell(tr, l.matched, "Matched keys", "matched");
    const un = Array.isArray(l.unmatched) ? l.unmatched : [];
    const td = cell(tr, un.length, "Unmatched keys", "unmatched");
    if (un.length) {
      const d = document.createElement("details");
      const s = document.createElement("summary");
      s.textContent = "keys";
      const pre = document.createElement("pre");
      pre.textContent = un.map(unmatchedKey).join("\n");
      d.append(s, pre);
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
}

// ---- jobs ----
const FINAL = ["done", "failed", "cancelled"];

// refreshPipelines fills the pipeline choice from GET /v1/pipelines: every
// pipeline plugin, those that cannot run (unavailable, failed, starting)
// disabled with their reason, and the server's default selected until the
// user picks another runnable one.
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
  const ps = info.pipelines || [];
  const key = JSON.stringify([info.default, ps.map((p) => [p.name, p.state, p.reason || ""])]);
  if (sel.dataset.key === key) return;
  sel.dataset.key = key;
  const cur = sel.value;
  sel.replaceChildren();
  if (!ps.length) sel.add(new Option("(no pipeline plugin)", ""));
  for (const p of ps) {
    const o = new Option(p.runnable ? p.name : `${p.name} (${p.state}${p.reason ? ": " + p.reason : ""})`, p.name);
    o.disabled = !p.runnable;
    if (p.reason) o.title = p.reason;
    sel.add(o);
  }
  const keep = pipelineChosen && ps.some((p) => p.name === cur && p.runnable);
  sel.value = keep ? cur : (info.default || "");
  const note = $("job-pipeline-note");
  if (note) note.textContent = info.default ? `default: ${info.default}` : (info.reason || "no pipeline can run");
}

async function startJob(ev) {
  ev.preventDefault();
  const pipeSel = $("job-pipeline");
  const pipeline = pipeSel.value;
  const checks = [
    wholeNumber($("job-steps"), 1, 1000, "steps"),
    wholeNumber($("job-seed"), 0, Number.MAX_SAFE_INTEGER, "seed"),
    side($("job-width"), "width"),
    side($("job-height"), "height"),
  ];
  let bad = !pipeline;
  fieldError(pipeSel, pipeline ? "" : "no pipeline plugin is serving (see Plugins)");
  const ids = ["job-steps", "job-seed", "job-width", "job-height"];
  checks.forEach((v, i) => { if (v === null && !bad) { bad = true; $(ids[i]).focus(); } else if (v === null) bad = true; });
  if (bad) { say("job-result", "Not started: fix the fields marked above."); return; }
  const [steps, seed, width, height] = checks;
  const params = { steps, seed, width, height };
  const prompt = $("job-prompt").value.trim();
  if (prompt) params.prompt = prompt;
  await busy($("job-start"), "Starting…", async () => {
    try {
      const job = await api("POST", "/v1/jobs", { pipeline, params, origin: "console" });
      say("job-result", `Started ${job.id} on ${pipeline} (${job.state}).`, "job-error");
      state.jobs = [job, ...state.jobs.filter((j) => j.id !== job.id)];
      selectJob(job.id);
    } catch (e) {
      say("job-result", "");
      showError("job-error", new Error(`start job on ${pipeline}: ${e.message}`));
    }
  });
  refreshJobs();
}

async function refreshJobs() {
  try {
    state.jobs = (await api("GET", "/v1/jobs")).reverse();
  } catch (e) {
    showError("job-error", e);
    return;
  }
  renderJobs();
  renderGallery();
  const sel = state.jobs.find((j) => j.id === state.job);
  if (sel) showJobStatus(sel);
}

function stepsOf(j) {
  const want = j.params && j.params.steps;
  if (j.total) return `${j.step}/${j.total}`;
  return want ? `0/${want}` : "–";
}

function renderJobs() {
  const rows = [];
  if (!state.jobs.length) {
    const tr = row("empty");
    cell(tr, "no jobs yet").colSpan = 7;
    rows.push(tr);
  }
  {
    for (const j of state.jobs) {
      const tr = row("job:" + j.id);
      rows.push(tr);
      tr.dataset.job = j.id;
      tr.dataset.state = j.state;
      if (j.id === state.job) tr.className = "selected";
      cell(tr, j.id, "Job", "id");
      const st = cell(tr, j.state, "State", "state state-" + j.state);
      if (j.state === "running" && j.progress) st.textContent = `running ${Math.round(100 * j.progress)}%`;
      if (j.error && j.state !== "done") st.title = j.error;
      if (j.error && j.state === "failed") {
        const why = document.createElement("div");
        why.className = "err-text";
        why.textContent = j.error.length > 160 ? j.error.slice(0, 160) + "…" : j.error;
        st.append(why);
      }
      cell(tr, j.pipeline, "Pipeline");
      cell(tr, stepsOf(j), "Steps", "steps");
      cell(tr, { console: "console", a1111: "A1111 API", comfyui: "ComfyUI", api: "API" }[j.origin] || j.origin || "API", "From", "origin");
      let time = `${clock(j.started)}, ${seconds(j.elapsed_seconds)}`;
      if (!j.started) time = j.state === "queued" ? `waiting since ${clock(j.created)}` : `${clock(j.created)}, never ran`;
      cell(tr, time + (j.state === "running" && j.eta_seconds ? `, ${seconds(j.eta_seconds)} left` : ""), "Time");
      const act = cell(tr, "", "", "actions");
      act.replaceChildren();
      const show = button("Show", `Show the preview of ${j.id}`, () => selectJob(j.id), "show");
      show.dataset.key = "show:" + j.id;
      act.append(show);
      if (!FINAL.includes(j.state)) {
        const c = button("Cancel", `Cancel ${j.id}`, (ev) => cancelJob(j.id, ev.currentTarget), "cancel");
        c.dataset.key = "cancel:" + j.id;
        act.append(c);
      }
    }
  }
  syncRows($("jobs-body"), rows);
}

async function cancelJob(id, b) {
  await busy(b, "Cancelling…", async () => {
    try {
      const s = await api("DELETE", `/v1/jobs/${encodeURIComponent(id)}`);
      say("job-result", `${id}: ${s.state}${s.state === "cancelled" ? "" : " (it ended before the cancel reached it)"}.`, "job-error");
    } catch (e) {
      say("job-result", "");
      showError("job-error", new Error(`cancel ${id}: ${e.message}`));
    }
  });
  refreshJobs();
}

// previewWords says how much of the job's progress the preview shows, in
// words for people rather than counters.
function previewWords(j) {
  const p = j.preview || {};
  const pub = p.published || 0, ren = p.rendered || 0;
  if (p.method === "none") return "previews are off for this job";
  if (!pub) return FINAL.includes(j.state) ? "no step was published" : "waiting for the first step";
  const done = `${ren} of ${pub} steps drawn`;
  if (p.every_n > 1) return `showing every ${ordinal(p.every_n)} step, as the job asked (${done})`;
  if (ren >= pub) return `showing every step (${done})`;
  const n = Math.max(2, Math.round(pub / Math.max(ren, 1)));
  if (ren === 0) return `no picture drawn yet (${pub} steps published)`;
  if (pub - ren <= 1 && !FINAL.includes(j.state)) return `showing every step (${done}; the newest is being drawn)`;
  return `showing about every ${ordinal(n)} step to keep up (${done})`;
}

function showJobStatus(j) {
  $("job-selected").textContent = j.id;
  const step = j.total ? ` at step ${j.step} of ${j.total}` : "";
  const eta = j.eta_seconds > 0 && !FINAL.includes(j.state) ? `, about ${seconds(j.eta_seconds)} left` : "";
  let line = `${j.pipeline}: ${j.state}${step}${eta}`;
  if (j.state === "done") line = `${j.pipeline}: done in ${seconds(j.elapsed_seconds)}`;
  if (j.error && j.state !== "done") line += ` — ${j.error}`;
  $("job-status").textContent = line;
  const fr = $("job-frames");
  fr.textContent = previewWords(j);
  const img = $("job-preview");
  const frame = (j.preview && j.preview.frame) || 0;
  // A running job streams; a finished one shows its last frame.
  if (j.state === "running") {
    const src = `/v1/jobs/${encodeURIComponent(j.id)}/preview.mjpeg`;
    if (img.dataset.src !== src) { img.dataset.src = src; img.src = src; }
    img.hidden = false;
  } else if (frame > 0) {
    const src = `/v1/jobs/${encodeURIComponent(j.id)}/preview.jpg?frame=${frame}`;
    if (img.dataset.src !== src) { img.dataset.src = src; img.src = src; }
    img.hidden = false;
  } else if (j.state !== "running") {
    img.hidden = true;
    img.removeAttribute("src");
    img.dataset.src = "";
  }
}

// selectJob shows the job's live preview and follows its events.
function selectJob(id) {
  state.job = id;
  const j = state.jobs.find((x) => x.id === id);
  const fr = $("job-frames");
  fr.dataset.frames = "0";
  if (state.events) { state.events.close(); state.events = null; }
  const img = $("job-preview");
  img.dataset.src = "";
  if (j) showJobStatus(j);
  renderJobs();
  if (j && FINAL.includes(j.state)) {
    if (j.preview && j.preview.frame) fr.dataset.frames = "1";
    return;
  }
  const frames = new Set();
  const es = new EventSource(`/v1/jobs/${encodeURIComponent(id)}/events`);
  state.events = es;
  const onEvent = (m) => {
    let d;
    try { d = JSON.parse(m.data); } catch (_) { return; }
    const cur = state.jobs.find((x) => x.id === id) || { id, pipeline: "", preview: {} };
    const snap = Object.assign({}, cur, {
      state: d.state, step: d.step, total: d.total, progress: d.progress, eta_seconds: d.eta_seconds, error: d.error || cur.error,
      preview: Object.assign({}, cur.preview, { frame: d.frame, frame_step: d.frame_step, published: d.published, rendered: d.rendered, dropped: d.dropped }),
    });
    if (d.frame) frames.add(d.frame);
    if (state.job === id) fr.dataset.frames = String(frames.size);
    if (state.job === id) showJobStatus(snap);
    if (FINAL.includes(d.state)) { es.close(); if (state.events === es) state.events = null; refreshJobs(); }
  };
  for (const t of ["state", "progress", "frame"]) es.addEventListener(t, onEvent);
  es.onerror = () => { es.close(); if (state.events === es) state.events = null; };
}

function renderGallery() {
  const g = $("gallery");
  const done = state.jobs.filter((j) => j.state === "done" && j.preview && j.preview.frame > 0).slice(0, 24);
  const key = done.map((j) => j.id).join();
  if (g.dataset.key === key) return;
  g.dataset.key = key;
  g.replaceChildren();
  if (!done.length) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = "Finished jobs show their final picture here.";
    g.append(p);
    return;
  }
  for (const j of done) {
    const fig = document.createElement("figure");
    fig.dataset.job = j.id;
    const b = document.createElement("button");
    b.type = "button";
    b.className = "thumb";
    b.setAttribute("aria-label", `Show ${j.id}`);
    b.addEventListener("click", () => selectJob(j.id));
    const img = document.createElement("img");
    img.alt = `final picture of ${j.id}` + (j.params && j.params.prompt ? `: ${j.params.prompt}` : "");
    img.loading = "lazy";
    img.src = `/v1/jobs/${encodeURIComponent(j.id)}/preview.jpg?frame=${j.preview.frame}`;
    b.append(img);
    const cap = document.createElement("figcaption");
    const p = j.params || {};
    cap.textContent = `${p.prompt || j.pipeline} · ${p.steps || j.total} steps · seed ${p.seed ?? "–"} · ${clock(j.ended)}`;
    fig.append(b, cap);
    g.append(fig);
  }
}

// ---- plugins ----
async function refreshPlugins() {
  try {
    state.plugins = await api("GET", "/v1/plugins");
    showError("plugins-error", null);
  } catch (e) {
    showError("plugins-error", e);
    return;
  }
  refreshPipelines();
  if (document.querySelector("#plugins-body button.reload:disabled")) return; // not under a pending reload
  const rows = [];
  if (!state.plugins.length) {
    const tr = row("empty");
    cell(tr, "no plugins (see --plugins)").colSpan = 6;
    rows.push(tr);
  }
  {
    for (const p of state.plugins) {
      const tr = row("plugin:" + p.name);
      rows.push(tr);
      tr.dataset.plugin = p.name;
      const nm = cell(tr, p.name, "Plugin", "name");
      const v = document.createElement("span");
      v.className = "muted";
      v.textContent = ` ${p.kind || ""} ${p.version || ""} (${p.language || "?"})`;
      nm.append(v);
      const recentCall = p.last_call_error && Date.now() - new Date(p.last_call_error_at).getTime() < 10 * 60 * 1000;
      let stText = p.state + (p.reason ? `: ${p.reason}` : "");
      if (p.state === "serving" && recentCall) stText += " — recent calls fail";
      const st = cell(tr, stText, "State", "state state-" + p.state + (recentCall && p.state === "serving" ? " state-warn" : ""));
      st.dataset.state = p.state;
      cell(tr, p.generation ? `${p.generation} (pid ${p.pid}, since ${clock(p.since)})` : "none running", "Generation", "generation").dataset.generation = String(p.generation);
      const budget = p.crash_limit ? `; fails after ${p.crash_limit} crashes in ${Math.round(p.crash_window_seconds)} s (${p.crashes || 0} so far)` : "";
      const rs = cell(tr, `${p.restarts}${budget}`, "Restarts", "restarts");
      rs.dataset.restarts = String(p.restarts);
      const le = cell(tr, "", "Last error", "last-error");
      le.replaceChildren();
      if (!p.last_error && !p.last_call_error) le.textContent = "none";
      if (p.last_error) {
        const d = document.createElement("div");
        d.className = "err-text";
        d.textContent = `${clock(p.last_error_at)} (${ago(p.last_error_at)}): ${p.last_error}`;
        le.append(d);
      }
      if (p.last_call_error) {
        const d = document.createElement("div");
        d.className = "err-text call";
        d.textContent = `failed call, ${clock(p.last_call_error_at)} (${ago(p.last_call_error_at)}): ${p.last_call_error}`;
        le.append(d);
      }
      const act = cell(tr, "", "", "actions");
      act.replaceChildren();
      const rl = button("Reload", `Reload ${p.name}`, (ev) => reloadPlugin(p.name, ev.currentTarget), "reload");
      rl.dataset.key = "reload:" + p.name;
      const lg = button(state.openLogs.has(p.name) ? "Hide log" : "Log", `Show the log of ${p.name}`, () => toggleLog(p.name), "log");
      lg.dataset.key = "log:" + p.name;
      lg.setAttribute("aria-expanded", state.openLogs.has(p.name) ? "true" : "false");
      act.append(rl, lg);
      if (state.openLogs.has(p.name)) {
        const lr = row("log:" + p.name);
        rows.push(lr);
        lr.className = "log-row";
        lr.dataset.logFor = p.name;
        const td = cell(lr, "", "");
        td.colSpan = 6;
        const pre = document.createElement("pre");
        pre.className = "log";
        pre.dataset.plugin = p.name;
        pre.textContent = (logCache[p.name] || "loading…");
        td.replaceChildren(pre);
        loadLog(p.name);
      }
    }
  }
  syncRows($("plugins-body"), rows);
}

const logCache = {};

async function loadLog(name) {
  try {
    const lines = await api("GET", `/v1/plugins/${encodeURIComponent(name)}/logs?n=40`);
    logCache[name] = lines.length
      ? lines.map((l) => `${clock(l.time)} g${l.generation} ${l.level} ${l.text}`).join("\n")
      : "(the plugin has written nothing)";
  } catch (e) {
    logCache[name] = "cannot read the log: " + e.message;
  }
  const pre = document.querySelector(`pre.log[data-plugin="${CSS.escape(name)}"]`);
  if (pre && pre.textContent !== logCache[name]) {
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = logCache[name];
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }
}

function toggleLog(name) {
  if (state.openLogs.has(name)) state.openLogs.delete(name); else state.openLogs.add(name);
  refreshPlugins();
}

async function reloadPlugin(name, b) {
  await busy(b, "Reloading…", async () => {
    try {
      const st = await api("POST", `/v1/plugins/${encodeURIComponent(name)}/reload`);
      say("plugins-result", `Reloaded ${name}: generation ${st.generation} is ${st.state}.`, "plugins-error");
    } catch (e) {
      say("plugins-result", "");
      showError("plugins-error", new Error(`reload ${name}: ${e.message}`));
    }
  });
  await refreshPlugins();
}

// ---- memory ----
async function refreshUsage() {
  let u;
  try {
    u = await api("GET", "/v1/arena/usage");
    $("health").textContent = "connected";
    $("health").className = "ok";
    showError("arena-error", null);
  } catch (e) {
    $("health").textContent = "disconnected";
    $("health").className = "bad";
    showError("arena-error", e);
    return;
  }
  const g = $("arena-gauge");
  g.max = Math.max(u.capacity, 1);
  g.value = u.allocated;
  let text = `${bytes(u.allocated)} of ${bytes(u.capacity)} allocated (${(100 * u.allocated / Math.max(u.capacity, 1)).toFixed(2)}%), peak ${bytes(u.peak)}, fragmentation ${(100 * u.fragmentation).toFixed(1)}%, ${u.regions} regions in ${u.segments} segments (${u.backend})`;
  if (u.device) text += `; device: ${bytes(u.device.used)} of ${bytes(u.device.total)} used`;
  $("arena-text").textContent = text;
  const rows = [];
  if (!u.by_owner.length) {
    const tr = row("empty");
    cell(tr, "nothing allocated").colSpan = 5;
    rows.push(tr);
  }
  for (const x of u.by_owner) {
    const tr = row(x.owner + "|" + x.purpose);
    rows.push(tr);
    tr.dataset.owner = x.owner;
    tr.dataset.purpose = x.purpose;
    cell(tr, x.owner, "Owner", "owner");
    cell(tr, x.purpose, "What", "purpose");
    cell(tr, bytes(x.bytes), "Bytes", "bytes").dataset.bytes = String(x.bytes);
    cell(tr, x.regions, "Regions");
    const td = cell(tr, "", "Share");
    td.replaceChildren();
    const m = document.createElement("meter");
    m.min = 0; m.max = Math.max(u.allocated, 1); m.value = x.bytes;
    m.setAttribute("aria-label", `${x.owner} ${x.purpose} share`);
    const pct = document.createElement("span");
    pct.textContent = ` ${(100 * x.bytes / Math.max(u.allocated, 1)).toFixed(1)}%`;
    td.append(m, pct);
  }
  syncRows($("usage-body"), rows);
}

async function refreshHistory() {
  let h;
  try {
    h = await api("GET", "/v1/arena/history" + (state.lastSample ? "?since=" + encodeURIComponent(state.lastSample) : ""));
  } catch (e) {
    showError("arena-error", e);
    return;
  }
  state.history.push(...h.samples);
  if (h.samples.length) state.lastSample = h.samples[h.samples.length - 1].t;
  const horizon = Date.now() - 10 * 60 * 1000;
  state.history = state.history.filter((s) => new Date(s.t).getTime() >= horizon);
  state.capacity = h.capacity;
  state.deviceTotal = h.device_total || 0;
  drawPlot();
}

function drawPlot() {
  const c = $("mem-plot");
  const w = c.clientWidth || 640, hgt = c.clientHeight || 180;
  const dpr = window.devicePixelRatio || 1;
  if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(hgt * dpr); }
  const ctx = c.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, hgt);
  const hs = state.history;
  c.dataset.samples = String(hs.length);
  const left = 62, right = 44, top = 8, bottom = 20;
  const pw = w - left - right, ph = hgt - top - bottom;
  const css = getComputedStyle(document.documentElement);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = css.getPropertyValue("--muted");
  if (!hs.length) { ctx.fillText("collecting samples…", left, top + 14); return; }
  const dev = hs.some((s) => s.device_used);
  let ymax = Math.max(1, ...hs.map((s) => Math.max(s.peak, dev ? s.device_used || 0 : 0)));
  ymax *= 1.15;
  const t1 = Date.now(), t0 = t1 - Math.max(60 * 1000, t1 - new Date(hs[0].t).getTime());
  const x = (t) => left + pw * (new Date(t).getTime() - t0) / (t1 - t0);
  const y = (v) => top + ph * (1 - v / ymax);
  const yf = (f) => top + ph * (1 - f);
  ctx.strokeStyle = css.getPropertyValue("--line");
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const yy = top + ph * i / 4;
    ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(left + pw, yy); ctx.stroke();
    ctx.fillText(bytes(ymax * (1 - i / 4)), 2, yy + 4);
    ctx.fillText(`${100 - 25 * i}%`, left + pw + 6, yy + 4);
  }
  const mins = Math.round((t1 - t0) / 60000);
  ctx.fillText(`${mins} min ago`, left, hgt - 4);
  ctx.fillText("now", left + pw - 20, hgt - 4);
  const line = (get, color, dash, scale) => {
    ctx.strokeStyle = color;
    ctx.setLineDash(dash);
    ctx.lineWidth = 2;
    ctx.beginPath();
    hs.forEach((s, i) => { const yy = scale(get(s)); if (i) ctx.lineTo(x(s.t), yy); else ctx.moveTo(x(s.t), yy); });
    ctx.stroke();
    ctx.setLineDash([]);
  };
  line((s) => s.peak, "#9aa5b8", [5, 4], y);
  line((s) => s.allocated, "#2457c5", [], y);
  line((s) => s.fragmentation, "#d97706", [2, 3], yf);
  if (dev) line((s) => s.device_used || 0, "#7c3aed", [], y);
  const last = hs[hs.length - 1];
  const legend = $("mem-legend");
  legend.replaceChildren();
  const item = (cls, text) => { const s = document.createElement("span"); s.className = "key " + cls; s.textContent = text; legend.append(s); };
  item("alloc", `allocated ${bytes(last.allocated)}`);
  item("peak", `peak ${bytes(last.peak)}`);
  item("frag", `fragmentation ${(100 * last.fragmentation).toFixed(1)}% (right axis)`);
  if (dev) item("dev", `device used ${bytes(last.device_used)} of ${bytes(state.deviceTotal)}`);
}

// ---- wiring ----
function every(ms, fn) {
  fn();
  setInterval(() => { if (!document.hidden) fn(); }, ms);
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = token();
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = $("token").value.trim();
    if (v) sessionStorage.setItem("arenahost-token", v); else sessionStorage.removeItem("arenahost-token");
    say("token-result", v ? "saved for this tab" : "cleared");
  });
  $("load-form").addEventListener("submit", loadModel);
  $("load-name").addEventListener("input", () => modelName($("load-name")));
  $("load-file").addEventListener("change", () => fieldError($("load-file"), ""));
  $("lora-form").addEventListener("submit", addLoRA);
  $("lora-strength").addEventListener("input", () => strengthOf($("lora-strength")));
  $("lora-remove-all").addEventListener("click", removeAll);
  $("job-form").addEventListener("submit", startJob);
  $("job-pipeline").addEventListener("change", () => { pipelineChosen = true; });
  $("job-steps").addEventListener("input", () => wholeNumber($("job-steps"), 1, 1000, "steps"));
  $("job-seed").addEventListener("input", () => wholeNumber($("job-seed"), 0, Number.MAX_SAFE_INTEGER, "seed"));
  $("job-width").addEventListener("change", () => side($("job-width"), "width"));
  $("job-height").addEventListener("change", () => side($("job-height"), "height"));
  window.addEventListener("resize", drawPlot);
  refreshLibrary();
  every(3000, async () => { await refreshModels(); refreshLoRAState(); });
  every(1500, refreshJobs);
  every(3000, refreshPlugins);
  every(2000, refreshUsage);
  every(2000, refreshHistory);
  every(30000, refreshLibrary);
});
