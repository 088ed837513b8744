// wsclip review page: list, sort and filter the labelled images, show one, mark it accepted / rejected.
"use strict";

const api = "api/";
const token = (() => {
  const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (m) { sessionStorage.setItem("wsclip-token", decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname); }
  return sessionStorage.getItem("wsclip-token");
})();
const auth = token ? { Authorization: "Bearer " + token } : {};
const state = { meta: null, images: [], shown: [], pos: 0, urls: [] };
const $ = (id) => document.getElementById(id);

async function get(path, as) {
  const r = await fetch(api + path, { headers: auth, cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${(await r.text()).slice(0, 200)}`);
  return as === "blob" ? r.blob() : r.json();
}

function say(text) { $("status").textContent = text || ""; }

async function setImage(img, path) {
  try {
    const url = URL.createObjectURL(await get(path, "blob"));
    state.urls.push(url);
    img.src = url;
  } catch (e) { img.removeAttribute("src"); img.alt = String(e.message); }
}

function fmt(v) { return v === null || v === undefined ? "-" : Number(v).toFixed(3); }

function order() {
  const key = $("sort").value, cls = $("class-filter").value, mark = $("mark-filter").value;
  let list = state.images.filter((im) =>
    (cls === "" || im.classes.includes(Number(cls))) &&
    (mark === "" || (mark === "none" ? !im.mark : im.mark === mark)));
  const val = (im, k) => (im[k] === null || im[k] === undefined ? Infinity : im[k]);
  if (key === "id") list.sort((a, b) => a.id.localeCompare(b.id));
  else if (key === "-score") list.sort((a, b) => val(b, "score") - val(a, "score") || a.id.localeCompare(b.id));
  else list.sort((a, b) => val(a, key) - val(b, key) || a.id.localeCompare(b.id));
  return list;
}

function renderList() {
  const nav = $("list");
  nav.textContent = "";
  state.shown.forEach((im, n) => {
    const row = document.createElement("div");
    row.dataset.id = im.id;
    row.className = (n === state.pos ? "current " : "") + (im.mark || "");
    row.innerHTML = `<span></span><span>${fmt(im.score)}</span>`;
    row.firstChild.textContent = im.id;
    row.onclick = () => { state.pos = n; show(); };
    nav.appendChild(row);
  });
  const cur = nav.children[state.pos];
  if (cur) cur.scrollIntoView({ block: "nearest" });
  const m = state.meta;
  $("counts").textContent = `${state.shown.length} of ${m.images} shown, ${m.accepted} accepted, ${m.rejected} rejected`;
}

async function show() {
  renderList();
  state.urls.forEach((u) => URL.revokeObjectURL(u));
  state.urls = [];
  const im = state.shown[state.pos];
  if (!im) { $("image-id").textContent = "no image matches the filters"; return; }
  const q = encodeURIComponent(im.id);
  $("image-id").textContent = im.id;
  $("position").textContent = `(${state.pos + 1} / ${state.shown.length})`;
  setMark(im.mark);
  setImage($("photo"), `photo?id=${q}`);
  setImage($("overlay"), `overlay?id=${q}`);
  const d = await get(`image?id=${q}`);
  if (state.shown[state.pos] !== im) return;  // moved on meanwhile
  const names = state.meta.classes, colours = state.meta.colours;
  const legend = $("legend");
  legend.textContent = "";
  for (const v of [0, ...d.classes.map((k) => k + 1)]) {
    const row = document.createElement("div");
    const iou = d.iou && d.iou[names[v]] !== undefined ? ` IoU ${fmt(d.iou[names[v]])}` : "";
    row.innerHTML = `<span class="swatch" style="background:${colours[v]}"></span><span></span>`;
    row.lastChild.textContent = names[v] + iou;
    legend.appendChild(row);
  }
  const ign = document.createElement("div");
  ign.innerHTML = `<span class="swatch" style="background:${state.meta.ignore_colour}"></span><span>ignore (255)</span>`;
  legend.appendChild(ign);
  const rows = [["score", d.quality.score], ["dropped (CGL)", d.quality.dropped], ["coverage", d.quality.coverage],
                ["CRF changed", d.quality.crf_changed],
                ["CAM blur", d.quality.blur], ["degenerate classes", d.quality.degenerate]];
  if (d.quality.miou !== undefined) rows.push(["mIoU vs ground truth", d.quality.miou]);
  $("quality").innerHTML = rows.map(([k, v], n) => `<tr class="${n === 0 ? "score" : ""}"><td>${k}</td><td>${fmt(v)}</td></tr>`).join("");
  const cams = $("cams");
  cams.textContent = d.cams.length ? "" : "no CAMs stored (label with --cams)";
  for (const k of d.cams) {
    const fig = document.createElement("figure");
    fig.innerHTML = "<img alt='cam'><figcaption></figcaption>";
    fig.lastChild.textContent = names[k + 1];
    cams.appendChild(fig);
    setImage(fig.firstChild, `cam?id=${q}&k=${k}`);
  }
}

function setMark(mark) {
  const el = $("mark");
  el.textContent = mark || "unmarked";
  el.className = "mark " + (mark || "");
}

async function mark(status) {
  const im = state.shown[state.pos];
  if (!im) return;
  const r = await fetch(api + "mark", { method: "POST", headers: { ...auth, "Content-Type": "application/json" },
                                        body: JSON.stringify({ id: im.id, status }) });
  if (!r.ok) { say(`mark failed: ${r.status} ${await r.text()}`); return; }
  const res = await r.json();
  im.mark = res.mark;
  Object.assign(state.meta, { accepted: res.accepted, rejected: res.rejected });
  say("");
  if (status && state.pos < state.shown.length - 1) state.pos += 1;
  show();
}

function move(step) {
  const n = state.pos + step;
  if (n >= 0 && n < state.shown.length) { state.pos = n; show(); }
}

function refilter() {
  const cur = state.shown[state.pos];
  state.shown = order();
  state.pos = Math.max(0, cur ? state.shown.indexOf(cur) : 0);  // keep the image shown when it still is
  show();
}

document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "SELECT" || e.ctrlKey || e.metaKey || e.altKey) return;
  const act = { ArrowRight: () => move(1), j: () => move(1), ArrowLeft: () => move(-1), k: () => move(-1),
                a: () => mark("accepted"), r: () => mark("rejected"), u: () => mark(null) }[e.key];
  if (act) { e.preventDefault(); act(); }
});

async function start() {
  try {
    state.meta = await get("meta");
    const sel = $("class-filter");
    state.meta.classes.slice(1).forEach((name, k) => {
      const o = document.createElement("option");
      o.value = String(k);
      o.textContent = name;
      sel.appendChild(o);
    });
    state.images = (await get("images")).images;
    for (const id of ["sort", "class-filter", "mark-filter"]) $(id).onchange = () => { refilter(); $(id).blur(); };
    $("accept").onclick = () => mark("accepted");
    $("reject").onclick = () => mark("rejected");
    $("clear").onclick = () => mark(null);
    state.shown = order();
    await show();
    document.body.dataset.ready = "1";
  } catch (e) { say(String(e.message)); }
}

start();
