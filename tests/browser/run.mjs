// Browser tests of roomd: headless Debian chromium driven by playwright-core (no browser
// download). Run by `cargo test` (tests/it/browser.rs) with ROOMD_BIN set to the built
// binary; also runnable alone: `ROOMD_BIN=target/debug/roomd node tests/browser/run.mjs`.
//
// The script starts and restarts the server itself (127.0.0.1, a free port kept across
// the kill -9 restart, a temporary data dir), runs each test with a deadline, writes
// screenshots of the demo and the dashboard at 375 and 1440 px into
// $ROOMD_SCREENSHOTS (default target/browser-screenshots; also the board in conflict,
// the page while reconnecting, and the token forms) with a report.txt, and exits
// non-zero if any test failed.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const BIN = process.env.ROOMD_BIN;
const CHROMIUM = process.env.ROOMD_CHROMIUM || "/usr/bin/chromium";
const SHOTS = resolve(process.env.ROOMD_SCREENSHOTS || "target/browser-screenshots");
const ONLY = process.env.ROOMD_BROWSER_ONLY; // run one test by name (debugging)
const TEST_DEADLINE_MS = 60_000;
const WAIT_MS = 15_000; // generous per-condition deadline on a loaded 2-core machine

if (!BIN || !existsSync(BIN)) {
  console.error(`ROOMD_BIN must name the built roomd binary (got ${BIN})`);
  process.exit(2);
}
if (!existsSync(CHROMIUM)) {
  console.error(`no chromium at ${CHROMIUM}: apt-get install -y chromium (or set ROOMD_CHROMIUM)`);
  process.exit(2);
}
mkdirSync(SHOTS, { recursive: true });
const report = [];
function log(line) {
  console.log(line);
  report.push(line);
}

// ------------------------------------------------------------------ the server

class Server {
  constructor(extraArgs = []) {
    this.extraArgs = extraArgs;
    this.dataDir = mkdtempSync(join(tmpdir(), "roomd-browser-"));
    this.port = 0;
    this.child = null;
    this.stderr = [];
  }

  get base() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    const args = ["--bind", `127.0.0.1:${this.port}`, "--data-dir", this.dataDir, ...this.extraArgs];
    const child = spawn(BIN, args, { stdio: ["ignore", "pipe", "pipe"] });
    this.child = child;
    child.stderr.on("data", (d) => {
      this.stderr.push(String(d));
      if (this.stderr.length > 200) this.stderr.shift();
    });
    const lines = createInterface({ input: child.stdout });
    const line = await withDeadline(new Promise((ok, fail) => {
      lines.once("line", ok);
      child.once("exit", (code) => fail(new Error(`roomd exited (${code}) before listening: ${this.stderr.join("")}`)));
    }), 20_000, "roomd to print its listening line");
    const addr = line.replace("roomd listening on ", "").trim();
    this.port = Number(addr.split(":").pop());
  }

  kill9() {
    const child = this.child;
    this.child = null;
    return new Promise((ok) => {
      child.once("exit", ok);
      child.kill("SIGKILL");
    });
  }

  async stop() {
    if (!this.child) return;
    const child = this.child;
    this.child = null;
    await new Promise((ok) => {
      child.once("exit", ok);
      child.kill("SIGTERM");
      setTimeout(() => child.kill("SIGKILL"), 5000);
    });
    rmSync(this.dataDir, { recursive: true, force: true });
  }

  async json(path, init) {
    const res = await fetch(this.base + path, init);
    return { status: res.status, body: await res.json().catch(() => null) };
  }
}

// ------------------------------------------------------------------ helpers

function withDeadline(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, fail) => {
      timer = setTimeout(() => fail(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    }),
  ]);
}

function assert(cond, message) {
  if (!cond) throw new Error(`assertion failed: ${message}`);
}

function eq(actual, expected, message) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Error(`${message}: expected ${e}, got ${a}`);
}

