// Tailor browser client: events (batched, persisted, retried), live recommendations over the
// gateway's WebSocket with an HTTP fallback, a render helper with click attribution, and consent
// (kept here, enforced here, and recorded at the gateway, which enforces it too). No dependencies. `createClient(env)` holds all the logic and takes every
// browser facility it uses from `env`, so tests run it in Node with fakes; `install(window)` wires
// the real globals, replays the calls the inline stub queued, and becomes `window.Tailor`.

import { backoff, query, renderInto, retryAfterMs } from "./helpers.js";

export { backoff, query, renderInto, retryAfterMs };
export const VERSION = "0.1.0";
export const PURPOSES = ["analytics", "personalization", "marketing"];
const QUEUE = "tailor:q"; // events not yet acknowledged by the gateway
const CONSENT = "tailor:consent"; // {purpose: "granted" | "denied"}
const IDENTITY = "tailor:id"; // {visitor, token, expires_at} from POST /v1/token
const SYNCED = "tailor:cs"; // {who, c, at}: the choices (JSON) the gateway confirmed for whom, when
const RESYNC_MS = 7 * 864e5; // choices are sent again after a week (the gateway forgets idle visitors)
const HIDING = "tailor-loading"; // class on <html> while anti-flicker hides [data-tailor-slot]
const HIDE_CSS = "." + HIDING + " [data-tailor-slot]{visibility:hidden}";
const DEFAULTS = {
  n: undefined, // the gateway's default (10)
  category: undefined,
  live: true, // use WS /v1/stream when personalization is allowed
  batchSize: 20, // flush as soon as this many events wait
  flushMs: 1000, // or this long after the first of them
  batchMax: 100, // events per request (the gateway takes up to 500 and 4 MB)
  maxQueue: 500, // stored events at most; the oldest go first
  beaconChunk: 50, // events per sendBeacon (browsers cap a beacon at 64 KB)
  connectMs: 5000, // a socket silent this long after opening is given up (HTTP fallback meanwhile)
  staleMs: 60000, // a socket silent this long is dead (the gateway pings every 15-20 s)
  antiFlickerMs: 0,
};

/**
 * The client. `env`: fetch, WebSocket, storage (localStorage-like), now, random, setTimeout,
 * clearTimeout, and optionally sendBeacon, document, on(type, listener) for window events,
 * base (the page URL, to resolve a relative gateway), start (when the stub ran), log.
 */
