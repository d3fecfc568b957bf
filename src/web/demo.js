// roomd demo page logic (served at /demo.js): one client, three rooms.
//
// - `poll:<space>` (or the poll named by the board's `current-poll` key): a bar chart
//   that moves as votes arrive; a vote made while offline is queued by the client and
//   sent once on reconnect (the op id makes a re-send apply once).
// - `chat:<space>`: messages, members (presence) and a typing indicator (signals).
// - `state:<space>`: sticky notes edited with `if_ver`; a conflict is shown, not lost.
//
// `?space=NAME` picks the rooms (default `demo`), `?user=NAME` the user id when auth is
// off; with auth on, `#token=JWT` or the token form; `?transport=sse` reads over SSE and
// sends over HTTP (no typing indicator there: SSE cannot signal). `window.demo` exposes
// the client and rooms for the browser tests.

import { connect } from "/client.js";

const params = new URLSearchParams(location.search);
const space = (params.get("space") || "demo").replace(/[^A-Za-z0-9_.:-]/g, "").slice(0, 60) || "demo";
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ identity

const ADJECTIVES = ["swift", "calm", "brave", "lucky", "sunny", "quiet", "bold", "keen"];
const ANIMALS = ["otter", "falcon", "lynx", "panda", "heron", "fox", "koala", "orca"];
function pick(list) {
  return list[Math.floor(Math.random() * list.length)];
}
function demoUser() {
  const fromUrl = params.get("user");
  if (fromUrl) return fromUrl.slice(0, 64);
  let user = localStorage.getItem("roomd-demo-user");
  if (!user) {
    user = `${pick(ADJECTIVES)}-${pick(ANIMALS)}-${Math.floor(Math.random() * 90 + 10)}`;
    localStorage.setItem("roomd-demo-user", user);
  }
  return user;
}

function tokenFromFragment() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const token = hash.get("token");
  if (token) sessionStorage.setItem("roomd-token", token);
  return token || sessionStorage.getItem("roomd-token");
}

// ------------------------------------------------------------------ helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function timeOf(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function hueOf(text) {
  let h = 0;
  for (const c of text) h = (h * 31 + c.charCodeAt(0)) % 360;
  return h;
}

// ------------------------------------------------------------------ connection

let client;
let pollRoom = null;
let chatRoom = null;
let boardRoom = null;
const demo = { space, votes: 0, get client() { return client; } };
window.demo = demo;

// `?transport=sse` (or `ws`) forces one; default `auto`.
const transport = ["auto", "ws", "sse"].includes(params.get("transport")) ? params.get("transport") : "auto";

async function start(token) {
  const user = token ? undefined : demoUser();
  client = connect(location.origin, { ...(token ? { token } : { user }), transport });
  client.addEventListener("state", (ev) => showState(ev.detail));
  client.addEventListener("welcome", (ev) => {
    $("me").textContent = ev.detail.user;
  });
  $("me").textContent = user ?? "…";
  // The default rooms first: creating one that exists is answered `exists`, which is
  // fine. While the server is down these wait in the client and go out on connect.
  await Promise.all([
    ensure(`state:${space}`, "state", {}),
    ensure(`chat:${space}`, "chat", { history: 200 }),
    ensure(`poll:${space}`, "poll", {
      question: "What should we build with roomd?",
      options: ["Chat app", "Live poll", "Multiplayer game", "Collaborative doc"],
    }),
  ]);
  boardRoom = client.subscribe(`state:${space}`);
  chatRoom = client.subscribe(`chat:${space}`, { presence: true });
  demo.board = boardRoom;
  demo.chat = chatRoom;
  boardRoom.addEventListener("change", renderBoard);
  chatRoom.addEventListener("change", renderChat);
  chatRoom.addEventListener("presence", renderMembers);
  chatRoom.addEventListener("signal", onSignal);
  boardRoom.addEventListener("change", () => {
    const wanted = boardRoom.get("current-poll") || `poll:${space}`;
    if (!pollRoom || pollRoom.id !== wanted) switchPoll(wanted);
  });
}