/** A page whose console errors and uncaught exceptions are collected. */
async function openPage(browser, url, viewport = { width: 1280, height: 900 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.errors = [];
  page.allowNetworkErrors = false;
  page.on("console", (msg) => {
    if (msg.type() !== "error") return;
    const text = msg.text();
    // While a test has the server down, the browser itself logs failed connections.
    if (page.allowNetworkErrors && /WebSocket|ERR_CONNECTION_REFUSED|Failed to load resource|net::/.test(text)) return;
    // A page that tests nacks over HTTP expects the browser to log their statuses.
    if (page.allowHttpStatus && new RegExp(`status of ${page.allowHttpStatus}`).test(text)) return;
    page.errors.push(`console: ${text}`);
  });
  page.on("pageerror", (err) => page.errors.push(`pageerror: ${err.message}`));
  await page.goto(url);
  return page;
}

function noErrors(page, what) {
  eq(page.errors, [], `console errors on ${what}`);
}

async function waitOpen(page) {
  await page.waitForSelector('#conn[data-state="open"]', { timeout: WAIT_MS });
}

async function waitText(page, selector, pattern) {
  await page.waitForFunction(
    ([sel, source]) => {
      const node = document.querySelector(sel);
      return node && new RegExp(source).test(node.textContent);
    },
    [selector, pattern.source],
    { timeout: WAIT_MS },
  );
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** An HS256 JWT for `claims`, signed with `secret`. */
function jwt(secret, claims) {
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

// ------------------------------------------------------------------ tests

const tests = [];
function test(name, body) {
  tests.push({ name, body });
}

test("client_js_ops_nacks_presence_signals_bytes_resume_and_sse", async ({ browser, server }) => {
  const page = await openPage(browser, `${server.base}/healthz`);
  page.allowHttpStatus = 409; // the SSE client's HTTP op nacked `conflict`
  const out = await page.evaluate(async () => {
    const { connect, RoomdError } = await import("/client.js");
    const until = async (cond, what) => {
      const end = Date.now() + 10_000;
      while (!cond()) {
        if (Date.now() > end) throw new Error(`timed out: ${what}`);
        await new Promise((r) => setTimeout(r, 10));
      }
    };
    const nextEvent = (target, type, pred = () => true) => new Promise((resolve) => {
      const on = (ev) => {
        if (pred(ev.detail)) {
          target.removeEventListener(type, on);
          resolve(ev.detail);
        }
      };
      target.addEventListener(type, on);
    });
    const out = {};
    const a = connect(location.origin, { user: "alice" });
    const b = connect(location.origin, { user: "bob" });
    await a.ready();
    await b.ready();
    const room = `state:cjs-${Math.random().toString(36).slice(2, 8)}`;
    out.created = await a.create(room, "state", { entries: { n: 0 } });
    const ra = a.subscribe(room);
    await ra.whenReady();
    // Ops and $b64 <-> Uint8Array, both ways.
    const bytes = new Uint8Array([0, 1, 2, 250, 255]);
    const seq = await a.op(room, { type: "set", key: "blob", value: bytes, if_ver: 0 });
    await until(() => ra.seq >= seq, "the diff of the set");
    const blob = ra.get("blob");
    out.blobIsBytes = blob instanceof Uint8Array && Array.from(blob).join() === "0,1,2,250,255";
    const http = await (await fetch(`/api/rooms/${room}`)).json();
    out.blobOnTheWire = http.entries.find((e) => e.k === "blob").v;
    // Nacks reject with the code.
    try {
      await a.op(room, { type: "set", key: "blob", value: 1, if_ver: 0 });
      out.conflict = "acked";
    } catch (e) {
      out.conflict = e.code;
      out.isRoomdError = e instanceof RoomdError;
    }
    try {
      await a.op(room, { type: "bogus" });
    } catch (e) {
      out.invalid = e.code;
    }
    // Presence and signals.
    const chat = room.replace("state:", "chat:");
    await a.create(chat, "chat", {});
    const ca = a.subscribe(chat, { presence: true });
    await ca.whenReady();
    const joined = nextEvent(ca, "presence", (d) => d.members.has("bob"));
    const cb = b.subscribe(chat, { presence: true });
    await cb.whenReady();
    await joined;
    out.members = [...ca.members.keys()].sort();
    const signal = nextEvent(ca, "signal");
    out.signalSent = b.signal(chat, { typing: true, raw: new Uint8Array([9, 8]) });
    const got = await signal;
    out.signal = { user: got.user, typing: got.data.typing, raw: Array.from(got.data.raw) };
    const left = nextEvent(ca, "presence", (d) => d.leave.includes("bob"));
    cb.unsubscribe();
    await left;
    out.membersAfterLeave = [...ca.members.keys()];
    // Resume after a dropped socket: b changes the room while a is away; an op made by
    // a while away is queued and sent once on reconnect.
    const resumed = nextEvent(ra, "change", (d) => d.source === "resumed");
    const states = [];
    a.addEventListener("state", (ev) => states.push(ev.detail.state));
    a.reconnect(1500);
    await b.op(room, { type: "incr", key: "n", by: 5 });
    const queued = a.op(room, { type: "incr", key: "n", by: 1 });
    out.pendingWhileAway = a.pendingOps;
    const r = await resumed;
    out.resumedKeys = r.changes.map((c) => c.key);
    const queuedSeq = await queued;
    await until(() => ra.seq >= queuedSeq, "the queued op's diff");
    out.nAfterResume = ra.get("n");
    out.states = [...states];
    // A gap (a diff that does not continue the mirror) makes the client resubscribe.
    ra.seq -= 1;
    const healed = nextEvent(ra, "change", (d) => d.source === "resumed");
    await b.op(room, { type: "incr", key: "n", by: 10 });
    const heal = await healed;
    out.gapHealedFrom = heal.from;
    await until(() => ra.get("n") === 16, "n after the gap");
    // The SSE transport: reads over /stream, ops over HTTP.
    const c = connect(location.origin, { user: "carol", transport: "sse" });
    await c.ready();
    const rc = c.subscribe(room);
    await rc.whenReady();
    out.sseTransport = c.transport;
    out.sseN = rc.get("n");
    out.sseBlob = Array.from(rc.get("blob"));
    const sseSeq = await c.op(room, { type: "incr", key: "n", by: 100 });
    await until(() => rc.seq >= sseSeq, "the SSE diff");
    out.sseNAfter = rc.get("n");
    await until(() => ra.get("n") === 116, "the WebSocket client sees the HTTP op");
    try {
      await c.op(room, { type: "set", key: "blob", value: 1, if_ver: 1 });
    } catch (e) {
      out.sseConflict = e.code;
    }
    // `auto`: a WebSocket that cannot connect (here: one that fails before opening, as
    // behind a proxy that blocks upgrades) falls back to SSE + HTTP.
    const RealWebSocket = window.WebSocket;
    window.WebSocket = class {
      constructor() {
        setTimeout(() => this.onclose?.({ code: 1006, reason: "blocked" }), 5);
      }
      close() {}
    };
    const d = connect(location.origin, { user: "dave", reconnect: { base: 10, cap: 20 } });
    await d.ready();
    window.WebSocket = RealWebSocket;
    out.autoTransport = d.transport;
    const rd = d.subscribe(room);
    await rd.whenReady();
    out.autoN = rd.get("n");
    out.autoOp = (await d.op(room, { type: "incr", key: "n", by: 0 })) > 0;
    d.close();
    const sc = c.subscribe(chat, { presence: true });
    await sc.whenReady();
    await until(() => sc.members.size > 0, "presence over SSE");
    out.sseMembers = [...sc.members.keys()];
    out.sseSignal = c.signal(chat, { x: 1 });
    a.close();
    b.close();
    c.close();
    return out;
  });
  eq(out.created, 1, "create resolves to seq 1");
  assert(out.blobIsBytes, "a $b64 value arrives as Uint8Array");
  eq(out.blobOnTheWire, { $b64: "AAEC+v8=" }, "Uint8Array goes out as $b64");
  eq(out.conflict, "conflict", "if_ver mismatch rejects with conflict");
  assert(out.isRoomdError, "rejections are RoomdError");
  eq(out.invalid, "invalid", "a bad op rejects with invalid");
  eq(out.members, ["alice", "bob"], "presence members");
  assert(out.signalSent, "signal sent");
  eq(out.signal, { user: "bob", typing: true, raw: [9, 8] }, "signal with bytes");
  eq(out.membersAfterLeave, ["alice"], "presence leave");
  eq(out.pendingWhileAway, 1, "an op made while away waits");
  assert(out.resumedKeys.includes("n"), `resumed carries the change made while away: ${out.resumedKeys}`);
  eq(out.nAfterResume, 6, "the queued op applied once after the resume");
  assert(out.states.includes("reconnecting") && out.states.at(-1) === "open", `states ${out.states}`);
  assert(out.gapHealedFrom > 0, "a gap is healed by a resume");
  eq(out.sseTransport, "sse", "transport");
  eq(out.sseN, 6 + 10, "SSE snapshot");
  eq(out.sseBlob, [0, 1, 2, 250, 255], "SSE bytes");
  eq(out.sseNAfter, 116, "an HTTP op shows on the SSE mirror");
  eq(out.sseConflict, "conflict", "HTTP nack code");
  eq(out.sseMembers, ["alice"], "SSE presence lists members, not the stream");
  eq(out.sseSignal, false, "SSE cannot signal");
  eq(out.autoTransport, "sse", "auto falls back to SSE when WebSocket cannot connect");
  eq(out.autoN, 116, "the fallback reads the room");
  assert(out.autoOp, "the fallback sends ops over HTTP");
  noErrors(page, "client.js test page");
  await page.context().close();
});

test("client_js_auto_keeps_retrying_websocket_while_the_server_is_down_and_an_sse_room_ends_on_delete", async ({ browser, server }) => {
  const page = await openPage(browser, `${server.base}/healthz`);
  page.allowNetworkErrors = true; // the refused connections to the closed port
  const out = await page.evaluate(async () => {
    const { connect } = await import("/client.js");
    const out = {};
    // Nothing listens on port 1: WebSocket and HTTP both fail, so `auto` must not
    // settle for SSE (it would never come back to WebSocket); it keeps retrying.
    const down = connect("http://127.0.0.1:1", { user: "zoe", reconnect: { base: 10, cap: 40 } });
    const states = [];
    down.addEventListener("state", (ev) => states.push(ev.detail.state));
    await new Promise((r) => setTimeout(r, 1500));
    out.downTransport = down.transport;
    out.downState = down.state;
    out.downAttempts = states.filter((s) => s === "reconnecting").length;
    down.close();
    // Over SSE, a deleted room's `event: error` ends its subscription with the code.
    const room = `state:gone-${Math.random().toString(36).slice(2, 8)}`;
    const c = connect(location.origin, { user: "carol", transport: "sse" });
    await c.create(room, "state", {});
    const r = c.subscribe(room);
    await r.whenReady();
    const ended = new Promise((resolve) => r.addEventListener("error", (ev) => resolve(ev.detail)));
    out.deleted = (await fetch(`/api/rooms/${room}`, { method: "DELETE" })).status;
    const detail = await ended;
    out.endedCode = detail.code;
    out.stillListed = c.rooms.has(room);
    out.stateAfter = c.state;
    c.close();
    return out;
  });
  eq(out.downTransport, "ws", "auto stays on WebSocket while the server is unreachable");
  eq(out.downState, "reconnecting", "and keeps reconnecting");
  assert(out.downAttempts >= 3, `several attempts in 1.5 s: ${out.downAttempts}`);
  assert(out.deleted >= 200 && out.deleted < 300, `DELETE answered ${out.deleted}`);
  eq(out.endedCode, "not_found", "the room's error event carries the code");
  eq(out.stillListed, false, "the ended room leaves client.rooms");
  eq(out.stateAfter, "open", "the client itself stays open");
  noErrors(page, "client.js auto/SSE page");
  await page.context().close();
});

/** Two users on the demo, in separate browser contexts. */
async function twoUsers(browser, server, space, viewport) {
  const a = await openPage(browser, `${server.base}/?space=${space}&user=alice`, viewport);
  const b = await openPage(browser, `${server.base}/?space=${space}&user=bob`, viewport);
  await waitOpen(a);
  await waitOpen(b);
  for (const p of [a, b]) {
    await p.waitForFunction(() => document.querySelectorAll("#options .option").length === 4, null, { timeout: WAIT_MS });
  }
  return [a, b];
}

test("demo_two_browsers_see_votes_chat_presence_typing_and_board_conflicts", async ({ browser, server }) => {
  const [a, b] = await twoUsers(browser, server, "duo", { width: 1440, height: 900 });
  // Votes move the other's bar chart.
  await a.click('#options .option:nth-child(2) button');
  await waitText(b, "#options .option:nth-child(2) .count", /^1 · 100%/);
  await b.click('#options .option:nth-child(3) button');
  await waitText(a, "#options .option:nth-child(3) .count", /^1 · 50%/);
  await waitText(a, "#total", /^2 votes/);
  // Presence, typing (signals) and chat.
  await waitText(a, "#members", /bob/);
  await waitText(b, "#members", /alice/);
  await b.type("#chat-input", "hello from bob");
  await waitText(a, "#typing", /bob is typing/);
  await b.press("#chat-input", "Enter");
  await waitText(a, "#messages", /hello from bob/);
  await a.fill("#chat-input", "hi bob, alice here");
  await a.press("#chat-input", "Enter");
  await waitText(b, "#messages", /hi bob, alice here/);
  // Concurrent edits of one note: the second save is a conflict, shown, not lost.
  await a.click('[data-note="0"] .edit');
  await b.click('[data-note="0"] .edit');
  await b.fill('[data-note="0"] .note-edit', "Ship the demo");
  await b.click('[data-note="0"] .save');
  await waitText(a, '[data-note="0"] .note-text', /Ship the demo/);
  await a.fill('[data-note="0"] .note-edit', "Write the docs");
  await a.click('[data-note="0"] .save');
  await a.waitForSelector('[data-note="0"].conflict', { timeout: WAIT_MS });
  await waitText(a, '[data-note="0"] .note-conflict', /bob saved this note first/);
  await a.locator("#board-card").screenshot({ path: join(SHOTS, "demo-conflict-1440.png") });
  await a.click('[data-note="0"] .overwrite');
  await waitText(b, '[data-note="0"] .note-text', /Write the docs/);
  // Alice's page clears the conflict when her overwrite is acked, which may reach her
  // after Bob's page saw the diff: wait for it (it fails if it never clears).
  await a
    .waitForSelector('[data-note="0"].conflict', { state: "detached", timeout: WAIT_MS })
    .catch(() => assert(false, "the conflict clears after overwrite"));
  await waitText(a, '[data-note="0"] .note-text', /Write the docs/);
  // A few more notes so the screenshots show a lived-in board.
  for (const [i, text] of [[1, "Try kill -9 and watch this page resume"], [2, "Votes cast while offline land once"]]) {
    await b.click(`[data-note="${i}"] .edit`);
    await b.fill(`[data-note="${i}"] .note-edit`, text);
    await b.click(`[data-note="${i}"] .save`);
    await waitText(a, `[data-note="${i}"] .note-text`, new RegExp(text.slice(0, 10)));
  }
  await a.fill("#chat-input", "the board shows conflicts instead of losing edits");
  await a.press("#chat-input", "Enter");
  await waitText(b, "#messages", /instead of losing/);
  await b.type("#chat-input", "nice");
  await waitText(a, "#typing", /bob is typing/);
  await a.screenshot({ path: join(SHOTS, "demo-1440.png"), fullPage: true });
  await a.setViewportSize({ width: 375, height: 812 });
  await sleep(300);
  await a.screenshot({ path: join(SHOTS, "demo-375.png"), fullPage: true });
  const overflow = await a.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert(overflow <= 0, `the page scrolls sideways at 375 px by ${overflow} px`);
  noErrors(a, "demo (alice)");
  noErrors(b, "demo (bob)");
  await a.context().close();
  await b.context().close();
});

test("demo_new_poll_is_created_and_followed_by_every_open_page", async ({ browser, server }) => {
  const [a, b] = await twoUsers(browser, server, "fresh", { width: 1280, height: 900 });
  await a.click("#new-poll-toggle");
  await a.fill("#new-question", "Where do we meet?");
  await a.fill("#new-options", "Berlin, Lisbon, Oslo");
  await a.click('#new-poll button[type="submit"]');
  for (const p of [a, b]) {
    await waitText(p, "#question", /^Where do we meet\?$/);
    await p.waitForFunction(() => document.querySelectorAll("#options .option").length === 3, null, { timeout: WAIT_MS });
  }
  assert(await a.$eval("#new-poll", (f) => f.hidden), "the form closes after creating");
  await b.click("#options .option:nth-child(2) button");
  await waitText(a, "#options .option:nth-child(2) .count", /^1 · 100%/);
  const pollId = await a.evaluate(() => window.demo.poll.id);
  assert(/^poll:fresh-/.test(pollId), `a new room: ${pollId}`);
  // A page opened afterwards follows the board's pointer to the new poll too.
  const c = await openPage(browser, `${server.base}/?space=fresh&user=carol`);
  await waitText(c, "#question", /^Where do we meet\?$/);
  await waitText(c, "#options .option:nth-child(2) .count", /^1 · 100%/);
  // A poll with one option is refused on the page, before the server.
  await a.click("#new-poll-toggle");
  await a.fill("#new-question", "Only one?");
  await a.fill("#new-options", "yes");
  await a.click('#new-poll button[type="submit"]');
  await waitText(a, "#poll-note", /at least two options/);
  for (const p of [a, b, c]) noErrors(p, "demo new poll");
  for (const p of [a, b, c]) await p.context().close();
});

test("demo_vote_latency_browser_to_browser", async ({ browser, server }) => {
  const [a, b] = await twoUsers(browser, server, "latency", { width: 1280, height: 900 });
  await b.evaluate(() => {
    window.__seen = [];
    window.demo.poll.addEventListener("change", (ev) => {
      const t = performance.timeOrigin + performance.now();
      for (const c of ev.detail.changes) if (c.key.startsWith("count/") && c.value === 1) window.__seen.push({ t, key: c.key });
    });
  });
  const latencies = [];
  for (let i = 0; i < 100; i++) {
    const option = i % 2;
    const t0 = await a.evaluate((opt) => {
      const t = performance.timeOrigin + performance.now();
      document.querySelectorAll("#options .option button")[opt].click();
      return t;
    }, option);
    await b.waitForFunction((n) => window.__seen.length >= n, i + 1, { timeout: WAIT_MS, polling: 1 });
    const seen = await b.evaluate((n) => window.__seen[n], i);
    eq(seen.key, `count/${option}`, `vote ${i} lands on its option`);
    latencies.push(seen.t - t0);
  }
  latencies.sort((x, y) => x - y);
  const median = (latencies[49] + latencies[50]) / 2;
  log(`vote latency browser to browser over 100 votes: median ${median.toFixed(1)} ms, p90 ${latencies[89].toFixed(1)} ms, max ${latencies[99].toFixed(1)} ms`);
  noErrors(a, "latency (alice)");
  noErrors(b, "latency (bob)");
  await a.context().close();
  await b.context().close();
});

for (const transport of ["ws", "sse"]) {
  const space = `crash-${transport}`;
  test(`demo_over_${transport}_survives_kill_9_and_a_vote_cast_while_down_lands_once`, async ({ browser, server }) => {
    const a = await openPage(browser, `${server.base}/?space=${space}&user=alice&transport=${transport}`);
    await waitOpen(a);
    await a.waitForFunction(() => document.querySelectorAll("#options .option").length === 4, null, { timeout: WAIT_MS });
    await a.evaluate(() => {
      window.__samePage = true;
    });
    await a.click("#options .option:nth-child(1) button");
    await waitText(a, "#options .option:nth-child(1) .count", /^1 ·/);
    await a.waitForFunction(() => window.demo.client.pendingOps === 0, null, { timeout: WAIT_MS });
    // A vote in flight when the server dies (it may or may not have committed), then one
    // cast while it is down.
    a.allowNetworkErrors = true;
    await a.click("#options .option:nth-child(2) button");
    await server.kill9();
    await a.waitForSelector('#conn[data-state="reconnecting"]', { timeout: WAIT_MS });
    await a.click("#options .option:nth-child(3) button");
    await waitText(a, "#poll-note", /waiting to be sent/);
    if (transport === "ws") await a.screenshot({ path: join(SHOTS, "demo-reconnecting-1280.png") });
    await sleep(500);
    await server.start(); // same data dir, same port
    await waitOpen(a);
    await waitText(a, "#options .option:nth-child(3) .count", /^1 ·/).catch(async (e) => {
      const seen = await a.evaluate(() => {
        const rooms = [...window.demo.client.rooms.values()].map((r) => ({ id: r.id, seq: r.seq, syncing: r._syncing, rs: r._source?.readyState, closed: r._closed }));
        return { state: window.demo.client.state, pending: window.demo.client.pendingOps, rooms };
      });
      const events = await server.json(`/api/rooms/poll:${space}/events`);
      throw new Error(`${e.message}; page ${JSON.stringify(seen)}; server ${JSON.stringify(events.body)}`);
    });
    await a.waitForFunction(() => window.demo.client.pendingOps === 0, null, { timeout: WAIT_MS });
    a.allowNetworkErrors = false;
    assert(await a.evaluate(() => window.__samePage === true), "the page was not reloaded");
    const state = await server.json(`/api/rooms/poll:${space}`);
    const get = (k) => state.body.entries.find((e) => e.k === k)?.v;
    eq([get("count/0"), get("count/1"), get("count/2"), get("total")], [0, 0, 1, 1], "one vote, on option 2");
    const events = await server.json(`/api/rooms/poll:${space}/events`);
    const votes = events.body.events.filter((e) => e.op.type === "vote" && e.user === "alice").map((e) => e.op.option);
    eq(votes.filter((o) => o === 2).length, 1, `the vote cast while down is logged once (votes: ${votes})`);
    assert(votes.filter((o) => o === 1).length <= 1, `the in-flight vote applied at most once (votes: ${votes})`);
    eq(votes[0], 0, "the first vote");
    noErrors(a, `demo over ${transport} across kill -9`);
    eq(await a.evaluate(() => window.demo.client.transport), transport, "the transport asked for");
    await a.context().close();
  });
}

test("dashboard_shows_figures_that_change_under_load", async ({ browser, server }) => {
  const dash = await openPage(browser, `${server.base}/dashboard`, { width: 1440, height: 900 });
  await dash.waitForFunction(() => window.dashboard.refreshes >= 2, null, { timeout: WAIT_MS });
  const before = await dash.evaluate(() => window.dashboard.figures);
  // Load: one page subscribes to a room while another writes to it for a few seconds.
  const loader = await openPage(browser, `${server.base}/healthz`);
  const load = loader.evaluate(async () => {
    const { connect } = await import("/client.js");
    const writer = connect(location.origin, { user: "loader" });
    const readers = [0, 1, 2].map((i) => connect(location.origin, { user: `reader${i}` }));
    await writer.create("state:load", "state", {}).catch(() => {});
    for (const r of readers) await r.subscribe("state:load").whenReady();
    const end = Date.now() + 4000;
    let n = 0;
    // 20 ops every 150 ms: about 130 ops/s, under the server's 200/s per connection.
    while (Date.now() < end) {
      const batch = [];
      for (let i = 0; i < 20; i++) batch.push(writer.op("state:load", { type: "incr", key: `k${n++ % 10}` }));
      await Promise.all([...batch, new Promise((r) => setTimeout(r, 150))]);
    }
    window.__load = { writer, readers };
    return n;
  });
  load.catch(() => {}); // awaited below; a failure must not become an unhandled rejection
  await dash.waitForFunction(
    () => window.dashboard.figures.opsPerSec > 10 && window.dashboard.figures.deliveriesPerSec > 10
      && window.dashboard.rooms.some((r) => r.room === "state:load" && r.subscribers === 3),
    null,
    { timeout: WAIT_MS },
  );
  const during = await dash.evaluate(() => window.dashboard.figures);
  await waitText(dash, "#f-ops", /[1-9]/);
  await waitText(dash, "#rooms", /state:load/);
  await dash.screenshot({ path: join(SHOTS, "dashboard-1440.png"), fullPage: true });
  await dash.setViewportSize({ width: 375, height: 812 });
  await sleep(1200);
  await dash.screenshot({ path: join(SHOTS, "dashboard-375.png"), fullPage: true });
  const ops = await load;
  assert(during.connections >= before.connections + 4, `connections rose: ${before.connections} -> ${during.connections}`);
  assert(during.commitP99 != null && during.commitP50 != null, "commit latency under load");
  assert(during.eventsPerCommit >= 1, `events per commit ${during.eventsPerCommit}`);
  log(`dashboard under load (${ops} ops): ${during.opsPerSec.toFixed(0)} ops/s, ${during.deliveriesPerSec.toFixed(0)} deliveries/s, commit p50 ${(during.commitP50 * 1000).toFixed(2)} ms, p99 ${(during.commitP99 * 1000).toFixed(2)} ms, ${during.eventsPerCommit.toFixed(1)} events/commit`);
  noErrors(dash, "dashboard");
  noErrors(loader, "load page");
  await loader.context().close();
  await dash.context().close();
});

test("with_auth_on_the_demo_and_dashboard_ask_for_a_token_or_take_one_from_the_fragment", async ({ browser }) => {
  const secret = "browser-test-secret";
  const secured = new Server(["--jwt-secret", secret]);
  try {
    await secured.start();
    const exp = Math.floor(Date.now() / 1000) + 3600;
    const admin = jwt(secret, { sub: "root", admin: true, exp });
    const plain = jwt(secret, { sub: "eve", exp, rooms: { read: ["*"] } });
    // No token: the demo shows the token form instead of failing silently.
    const asking = await openPage(browser, `${secured.base}/?space=auth`);
    asking.allowNetworkErrors = true; // the refused upgrade's 401 statuses
    await asking.waitForSelector("#token-panel:not([hidden])", { timeout: WAIT_MS });
    await waitText(asking, "#conn-text", /Token needed/);
    await asking.setViewportSize({ width: 375, height: 812 });
    await asking.screenshot({ path: join(SHOTS, "demo-token-375.png"), fullPage: true });
    // Pasting a token into the form connects.
    await asking.fill("#token-input", admin);
    await asking.click("#token-form button");
    await waitOpen(asking);
    await waitText(asking, "#me", /^root$/);
    await asking.context().close();
    // A token in the URL fragment is used directly.
    const fragment = await openPage(browser, `${secured.base}/?space=auth#token=${admin}`);
    await waitOpen(fragment);
    await fragment.waitForFunction(() => document.querySelectorAll("#options .option").length === 4, null, { timeout: WAIT_MS });
    noErrors(fragment, "demo with a token in the fragment");
    await fragment.context().close();
    // getToken refreshes a token 30 s before its exp, in place ({"t":"auth"}).
    const shortLived = jwt(secret, { sub: "root", admin: true, exp: Math.floor(Date.now() / 1000) + 32 });
    const refresher = await openPage(browser, `${secured.base}/healthz`);
    const refreshed = await refresher.evaluate(async ([token, fresh]) => {
      const { connect } = await import("/client.js");
      let asked = 0;
      const c = connect(location.origin, { token, getToken: () => { asked += 1; return fresh; } });
      await c.ready();
      const authed = await new Promise((resolve, reject) => {
        c.addEventListener("authed", (ev) => resolve(ev.detail));
        c.addEventListener("error", (ev) => reject(new Error(JSON.stringify(ev.detail))));
        setTimeout(() => reject(new Error("no authed within 10 s")), 10_000);
      });
      const state = c.state;
      c.close();
      return { asked, exp: authed.exp, state };
    }, [shortLived, admin]);
    eq(refreshed, { asked: 1, exp, state: "open" }, "token refresh through getToken");
    // A token valid for 60 days is not refreshed at once (setTimeout cannot wait that
    // long in one go), and a getToken that hands back a token expiring no later is asked
    // once, not in a loop.
    const longLived = jwt(secret, { sub: "root", admin: true, exp: Math.floor(Date.now() / 1000) + 60 * 86400 });
    const calm = await refresher.evaluate(async ([long, short]) => {
      const { connect } = await import("/client.js");
      let askedLong = 0;
      let askedSame = 0;
      const errors = [];
      const a = connect(location.origin, { token: long, getToken: () => { askedLong += 1; return long; } });
      const b = connect(location.origin, { token: short, getToken: () => { askedSame += 1; return short; } });
      b.addEventListener("error", (ev) => errors.push(ev.detail.code));
      await a.ready();
      await b.ready();
      await new Promise((r) => setTimeout(r, 1500));
      a.close();
      b.close();
      return { askedLong, askedSame, errors };
    }, [longLived, jwt(secret, { sub: "root", admin: true, exp: Math.floor(Date.now() / 1000) + 25 })]);
    eq(calm, { askedLong: 0, askedSame: 1, errors: ["unauthorized"] }, "no refresh loop");
    noErrors(refresher, "token refresh page");
    await refresher.context().close();
    // The dashboard takes an admin: a reader's token is refused, an admin's shows figures.
    const dash = await openPage(browser, `${secured.base}/dashboard#token=${plain}`);
    dash.allowHttpStatus = 403;
    await dash.waitForSelector("#token-panel:not([hidden])", { timeout: WAIT_MS });
    await dash.screenshot({ path: join(SHOTS, "dashboard-token-1280.png") });
    await dash.fill("#token-input", admin);
    await dash.click("#token-form button");
    await dash.waitForFunction(() => window.dashboard.refreshes >= 1 && window.dashboard.rooms.length >= 3, null, { timeout: WAIT_MS })
      .catch(async (e) => {
        const seen = await dash.evaluate(() => JSON.stringify({ d: window.dashboard, status: document.getElementById("conn-text").textContent, hash: location.hash.length }));
        throw new Error(`${e.message}; dashboard: ${seen}; errors: ${dash.errors}`);
      });
    await dash.context().close();
  } finally {
    await secured.stop();
  }
});

test("the_readme_client_example_runs_as_written_from_another_origin", async ({ browser }) => {
  // The page exactly as README.md prints it, but for the server's port (it says 8080),
  // served from a second origin that the server allows with --allowed-origins.
  const readme = readFileSync(new URL("../../README.md", import.meta.url), "utf8");
  const start = readme.indexOf("A complete page (save it as `poll.html`");
  assert(start >= 0, "README.md has the client.js example");
  const block = readme.slice(start).match(/```html\n([\s\S]*?)```/);
  assert(block, "the example is an html code block");
  const pages = createServer((req, res) => {
    // (The browser also asks this origin for /favicon.ico: nothing, without an error.)
    if (req.url !== "/poll.html") return res.writeHead(204).end();
    res.writeHead(200, { "content-type": "text/html; charset=utf-8" }).end(pages.html);
  });
  await new Promise((ok) => pages.listen(0, "127.0.0.1", ok));
  const origin = `http://127.0.0.1:${pages.address().port}`;
  const server = new Server(["--allowed-origins", origin]);
  try {
    await server.start();
    pages.html = block[1].replaceAll("http://127.0.0.1:8080", server.base);
    assert(pages.html !== block[1], "the example names http://127.0.0.1:8080");
    const page = await openPage(browser, `${origin}/poll.html`);
    const logged = [];
    page.on("console", (msg) => logged.push(msg.text()));
    await waitText(page, "#state", /^open$/);
    await waitText(page, "#question", /^Lunch\?$/);
    await waitText(page, "#options", /pizza: 0\s*sushi: 0/);
    await page.click("#options button:nth-child(2)");
    await waitText(page, "#options", /pizza: 0\s*sushi: 1/);
    const until = Date.now() + WAIT_MS;
    while (!logged.some((l) => /^vote durable at seq \d+$/.test(l)) && Date.now() < until) await sleep(20);
    assert(logged.some((l) => /^vote durable at seq \d+$/.test(l)), `the ack's seq is logged: ${logged}`);
    // A second page sees the vote live, and (being alice too) moves her vote.
    const other = await openPage(browser, `${origin}/poll.html`);
    await waitText(other, "#options", /pizza: 0\s*sushi: 1/);
    await other.click("#options button:nth-child(1)");
    await waitText(page, "#options", /pizza: 1\s*sushi: 0/);
    noErrors(page, "the README example");
    noErrors(other, "the README example (second page)");
    await page.context().close();
    await other.context().close();
  } finally {
    await server.stop();
    await new Promise((ok) => pages.close(ok));
  }
});

// ------------------------------------------------------------------ runner

const server = new Server();
let browser;
let failed = 0;
let ran = 0;
const started = Date.now();
try {
  await server.start();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  for (const t of tests) {
    if (ONLY && t.name !== ONLY) continue;
    ran += 1;
    const t0 = Date.now();
    try {
      if (!server.child) await server.start();
      await withDeadline(t.body({ browser, server }), TEST_DEADLINE_MS, t.name);
      log(`ok   ${t.name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
    } catch (err) {
      failed += 1;
      log(`FAIL ${t.name} (${((Date.now() - t0) / 1000).toFixed(1)} s): ${err.stack || err}`);
      log(`server stderr (tail):\n${server.stderr.slice(-20).join("")}`);
    }
  }
} catch (err) {
  failed += 1;
  log(`FAIL setup: ${err.stack || err}`);
} finally {
  if (browser) await browser.close().catch(() => {});
  await server.stop();
}
log(`${ran - failed} of ${ran} browser tests passed in ${((Date.now() - started) / 1000).toFixed(1)} s; screenshots in ${SHOTS}`);
writeFileSync(join(SHOTS, "report.txt"), report.join("\n") + "\n");
process.exit(failed ? 1 : 0);
