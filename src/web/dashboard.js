// roomd dashboard logic (served at /dashboard.js). Every second it reads:
// - GET /metrics (Prometheus text): connections, rooms loaded, and the counters whose
//   change per second gives ops/s (roomd_store_events_total), deliveries/s
//   (roomd_deliveries_total), events per commit, and the commit latency p50/p99
//   estimated from the roomd_store_commit_seconds histogram buckets of the last second
//   (linear interpolation inside a bucket, as Prometheus' histogram_quantile does);
// - GET /api/rooms (the Admin API; an admin token when auth is on): the room list
//   (cluster-wide in cluster mode, `partial` when a node did not answer).
// `window.dashboard` exposes the latest figures for the browser tests.

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 1000;
const HISTORY = 60;

function token() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const fromHash = hash.get("token");
  if (fromHash) sessionStorage.setItem("roomd-admin-token", fromHash);
  return fromHash || sessionStorage.getItem("roomd-admin-token");
}

function headers() {
  const t = token();
  return t ? { authorization: `Bearer ${t}` } : {};
}

/** Prometheus text -> {name -> value} for plain samples, and the commit buckets. */
function parseMetrics(text) {
  const values = {};
  const buckets = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const space = line.lastIndexOf(" ");
    const key = line.slice(0, space);
    const value = Number(line.slice(space + 1));
    const bucket = key.match(/^roomd_store_commit_seconds_bucket\{le="([^"]+)"\}$/);
    if (bucket) buckets.push([bucket[1] === "+Inf" ? Infinity : Number(bucket[1]), value]);
    else if (!key.includes("{")) values[key] = value;
  }
  buckets.sort((a, b) => a[0] - b[0]);
  return { values, buckets };
}

/** The q-quantile of the observations between two cumulative bucket lists. */
function quantile(q, now, before) {
  const deltas = now.map(([le, count], i) => [le, count - (before?.[i]?.[1] ?? 0)]);
  const total = deltas.length ? deltas[deltas.length - 1][1] : 0;
  if (total <= 0) return null;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const [le, count] of deltas) {
    if (count >= rank) {
      if (le === Infinity) return prevLe;
      const inBucket = count - prevCount;
      return prevLe + (le - prevLe) * (inBucket > 0 ? (rank - prevCount) / inBucket : 1);
    }
    prevLe = le;
    prevCount = count;
  }
  return prevLe;
}

const series = {};
function push(name, value) {
  const list = (series[name] ??= []);
  list.push(value ?? 0);
  if (list.length > HISTORY) list.shift();
  drawSpark($(`s-${name}`), list);
}

function drawSpark(canvas, list) {
  if (!canvas) return;
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (!w || !h) return;
  canvas.width = w * ratio;
  canvas.height = h * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  // Newest sample at the right edge, scaled to the window's max; the samples so far
  // span the whole width until there are HISTORY of them (one per refresh).
  const max = Math.max(...list, 1e-9);
  const shown = list.length > 1 ? list : [list[0], list[0]];
  const step = w / (shown.length - 1);
  const points = shown.map((v, i) => [i * step, h - 2 - (v / max) * (h - 4)]);
  ctx.beginPath();
  ctx.moveTo(0, h - 0.5);
  ctx.lineTo(w, h - 0.5);
  ctx.strokeStyle = "#e4e7ec";
  ctx.lineWidth = 1;
  ctx.stroke();
  ctx.beginPath();
  ctx.moveTo(0, h);
  for (const [x, y] of points) ctx.lineTo(x, y);
  ctx.lineTo(w, h);
  ctx.closePath();
  ctx.fillStyle = "rgba(99, 102, 241, 0.12)";
  ctx.fill();
  ctx.beginPath();
  points.forEach(([x, y], i) => (i === 0 ? ctx.moveTo(x, y) : ctx.lineTo(x, y)));
  ctx.strokeStyle = "#6366f1";
  ctx.lineWidth = 1.5;
  ctx.stroke();
}