function ensure(room, kind, init) {
  return client.create(room, kind, init).catch((e) => {
    if (e.code !== "exists") console.warn(`create ${room}: ${e.message}`);
  });
}

const STATE_TEXT = {
  connecting: "Connecting…",
  open: "Live",
  reconnecting: "Reconnecting…",
  closed: "Disconnected",
};
let countdown = null;

function showState(detail) {
  const pill = $("conn");
  pill.className = `pill pill-${detail.state}`;
  clearInterval(countdown);
  let text = STATE_TEXT[detail.state] ?? detail.state;
  if (detail.state === "open" && detail.transport === "sse") text = "Live (SSE)";
  if (detail.state === "reconnecting" && detail.delay != null) {
    const at = Date.now() + detail.delay;
    const tick = () => {
      const left = Math.max(0, (at - Date.now()) / 1000);
      $("conn-text").textContent = `Reconnecting in ${left.toFixed(1)} s (attempt ${detail.attempt})`;
    };
    tick();
    countdown = setInterval(tick, 100);
  } else {
    $("conn-text").textContent = text;
  }
  if (detail.state === "closed" && detail.code === 4401) {
    // Nothing to show without a token: the form alone, not an app stuck loading.
    $("token-panel").hidden = false;
    $("app").hidden = true;
    $("conn-text").textContent = "Token needed";
    $("me").textContent = "not signed in";
  }
  pill.dataset.state = detail.state;
  updatePending();
}

function updatePending() {
  const n = client ? client.pendingOps : 0;
  $("poll-note").textContent = n > 0 ? ` · ${n} change${n > 1 ? "s" : ""} waiting to be sent` : "";
}

// ------------------------------------------------------------------ poll

function switchPoll(roomId) {
  if (pollRoom) pollRoom.unsubscribe();
  pollRoom = client.subscribe(roomId);
  demo.poll = pollRoom;
  pollRoom.addEventListener("change", renderPoll);
  pollRoom.addEventListener("error", (ev) => {
    // A poll that is gone (deleted): fall back to this space's default poll.
    $("question").textContent = `Poll unavailable (${ev.detail.code})`;
    if (roomId !== `poll:${space}`) {
      pollRoom = null;
      switchPoll(`poll:${space}`);
    }
  });
  $("question").textContent = "Loading…";
  renderPoll();
}

function myVoteKey() {
  return `roomd-demo-vote:${pollRoom?.id}:${client.user}`;
}

function renderPoll() {
  if (!pollRoom || !pollRoom.ready) return;
  const options = pollRoom.get("options") || [];
  const total = pollRoom.get("total") || 0;
  const closed = !!pollRoom.get("closed");
  const mine = localStorage.getItem(myVoteKey());
  $("question").textContent = pollRoom.get("question") || "";
  const list = $("options");
  while (list.children.length > options.length) list.lastChild.remove();
  options.forEach((label, i) => {
    let item = list.children[i];
    if (!item) {
      item = el("li", { class: "option" },
        el("button", { type: "button", class: "vote", "data-option": String(i), onclick: () => vote(i) },
          el("span", { class: "label" }),
          el("span", { class: "count" })),
        el("div", { class: "bar" }, el("div", { class: "fill" })));
      list.append(item);
    }
    const count = pollRoom.get(`count/${i}`) || 0;
    const share = total ? Math.round((count / total) * 100) : 0;
    item.querySelector(".label").textContent = label;
    item.querySelector(".count").textContent = `${count} · ${share}%`;
    item.querySelector(".fill").style.width = `${share}%`;
    item.classList.toggle("mine", mine === String(i));
    item.querySelector("button").disabled = closed;
  });
  $("total").textContent = `${total} vote${total === 1 ? "" : "s"}${closed ? " · closed" : ""}`;
  updatePending();
}

