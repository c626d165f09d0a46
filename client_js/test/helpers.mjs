// Fakes for the client's environment: a clock with timers, fetch, storage, WebSocket, a tiny DOM.
// No network, no browser.
import { readFileSync } from "node:fs";
import vm from "node:vm";
import { createClient } from "../src/tailor.js";

export const START = 1_763_800_000_000; // ms

/** Let pending promise chains run (fetch -> json -> storage...). */
export async function settle() {
  for (let i = 0; i < 20; i++) await new Promise((resolve) => setImmediate(resolve));
}

export function makeClock(start = START) {
  let now = start;
  let next = 0;
  const timers = new Map();
  const clock = {
    now: () => now,
    setTimeout(fn, ms = 0) {
      timers.set(++next, { at: now + Math.max(0, ms), fn });
      return next;
    },
    clearTimeout(id) {
      timers.delete(id);
    },
    /** Run every timer due within `ms`, in time order, letting promises settle between them. */
    async advance(ms) {
      const end = now + ms;
      for (;;) {
        await settle();
        let due = null;
        for (const [id, t] of timers) if (t.at <= end && (!due || t.at < due[1].at)) due = [id, t];
        if (!due) break;
        timers.delete(due[0]);
        now = due[1].at;
        due[1].fn();
      }
      now = end;
      await settle();
    },
    /** Delays (ms from now) of the timers waiting. */
    pending: () => [...timers.values()].map((t) => t.at - now).sort((a, b) => a - b),
  };
  return clock;
}

export class MemoryStorage {
  constructor() {
    this.map = new Map();
  }
  getItem(key) {
    return this.map.has(key) ? this.map.get(key) : null;
  }
  setItem(key, value) {
    this.map.set(key, String(value));
  }
  removeItem(key) {
    this.map.delete(key);
  }
  json(key) {
    return JSON.parse(this.getItem(key));
  }
}

export function response(status, body = {}, headers = {}) {
  const lower = Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), String(v)]));
  return {
    status,
    ok: status >= 200 && status < 300,
    headers: { get: (name) => lower[name.toLowerCase()] ?? null },
    json: async () => body,
  };
}

export const ITEMS = [
  { id: "i1", title: "Red shoes", categories: ["fashion/shoes"], score: 0.9, reasons: ["popular"] },
  { id: "i2", title: "Blue <hat>", categories: ["fashion/hats"], score: 0.8, reasons: ["popular"] },
];

/** The gateway's usual answers; `events` may be replaced to script failures. */
export function gateway(clock) {
  let tokens = 0;
  let requests = 0;
  return {
    events: (call) => response(202, { accepted: call.body.events.length, duplicates: 0, rejected: [] }),
    // Like the gateway: a body {"token"} renews it for the same visitor, unless it is in `refused`
    // (401); no body makes a new anonymous visitor. Tokens are "tok-<n>".
    refused: new Set(),
    issued: new Map(), // token -> visitor
    token(call) {
      tokens++;
      const expires_at = Math.floor(clock.now() / 1000) + 3600;
      const old = call && call.body && call.body.token;
      if (old && this.refused.has(old)) return response(401, { error: { code: "expired-token" } });
      const visitor = old ? this.issued.get(old) || "anon-old" : `anon-${tokens}`;
      this.issued.set(`tok-${tokens}`, visitor);
      return response(200, { visitor, token: `tok-${tokens}`, expires_at });
    },
    recommend: () => response(200, { request_id: `req-${++requests}`, snapshot: "s1", items: ITEMS, fallback: null, profile: "none" }),
    // PUT /v1/consent: the choices as applied (`recorded` keeps every body, for the tests to read)
    recorded: [],
    consent(call) {
      this.recorded.push(call.body);
      const purposes = {};
      for (const [p, state] of Object.entries(call.body.choices)) purposes[p] = { allowed: state == "granted", state };
      return response(200, { visitor: "anon", mode: "opt-in", purposes });
    },
  };
}

export class FakeWebSocket {
  static instances = [];
  constructor(url) {
    this.url = url;
    this.closedWith = null;
    FakeWebSocket.instances.push(this);
  }
  close(code) {
    this.closedWith = code ?? 1005;
  }
  // the gateway's side
  push(message) {
    this.onmessage && this.onmessage({ data: JSON.stringify(message) });
  }
  drop(code) {
    this.onclose && this.onclose({ code });
  }
  static reset() {
    FakeWebSocket.instances = [];
  }
  static last() {
    return FakeWebSocket.instances.at(-1);
  }
}

/**
 * A client on fakes. Returns {client, env, clock, storage, calls, gw, logs, fire}; `calls` lists
 * fetches as {url, path, init, body (parsed JSON)}.
 */