function fmt(n, digits = 0) {
  if (n == null || !Number.isFinite(n)) return "–";
  return n.toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function ms(seconds) {
  if (seconds == null) return "–";
  const v = seconds * 1000;
  return `${fmt(v, v < 10 ? 2 : 1)}<span class="unit">ms</span>`;
}

let previous = null;
const state = { figures: {}, rooms: [], refreshes: 0 };
window.dashboard = state;

function setStatus(kind, text) {
  $("conn").className = `pill pill-${kind}`;
  $("conn-text").textContent = text;
}

async function refreshMetrics() {
  const res = await fetch("/metrics", { headers: headers(), cache: "no-store" });
  const { values, buckets } = parseMetrics(await res.text());
  const now = performance.now();
  const f = {
    connections: values.roomd_connections ?? 0,
    rooms: values.roomd_rooms_live ?? 0,
    healthy: values.roomd_store_healthy === 1,
    events: values.roomd_store_events_total ?? 0,
    deliveries: values.roomd_deliveries_total ?? 0,
    commits: values.roomd_store_commits_total ?? 0,
    batchCommits: values.roomd_store_batch_commits_total ?? 0,
  };
  if (previous) {
    const dt = (now - previous.at) / 1000;
    f.opsPerSec = Math.max(0, (f.events - previous.f.events) / dt);
    f.deliveriesPerSec = Math.max(0, (f.deliveries - previous.f.deliveries) / dt);
    f.commitsPerSec = Math.max(0, (f.commits - previous.f.commits) / dt);
    const commits = f.batchCommits - previous.f.batchCommits;
    f.eventsPerCommit = commits > 0 ? (f.events - previous.f.events) / commits : null;
    f.commitP50 = quantile(0.5, buckets, previous.buckets);
    f.commitP99 = quantile(0.99, buckets, previous.buckets);
  }
  previous = { at: now, f, buckets };
  state.figures = f;
  $("f-connections").textContent = fmt(f.connections);
  $("f-rooms").textContent = fmt(f.rooms);
  $("f-ops").textContent = fmt(f.opsPerSec);
  $("f-deliveries").textContent = fmt(f.deliveriesPerSec);
  $("f-p50").innerHTML = ms(f.commitP50);
  $("f-p99").innerHTML = ms(f.commitP99);
  $("f-batch").textContent = fmt(f.eventsPerCommit, 1);
  $("f-store").textContent = f.healthy ? "healthy" : "failed";
  $("f-store").style.color = f.healthy ? "#067647" : "#b42318";
  push("connections", f.connections);
  push("rooms", f.rooms);
  push("ops", f.opsPerSec);
  push("deliveries", f.deliveriesPerSec);
  push("p50", f.commitP50);
  push("p99", f.commitP99);
  push("batch", f.eventsPerCommit);
  $("f-commits").textContent = f.commitsPerSec == null ? "–" : `${fmt(f.commitsPerSec)} commits/s`;
}

async function refreshRooms() {
  const prefix = $("prefix").value.trim();
  const res = await fetch(`/api/rooms?limit=200&prefix=${encodeURIComponent(prefix)}`, { headers: headers(), cache: "no-store" });
  if (res.status === 401 || res.status === 403) {
    $("token-panel").hidden = false;
    $("dash").hidden = true;
    setStatus("closed", "Admin token needed");
    throw new Error("unauthorized");
  }
  const body = await res.json();
  state.rooms = body.rooms;
  const rows = body.rooms.map((r) => {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td class="room"></td><td><span class="kind kind-${r.kind}">${r.kind}</span></td>`
      + `<td class="num">${fmt(r.seq)}</td><td class="num">${fmt(r.subscribers)}</td><td class="col-epoch"><code>${r.epoch}</code></td>`;
    tr.querySelector(".room").textContent = r.room;
    // Cluster mode: each room carries the node that owns it.
    tr.querySelector(".room").title = r.node ? `${r.room} (owned by node ${r.node})` : r.room;
    return tr;
  });
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td colspan="5" class="meta">No rooms${prefix ? " with this prefix" : ""} yet.</td>`;
    rows.push(tr);
  }
  $("rooms").replaceChildren(...rows);
  $("rooms-count").textContent = `${body.rooms.length}${body.next ? "+" : ""}`;
  const more = body.next ? "Showing the first 200; filter by prefix to see others." : "";
  // Cluster mode: a node that did not answer leaves its rooms out; say so.
  const missing = body.partial ? (body.missing || []).map((m) => m.node).join(", ") : "";
  $("rooms-more").textContent = missing ? `Partial list: node ${missing} did not answer. ${more}` : more;
}

async function refresh() {
  try {
    await refreshRooms();
    await refreshMetrics();
    state.refreshes += 1;
    setStatus("open", `Updated ${new Date().toLocaleTimeString()}`);
    $("token-panel").hidden = true;
    $("dash").hidden = false;
  } catch (e) {
    if (e.message !== "unauthorized") setStatus("reconnecting", "Server unreachable, retrying…");
  }
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("roomd-admin-token", $("token-input").value.trim());
  // A token in the fragment would win over the one just pasted.
  window.history.replaceState(null, "", location.pathname + location.search);
  refresh();
});
$("prefix").addEventListener("input", () => refreshRooms().catch(() => {}));

refresh();
setInterval(refresh, REFRESH_MS);