async function vote(option) {
  const room = pollRoom;
  if (!room) return;
  localStorage.setItem(myVoteKey(), String(option));
  renderPoll();
  const sent = room.op({ type: "vote", option });
  updatePending();
  try {
    await sent;
    demo.votes += 1;
  } catch (e) {
    $("poll-note").textContent = ` · vote refused: ${e.code}`;
  }
  updatePending();
}
demo.vote = vote;

$("new-poll-toggle").addEventListener("click", () => {
  $("new-poll").hidden = !$("new-poll").hidden;
  if (!$("new-poll").hidden) $("new-question").focus();
});

$("new-poll").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const question = $("new-question").value.trim();
  const options = $("new-options").value.split(",").map((s) => s.trim()).filter(Boolean).slice(0, 32);
  if (options.length < 2) {
    $("poll-note").textContent = " · a poll needs at least two options";
    return;
  }
  const roomId = `poll:${space}-${Date.now().toString(36)}`;
  try {
    await client.create(roomId, "poll", { question, options });
    // Every open page follows the board's pointer to the current poll.
    await boardRoom.op({ type: "set", key: "current-poll", value: roomId });
    $("new-poll").hidden = true;
    $("new-poll").reset();
  } catch (e) {
    $("poll-note").textContent = ` · could not create the poll: ${e.code}`;
  }
});

// ------------------------------------------------------------------ chat

const typingUntil = new Map();
let lastTypingSignal = 0;

function onSignal(ev) {
  if (ev.detail.data && ev.detail.data.typing) {
    typingUntil.set(ev.detail.user, Date.now() + 3000);
    renderTyping();
  }
}

function setupChat() {
  setInterval(renderTyping, 500);
  $("chat-input").addEventListener("input", () => {
    if (chatRoom && Date.now() - lastTypingSignal > 1500) {
      lastTypingSignal = Date.now();
      chatRoom.signal({ typing: true });
    }
  });
  $("chat-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text || !chatRoom) return;
    $("chat-input").value = "";
    lastTypingSignal = 0;
    try {
      await chatRoom.op({ type: "post", text });
    } catch (e) {
      $("typing").textContent = `message refused: ${e.code}`;
    }
  });
}