export function setup({ storage = new MemoryStorage(), random = () => 0.5, clock = makeClock(), ...extra } = {}) {
  const calls = [];
  const logs = [];
  const listeners = {};
  const gw = gateway(clock);
  FakeWebSocket.reset();
  const env = {
    async fetch(url, init = {}) {
      const path = new URL(url).pathname;
      const call = { url, path, init, body: init.body ? JSON.parse(init.body) : undefined };
      calls.push(call);
      await null;
      const route = {
        "/v1/events": gw.events,
        "/v1/token": gw.token,
        "/v1/recommend": gw.recommend,
        "/v1/consent": gw.consent,
      }[path];
      return route.call(gw, call);
    },
    WebSocket: FakeWebSocket,
    storage,
    now: clock.now,
    random,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    on: (type, fn) => (listeners[type] ||= []).push(fn),
    log: (...args) => logs.push(args.map(String).join(" ")),
    ...extra,
  };
  const client = createClient(env);
  const fire = (type, event = {}) => (listeners[type] || []).forEach((fn) => fn(event));
  const sent = () => calls.filter((c) => c.path === "/v1/events");
  return { client, env, clock, storage, calls, gw, logs, fire, sent };
}

export const GW = "https://gw.example";

// -- a tiny DOM: enough for render(), clicks and the anti-flicker class --------------------------
export class Element {
  constructor(tag, doc) {
    this.tagName = tag.toUpperCase();
    this.ownerDocument = doc;
    this.attributes = {};
    this.children = [];
    this.parentNode = null;
    this.listeners = {};
    this.text = "";
    const classes = new Set();
    this.classList = {
      add: (c) => classes.add(c),
      remove: (c) => classes.delete(c),
      contains: (c) => classes.has(c),
    };
  }
  get className() {
    return this.attributes.class || "";
  }
  set className(value) {
    this.attributes.class = value;
  }
  get id() {
    return this.attributes.id || "";
  }
  set id(value) {
    this.attributes.id = value;
  }
  setAttribute(name, value) {
    this.attributes[name] = String(value);
  }
  getAttribute(name) {
    return name in this.attributes ? this.attributes[name] : null;
  }
  appendChild(child) {
    child.parentNode = this;
    this.children.push(child);
    return child;
  }
  get firstElementChild() {
    return this.children[0] || null;
  }
  get textContent() {
    return this.text + this.children.map((c) => c.textContent).join("");
  }
  set textContent(value) {
    this.children = [];
    this.text = String(value);
  }
  // Parses only `<tag attr="v" ...>text</tag>`, optionally one level nested: what the tests use.
  set innerHTML(html) {
    this.textContent = "";
    const m = /^<(\w+)([^>]*)>([\s\S]*)<\/\1>$/.exec(html);
    if (!m) return;
    const el = this.ownerDocument.createElement(m[1]);
    for (const [, k, v] of m[2].matchAll(/(\S+?)="([^"]*)"/g)) el.setAttribute(k, v);
    if (m[3].startsWith("<")) el.innerHTML = m[3];
    else el.text = m[3];
    this.appendChild(el);
  }
  addEventListener(type, fn) {
    (this.listeners[type] ||= []).push(fn);
  }
  /** A bubbling event from this element up. */
  dispatch(type) {
    const event = { type, target: this };
    for (let n = this; n; n = n.parentNode) (n.listeners[type] || []).forEach((fn) => fn(event));
  }
  find(predicate) {
    if (predicate(this)) return this;
    for (const c of this.children) {
      const hit = c.find(predicate);
      if (hit) return hit;
    }
    return null;
  }
}

export class Document {
  constructor() {
    this.documentElement = new Element("html", this);
    this.head = this.documentElement.appendChild(new Element("head", this));
    this.body = this.documentElement.appendChild(new Element("body", this));
    this.visibilityState = "visible";
  }
  createElement(tag) {
    return new Element(tag, this);
  }
  getElementById(id) {
    return this.documentElement.find((e) => e.id === id);
  }
  querySelector(selector) {
    if (!selector.startsWith("#")) throw new Error("fake querySelector takes #id only");
    return this.getElementById(selector.slice(1));
  }
}

// -- a window, for install() and the bundles ----------------------------------------------------
export const STUB = readFileSync(new URL("../src/stub.js", import.meta.url), "utf8").trim();

/** A window with fakes, and the requests it made. */
export function fakeWindow() {
  const clock = makeClock();
  const calls = [];
  const listeners = {};
  const warnings = [];
  const win = {
    clock,
    calls,
    warnings,
    listeners,
    localStorage: new MemoryStorage(),
    document: new Document(),
    location: { href: "https://shop.example/products/1" },
    navigator: {},
    console: { warn: (...a) => warnings.push(a.join(" ")), error: (...a) => warnings.push(a.join(" ")) },
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    addEventListener: (type, fn) => (listeners[type] ||= []).push(fn),
    async fetch(url, init = {}) {
      calls.push({ url, init, body: init.body && JSON.parse(init.body) });
      if (url.endsWith("/v1/token")) return response(200, { visitor: "anon-w", token: "tok-w", expires_at: 4e9 });
      if (url.includes("/v1/recommend")) return response(200, { request_id: "r", items: [] });
      if (url.endsWith("/v1/consent")) return response(200, { purposes: {} });
      return response(202, { accepted: init.body ? JSON.parse(init.body).events.length : 0 });
    },
  };
  return win;
}

/** Run the stub as the page's inline script would. */
export function runStub(win) {
  vm.runInNewContext(STUB, { window: win });
  return win.Tailor;
}