export function createClient(env) {
  const log = env.log || (() => {});
  const setT = env.setTimeout;
  const clearT = env.clearTimeout;
  const nowMs = env.now;
  let o = null; // options, once init ran
  let mem = []; // the queue when storage does not work
  let held = []; // events tracked before analytics consent was given (memory only)
  let busy = false;
  let flushTimer = 0;
  let retryTimer = 0;
  let tries = 0;
  let seq = 0;
  let beaconed = {}; // ids handed to sendBeacon while the page is hidden
  let tokenCall = null;
  let consentCall = null;
  let resent = false; // choices sent again after the gateway did not know them (once per page)
  // live recommendations
  let wanted = false; // somebody consumes recommendations (onRecommendations or target)
  let live = false; // the stream should be open
  let paused = false; // closed by pagehide; pageshow reopens
  let ws = null;
  let heard = false; // the current socket delivered something
  let wsTimer = 0;
  let watchdog = 0;
  let wsTries = 0;
  let seen = 0; // deliveries so far; a slow HTTP answer never overwrites a newer push
  let fellBack = false; // the HTTP fallback already ran during this outage
  let personal = null;
  let hideTimer = 0;

  // -- storage ---------------------------------------------------------------------------------
  const read = (key) => {
    try {
      return JSON.parse(env.storage.getItem(key));
    } catch (e) {
      return null;
    }
  };
  const write = (key, value) => {
    try {
      value == null ? env.storage.removeItem(key) : env.storage.setItem(key, JSON.stringify(value));
    } catch (e) {
      /* private mode, quota, no storage: memory only */
    }
  };
  // Read before every change, so tabs sharing the storage keep each other's events.
  const load = () => {
    const stored = read(QUEUE);
    return Array.isArray(stored) ? stored : mem;
  };
  const save = (events) => {
    const cap = o ? o.maxQueue : DEFAULTS.maxQueue;
    if (events.length > cap) log("queue full: dropping", events.length - cap, "oldest events");
    mem = events.slice(-cap);
    write(QUEUE, mem);
  };

  // -- consent ---------------------------------------------------------------------------------
  let chosen = {}; // the choices when storage does not work
  const choices = () => read(CONSENT) || Object.assign({}, chosen);
  const allowed = (purpose) => {
    const choice = choices()[purpose];
    return choice ? choice == "granted" : !!o && o.consent.mode == "opt-out";
  };
  const decide = (value) => (purposes) => {
    const all = choices();
    [].concat(purposes || PURPOSES).forEach((p) => {
      if (PURPOSES.indexOf(p) < 0) return log("unknown consent purpose", p);
      all[p] = value;
    });
    chosen = all;
    write(CONSENT, all);
    if (o) ensureConsent().catch(log); // before apply(), which may forget the identity it is for
    if (all.analytics == "denied") {
      held = []; // nothing unsent survives a refusal
      save([]);
      clearT(flushTimer);
      clearT(retryTimer);
      flushTimer = retryTimer = 0;
    }
    apply();
  };
  const consent = {
    grant: decide("granted"),
    deny: decide("denied"),
    state: () => {
      const s = { mode: o ? o.consent.mode : "opt-in", choices: choices() };
      PURPOSES.forEach((p) => (s[p] = allowed(p)));
      return s;
    },
  };

  // Start or stop what consent allows now.
  function apply() {
    if (!o) return;
    if (!allowed("analytics") && !allowed("personalization")) write(IDENTITY, null);
    if (allowed("analytics") && held.length) {
      const events = held;
      held = [];
      enqueue(events);
    } else if (allowed("analytics")) schedule();
    const p = allowed("personalization");
    if (p !== personal) {
      personal = p;
      if (wanted) startLive();
    }
  }

  // -- identity --------------------------------------------------------------------------------
  const stored = () => read(IDENTITY) || {};
  const who = () =>
    o.user ? { user: o.user } : o.visitor || stored().visitor ? { visitor: o.visitor || stored().visitor } : null;
  const headers = (type) => {
    const h = {};
    if (o.key) h["X-Tailor-Key"] = o.key;
    if (type) h["Content-Type"] = type;
    return h;
  };
  // POST /v1/token (one call at a time): the stored token renewed for the same visitor, or, with
  // none or when the gateway refuses it (401: forged, or expired too long ago), a new anonymous visitor.
  const postToken = (body) =>
    env.fetch(o.gateway + "/v1/token", { method: "POST", headers: headers(body && "application/json"), body });
  function newVisitor() {
    return (tokenCall =
      tokenCall ||
      (async () => {
        const old = stored().token || stored().renew;
        let r = old && (await postToken(JSON.stringify({ token: old })));
        if (!r || r.status == 401) r = await postToken();
        if (!r.ok) throw new Error("token " + r.status);
        const t = await r.json();
        write(IDENTITY, t);
        return t;
      })().finally(() => (tokenCall = null)));
  }
  const identity = async () => who() || { visitor: (await newVisitor()).visitor };
  // A stream token: given, from getToken(), or (anonymous visitors) a stored or new one; null if none.
  async function streamToken() {
    if (o.token) return o.token;
    if (o.getToken) return (o.token = await o.getToken()); // kept until the gateway refuses it
    if (o.user || o.visitor) return null;
    const s = stored();
    return s.token && s.expires_at * 1000 > nowMs() + 5000 ? s.token : (await newVisitor()).token;
  }
  // -- consent at the gateway -----------------------------------------------------------------
  // PUT /v1/consent with the visitor's token (or, for a site-given id without one, the id: an open
  // gateway only), once per change and again weekly. Events, recommendations and the stream wait
  // for it, so the gateway never sees a visitor's events before their consent.
  function needsSync() {
    const c = choices();
    if (!Object.keys(c).length) return false;
    const id = who();
    if (!id && o.consent.mode != "opt-out" && !PURPOSES.some((p) => c[p] == "granted")) return false; // nothing to tell
    const s = read(SYNCED);
    return !(s && id && s.who == (id.user || id.visitor) && s.c == JSON.stringify(c) && nowMs() - s.at < RESYNC_MS);
  }
  function ensureConsent() {
    if (!o || !needsSync()) return Promise.resolve();
    return (consentCall =
      consentCall ||
      (async () => {
        const c = choices();
        const had = who();
        const token = await streamToken(); // read (or made) before anything forgets the identity
        const id = had || who();
        const body = { choices: c };
        if (token) body.token = token;
        else if (id) body.visitor = id.user || id.visitor;
        const r = await env.fetch(o.gateway + "/v1/consent", {
          method: "PUT",
          headers: headers("application/json"),
          body: JSON.stringify(body),
        });
        if (r.status == 401 && token) forgetToken();
        if (!r.ok) throw new Error("consent " + r.status);
        write(SYNCED, { who: id ? id.user || id.visitor : null, c: JSON.stringify(c), at: nowMs() });
      })().finally(() => (consentCall = null)));
  }

  function forgetToken() {
    o.token = null;
    const s = stored();
    if (s.token) write(IDENTITY, { visitor: s.visitor, renew: s.token }); // kept only to ask for a renewal
  }

  // -- events ----------------------------------------------------------------------------------
  function track(type, fields) {
    const e = Object.assign({}, typeof type == "string" ? fields : type);
    if (typeof type == "string") e.event = type;
    if (!e.event) return log("track: an event needs a type", e);
    e.id = e.id || nowMs().toString(36) + "-" + Math.floor(env.random() * 2 ** 48).toString(36) + "-" + (seq++).toString(36);
    if (e.ts == null) e.ts = nowMs();
    if (o && !e.user && !e.visitor) Object.assign(e, who());
    if (o && allowed("analytics")) enqueue([e]);
    else if (choices().analytics != "denied") held = held.concat(e).slice(-DEFAULTS.maxQueue);
    return e.id;
  }

  function enqueue(events) {
    save(load().concat(events));
    schedule();
  }

  function schedule() {
    const waiting = load().length;
    if (!waiting || busy || retryTimer) return;
    if (waiting >= o.batchSize) flush();
    else if (!flushTimer) flushTimer = setT(flush, o.flushMs);
  }

  const fill = (e, id) => (e.user || e.visitor ? e : Object.assign({}, e, id));

  // Settle a batch from the gateway's answer: the delay before retrying it, or -1 when it is done.
  async function settle(batch, r) {
    const s = r.status;
    if (s >= 500 || s == 429 || s == 408) {
      return Math.max(backoff(tries++, env.random), retryAfterMs(r.headers && r.headers.get("retry-after"), nowMs()));
    }
    if (s == 401) {
      forgetToken(); // expired or from another secret: the next try renews it
      return backoff(tries++, env.random);
    }
    tries = 0;
    let again = {};
    if (s >= 300) log("events refused, dropped:", s);
    else {
      const body = await r.json().catch(() => ({}));
      if (body.unconsented && allowed("analytics") && !resent) {
        resent = true; // the gateway has forgotten the choices (idle too long): send them, then the batch
        write(SYNCED, null);
        return 0;
      }
      (body.rejected || []).forEach((x) => {
        const e = batch[x.index] || {};
        // A device clock more than 5 minutes fast: send again stamped with the gateway's time.
        if (x.code == "ts-in-future") again[e.id] = 1;
        else log("event rejected:", x.code, x.message, e);
      });
    }
    const done = {};
    batch.forEach((e) => (done[e.id] = !again[e.id]));
    save(load().flatMap((e) => (done[e.id] ? [] : again[e.id] ? [Object.assign({}, e, { ts: null })] : [e])));
    return -1;
  }

  /** Send what waits, a batch at a time; resolves when this round is over. */
  async function flush() {
    clearT(flushTimer);
    flushTimer = 0;
    if (!o || busy || retryTimer || !allowed("analytics")) return;
    const batch = load().slice(0, o.batchMax);
    if (!batch.length) return;
    busy = true;
    let delay;
    try {
      await ensureConsent();
      const id = batch.every((e) => e.user || e.visitor) ? null : await identity();
      const token = (await streamToken()) || undefined; // every event is this visitor's
      const r = await env.fetch(o.gateway + "/v1/events", {
        method: "POST",
        headers: headers("text/plain"), // a CORS-simple type: no preflight (unless a key is set)
        body: JSON.stringify({ events: batch.map((e) => fill(e, id)), token }),
      });
      delay = await settle(batch, r);
    } catch (err) {
      delay = backoff(tries++, env.random); // offline, DNS, CORS, no visitor id yet
    }
    busy = false;
    if (delay >= 0) {
      if (allowed("analytics")) retryTimer = setT(() => ((retryTimer = 0), flush()), delay);
    } else if (batch.length >= o.batchMax) flush(); // more were waiting already
    else schedule();
  }

  // The page is going away (or hidden, which on mobile may be the last chance): hand everything to
  // the browser. Events stay stored until a normal answer acknowledges them, so anything the
  // beacon did not deliver goes again later under the same id (the gateway counts it once).
  function beacon() {
    if (!o || !allowed("analytics")) return;
    const id = who();
    const token = o.token || stored().token || undefined;
    const url = o.gateway + "/v1/events";
    const events = load().filter((e) => !beaconed[e.id] && (id || e.user || e.visitor));
    for (let i = 0; i < events.length; i += o.beaconChunk) {
      const chunk = events.slice(i, i + o.beaconChunk);
      const body = JSON.stringify({ events: chunk.map((e) => fill(e, id)), token });
      // sendBeacon cannot set headers: with a key, a keepalive fetch carries it.
      if (o.key || !env.sendBeacon || !env.sendBeacon(url, body)) {
        try {
          env
            .fetch(url, { method: "POST", headers: headers("text/plain"), body, keepalive: true })
            .then((r) => settle(chunk, r))
            .catch(() => {});
        } catch (e) {
          /* unloading */
        }
      }
      chunk.forEach((e) => (beaconed[e.id] = 1));
    }
  }

  // -- recommendations -------------------------------------------------------------------------
  /** GET /v1/recommend: personal only when personalization is allowed (else popular items). */
  async function recommend(params) {
    if (!o) throw new Error("tailor: init first");
    const q = Object.assign({ n: o.n, category: o.category }, params);
    if (allowed("personalization")) {
      try {
        await ensureConsent();
        Object.assign(q, await identity());
        const token = await streamToken();
        if (token) q.token = token;
      } catch (e) {
        /* no visitor id: popular items */
      }
    }
    const r = await env.fetch(o.gateway + "/v1/recommend?" + query(q), { headers: headers() });
    if (!r.ok) throw Object.assign(new Error("tailor: recommend answered " + r.status), { status: r.status });
    return r.json();
  }

  function deliver(recs, cause) {
    seen++;
    reveal();
    if (o.target) render(o.target, recs, o.template);
    if (o.onRecommendations) o.onRecommendations(recs, cause);
  }

  function fallback() {
    fellBack = true;
    const before = seen;
    recommend().then(
      (recs) => seen == before && deliver(recs, "fetch"),
      (err) => (log(err), reveal())
    );
  }

  function stopLive() {
    live = false;
    clearT(wsTimer);
    clearT(watchdog);
    wsTimer = 0;
    const s = ws;
    ws = null;
    if (s) s.close(1000);
  }

  function startLive() {
    stopLive();
    fellBack = false;
    if (!o.live || !allowed("personalization") || !env.WebSocket) return fallback();
    live = true;
    connect();
  }

  async function connect() {
    wsTimer = 0;
    let token;
    try {
      await ensureConsent().catch(log); // the stream answers non-personal items until the gateway knows
      token = await streamToken();
    } catch (e) {
      if (!live) return;
      if (!fellBack) fallback();
      return retry();
    }
    if (!live || ws) return;
    if (!token) {
      live = false; // a known visitor without a token: HTTP only
      return fallback();
    }
    const url = o.gateway.replace(/^http/, "ws") + "/v1/stream?" + query({ token, n: o.n, category: o.category, key: o.key });
    const s = (ws = new env.WebSocket(url));
    heard = false;
    s.onmessage = (m) => {
      if (s != ws) return;
      let msg = {};
      try {
        msg = JSON.parse(m.data);
      } catch (e) {
        /* not ours */
      }
      heard = true;
      wsTries = 0;
      fellBack = false;
      alive(s);
      if (msg.type == "recommendations") deliver(msg.recommendations, msg.cause);
    };
    s.onclose = (c) => closed(s, c.code);
    alive(s);
  }

  // Closed by the gateway, the network, or the watchdog: reconnect unless told not to.
  function closed(s, code) {
    if (s != ws) return;
    ws = null;
    clearT(watchdog);
    if (!live) return;
    if (code == 4400) {
      log("stream refused a parameter; HTTP only");
      live = false;
      return fallback();
    }
    if (code == 4401) forgetToken(); // bad or expired: the next connect asks for a new one
    if (!fellBack) fallback();
    retry();
  }

  function retry() {
    if (live) wsTimer = setT(connect, backoff(wsTries++, env.random));
  }

  function alive(s) {
    clearT(watchdog);
    watchdog = setT(
      () => {
        try {
          s.close();
        } catch (e) {
          /* already closing */
        }
        closed(s, 1006);
      },
      heard ? o.staleMs : o.connectMs
    );
  }

  // -- anti-flicker ----------------------------------------------------------------------------
  function hide(ms) {
    const doc = env.document;
    const left = (env.start || nowMs()) + ms - nowMs();
    if (!doc || !ms || left <= 0) return reveal();
    if (!doc.getElementById("tailor-hide")) {
      const style = doc.createElement("style");
      style.id = "tailor-hide";
      style.textContent = HIDE_CSS;
      doc.head.appendChild(style);
    }
    doc.documentElement.classList.add(HIDING);
    hideTimer = setT(reveal, left);
  }

  function reveal() {
    clearT(hideTimer);
    if (env.document) env.document.documentElement.classList.remove(HIDING);
  }

  // -- page lifecycle ----------------------------------------------------------------------------
  function hidden() {
    beacon();
  }
  function shown() {
    beaconed = {};
    if (o) schedule();
  }
  if (env.on) {
    env.on("visibilitychange", () => (env.document.visibilityState == "hidden" ? hidden() : shown()));
    env.on("pagehide", () => {
      hidden();
      if (live) {
        paused = true; // an open socket keeps the page out of the back/forward cache
        stopLive();
      }
    });
    env.on("pageshow", () => {
      shown();
      if (paused && o) {
        paused = false;
        startLive();
      }
    });
  }

  // -- public API --------------------------------------------------------------------------------
  function init(options) {
    if (!options || !options.gateway) throw new Error("tailor: init needs {gateway}");
    if (o) stopLive();
    o = Object.assign({}, DEFAULTS, options);
    o.consent = Object.assign({ mode: "opt-in" }, options.consent);
    let g = String(o.gateway);
    if (env.base) g = new URL(g, env.base).href;
    o.gateway = g.replace(/\/+$/, "");
    held = held.map((e) => (e.user || e.visitor ? e : Object.assign(e, who())));
    wanted = !!(o.onRecommendations || o.target);
    personal = allowed("personalization");
    if (o.antiFlickerMs && wanted) hide(o.antiFlickerMs);
    ensureConsent().catch(log);
    apply();
    if (wanted) startLive();
    return client;
  }

  function render(container, recs, template) {
    return renderInto(env.document, container, recs, template, (item, request) =>
      track({ event: "click", item, request_id: request || undefined })
    );
  }

  const client = {
    v: VERSION,
    init,
    track,
    flush,
    recommend,
    render,
    consent,
    ready: (fn) => fn(client),
    visitor: () => (o && who()) || null,
  };
  return client;
}