function renderChat() {
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const messages = [...chatRoom.entries]
    .filter(([k]) => k.startsWith("msg/"))
    .map(([k, e]) => ({ seq: Number(k.slice(4)), ...e.value }))
    .sort((a, b) => a.seq - b.seq)
    .slice(-100);
  list.replaceChildren(...messages.map((m) => {
    const own = m.user === client.user;
    return el("li", { class: own ? "msg own" : "msg", "data-seq": String(m.seq) },
      el("span", { class: "who", style: `color: hsl(${hueOf(m.user)} 55% 40%)` }, m.user),
      el("span", { class: "text" }, m.text),
      el("time", {}, timeOf(m.ts)));
  }));
  if (messages.length === 0) list.append(el("li", { class: "empty" }, "No messages yet. Say hi!"));
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function renderMembers() {
  const users = [...chatRoom.members.keys()].sort();
  $("members").replaceChildren(...users.map((u) =>
    el("li", { class: u === client.user ? "member me" : "member", title: u, style: `--h: ${hueOf(u)}` },
      el("span", { class: "name" }, u))));
  renderTyping();
}

function renderTyping() {
  const now = Date.now();
  const who = [...typingUntil].filter(([u, t]) => t > now && u !== client.user && chatRoom.members.has(u)).map(([u]) => u);
  $("typing").textContent = who.length === 0 ? "\u00a0"
    : who.length === 1 ? `${who[0]} is typing…` : `${who.slice(0, -1).join(", ")} and ${who.at(-1)} are typing…`;
}

// ------------------------------------------------------------------ board

const NOTES = 6;
const editing = new Map(); // note index -> {ver, conflict}

function setupBoard() {
  const board = $("board");
  for (let i = 0; i < NOTES; i++) {
    board.append(el("article", { class: "note", "data-note": String(i), style: `--h: ${(i * 57 + 40) % 360}` },
      el("p", { class: "note-text" }),
      el("textarea", { class: "note-edit", rows: "3", maxlength: "280", "aria-label": `Note ${i + 1}` }),
      el("p", { class: "note-conflict" }),
      el("div", { class: "note-actions" },
        el("button", { type: "button", class: "ghost edit", onclick: () => beginEdit(i) }, "Edit"),
        el("button", { type: "button", class: "save", onclick: () => saveNote(i, false) }, "Save"),
        el("button", { type: "button", class: "ghost cancel", onclick: () => endEdit(i) }, "Cancel"),
        el("button", { type: "button", class: "danger overwrite", onclick: () => saveNote(i, true) }, "Overwrite"),
        el("span", { class: "note-meta" }))));
  }
  for (const node of board.querySelectorAll(".note-text")) node.textContent = "Loading…";
  for (const node of board.querySelectorAll(".note")) node.classList.add("blank");
}

function noteNode(i) {
  return $("board").querySelector(`[data-note="${i}"]`);
}

function renderBoard() {
  if (!boardRoom) return;
  for (let i = 0; i < NOTES; i++) {
    const node = noteNode(i);
    const entry = boardRoom.entries.get(`note/${i}`);
    const state = editing.get(i);
    node.classList.toggle("editing", !!state);
    node.classList.toggle("conflict", !!state?.conflict);
    node.querySelector(".note-text").textContent = entry ? entry.value.text : "Empty note: click Edit to write one.";
    node.classList.toggle("blank", !entry);
    node.querySelector(".note-meta").textContent = entry ? `${entry.value.by} · v${entry.ver}` : "";
  }
}

function beginEdit(i) {
  const entry = boardRoom.entries.get(`note/${i}`);
  editing.set(i, { ver: entry ? entry.ver : 0, conflict: false });
  const area = noteNode(i).querySelector(".note-edit");
  area.value = entry ? entry.value.text : "";
  renderBoard();
  area.focus();
}

function endEdit(i) {
  editing.delete(i);
  noteNode(i).querySelector(".note-conflict").textContent = "";
  renderBoard();
}

async function saveNote(i, overwrite) {
  const state = editing.get(i);
  if (!state) return;
  const text = noteNode(i).querySelector(".note-edit").value.trim().slice(0, 280);
  // Compare-and-set against the version the edit started from; "Overwrite" after a
  // conflict uses the version now shown, so it is a deliberate choice, never silent.
  const ifVer = overwrite ? boardRoom.ver(`note/${i}`) : state.ver;
  try {
    await boardRoom.op({ type: "set", key: `note/${i}`, value: { text, by: client.user }, if_ver: ifVer });
    endEdit(i);
  } catch (e) {
    if (e.code !== "conflict") {
      noteNode(i).querySelector(".note-conflict").textContent = `Not saved: ${e.code}`;
      return;
    }
    state.conflict = true;
    const now = boardRoom.entries.get(`note/${i}`);
    noteNode(i).querySelector(".note-conflict").textContent = now
      ? `Conflict: ${now.value.by} saved this note first (v${now.ver}): “${now.value.text}”. Your text is still here: overwrite theirs with it, or cancel to keep theirs.`
      : "Conflict: this note changed while you edited it.";
    renderBoard();
  }
}

// ------------------------------------------------------------------ token form and start

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const token = $("token-input").value.trim();
  sessionStorage.setItem("roomd-token", token);
  window.history.replaceState(null, "", location.pathname + location.search);
  $("token-panel").hidden = true;
  $("app").hidden = false;
  if (client) client.close();
  start(token);
});

setupBoard();
setupChat();
start(tokenFromFragment());
$("rooms-line").textContent = `rooms: poll:${space} · chat:${space} · state:${space}`;