/** Become `win.Tailor`, replaying what the inline stub queued before this script loaded. */
export function install(win) {
  const stub = win.Tailor;
  if (stub && stub.v) return stub; // loaded twice
  const nav = win.navigator || {};
  let storage;
  try {
    storage = win.localStorage;
  } catch (e) {
    /* blocked */
  }
  const client = createClient({
    fetch: win.fetch && win.fetch.bind(win),
    WebSocket: win.WebSocket,
    storage,
    now: () => Date.now(),
    random: Math.random,
    setTimeout: (f, ms) => win.setTimeout(f, ms),
    clearTimeout: (t) => win.clearTimeout(t),
    sendBeacon: nav.sendBeacon && nav.sendBeacon.bind(nav),
    document: win.document,
    on: (type, f) => win.addEventListener(type, f),
    base: win.location && win.location.href,
    start: stub && stub.t,
    log: (...a) => win.console && win.console.warn("tailor:", ...a),
  });
  win.Tailor = client;
  ((stub && stub.q) || []).forEach(([name, args]) => {
    try {
      const [a, b] = name.split(".");
      (b ? client[a][b] : client[a]).apply(null, args);
    } catch (err) {
      win.console && win.console.error("tailor:", name, err);
    }
  });
  return client;
}

export default typeof window == "object" ? install(window) : undefined;
