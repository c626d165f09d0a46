// Events: batching, persistence, retries, beacons. Analytics consent is granted here (consent.test.mjs
// covers what happens without it).
import { test } from "node:test";
import assert from "node:assert/strict";
import { backoff, retryAfterMs, createClient } from "../src/tailor.js";
import { setup, response, MemoryStorage, makeClock, GW, START } from "./helpers.mjs";

function started(options = {}, env = {}) {
  const t = setup(env);
  t.client.consent.grant("analytics");
  t.client.init({ gateway: GW, visitor: "v1", ...options });
  return t;
}

test("events wait for a short timer, then go in one batch with an id and a ms timestamp", async () => {
  const { client, clock, sent } = started();
  client.track({ event: "view", item: "i1" });
  client.track("click", { item: "i2" });
  await clock.advance(999);
  assert.equal(sent().length, 0);
  await clock.advance(1);
  assert.equal(sent().length, 1);
  const [call] = sent();
  assert.equal(call.url, `${GW}/v1/events`);
  assert.equal(call.init.method, "POST");
  assert.equal(call.init.headers["Content-Type"], "text/plain");
  assert.equal(call.init.headers["X-Tailor-Key"], undefined);
  const events = call.body.events;
  assert.deepEqual(
    events.map(({ id, ...rest }) => rest),
    [
      { event: "view", item: "i1", ts: START, visitor: "v1" },
      { event: "click", item: "i2", ts: START + 0, visitor: "v1" },
    ]
  );
  assert.ok(events[0].id && events[1].id && events[0].id !== events[1].id);
  assert.ok(events.every((e) => e.id.length <= 128));
});

test("a full batch goes at once, without waiting for the timer", async () => {
  const { client, clock, sent } = started({ batchSize: 3 });
  client.track("view", { item: "a" });
  client.track("view", { item: "b" });
  await clock.advance(0);
  assert.equal(sent().length, 0);
  client.track("view", { item: "c" });
  await clock.advance(0);
  assert.equal(sent().length, 1);
  assert.deepEqual(
    sent()[0].body.events.map((e) => e.item),
    ["a", "b", "c"]
  );
});

test("at most batchMax events per request; the rest follow", async () => {
  const { client, clock, sent } = started({ batchSize: 1000, batchMax: 2 });
  for (const item of ["a", "b", "c", "d", "e"]) client.track("view", { item });
  await clock.advance(1000);
  assert.deepEqual(
    sent().map((c) => c.body.events.map((e) => e.item).join("")),
    ["ab", "cd", "e"]
  );
});

test("acknowledged events leave storage; unacknowledged ones survive a reload and go with the same ids", async () => {
  const storage = new MemoryStorage();
  const first = started({}, { storage });
  first.gw.events = () => {
    throw new TypeError("Failed to fetch");
  };
  const ids = [first.client.track("view", { item: "a" }), first.client.track("add_to_cart", { item: "a" })];
  assert.deepEqual(
    storage.json("tailor:q").map((e) => e.id),
    ids
  );
  await first.clock.advance(1000); // fails: kept
  assert.equal(first.sent().length, 1);
  assert.equal(storage.json("tailor:q").length, 2);

  // The page reloads: a new client on the same storage.
  const second = setup({ storage });
  second.client.init({ gateway: GW, visitor: "v1" });
  await second.clock.advance(1000);
  assert.equal(second.sent().length, 1);
  assert.deepEqual(
    second.sent()[0].body.events.map((e) => e.id),
    ids
  );
  assert.deepEqual(storage.json("tailor:q"), []);
});

test("the stored queue is bounded: the oldest events go first", async () => {
  const { client, storage, logs } = started({ maxQueue: 3, batchSize: 100 });
  for (const item of ["a", "b", "c", "d", "e"]) client.track("view", { item });
  assert.deepEqual(
    storage.json("tailor:q").map((e) => e.item),
    ["c", "d", "e"]
  );
  assert.ok(logs.some((l) => l.includes("queue full")));
});

test("backoff is exponential, jittered between half and all of the step, and capped", () => {
  assert.equal(backoff(0, () => 0), 500);
  assert.equal(backoff(0, () => 1), 1000);
  assert.equal(backoff(3, () => 0.5), 6000);
  assert.equal(backoff(20, () => 1), 60000);
  assert.equal(backoff(20, () => 0), 30000);
  const seen = new Set([0.1, 0.4, 0.9].map((r) => backoff(2, () => r)));
  assert.equal(seen.size, 3);
  for (const d of seen) assert.ok(d >= 2000 && d <= 4000);
});

test("Retry-After is read as seconds or an HTTP date", () => {
  assert.equal(retryAfterMs("7", 0), 7000);
  assert.equal(retryAfterMs(null, 0), 0);
  assert.equal(retryAfterMs("soon", 0), 0);
  const now = Date.parse("2026-11-22T09:30:00Z");
  assert.equal(retryAfterMs("Sun, 22 Nov 2026 09:30:30 GMT", now), 30000);
  assert.equal(retryAfterMs("Sun, 22 Nov 2026 09:29:00 GMT", now), 0);
});

test("a 503 is retried after 750 ms, 1.5 s, 3 s (random 0.5), Retry-After when longer, with the same ids", async () => {
  const { client, clock, sent, gw, storage } = started();
  const at = [];
  gw.events = (call) => {
    at.push(clock.now() - START);
    if (at.length === 4) return response(503, { error: { code: "store-unavailable" } }, { "Retry-After": "7" });
    return at.length < 5 ? response(503) : response(202, { accepted: call.body.events.length });
  };
  const ids = [client.track("view", { item: "a" }), client.track("view", { item: "b" })];
  await clock.advance(60000);
  // 1000 (timer), +750, +1500, +3000, then Retry-After 7 s beats backoff(3) = 6000
  assert.deepEqual(at, [1000, 1750, 3250, 6250, 13250]);
  for (const call of sent()) assert.deepEqual(call.body.events.map((e) => e.id), ids);
  assert.deepEqual(storage.json("tailor:q"), []);
});

test("the jitter comes from random(): other draws, other retry times", async () => {
  const times = [];
  for (const r of [0, 1]) {
    const { client, clock, gw } = started({}, { random: () => r });
    const at = [];
    gw.events = () => (at.push(clock.now() - START), response(503));
    client.track("view", { item: "a" });
    await clock.advance(5000);
    times.push(at);
  }
  assert.deepEqual(times, [
    [1000, 1500, 2500, 4500],
    [1000, 2000, 4000],
  ]);
});

test("429, 408 and network errors are retried too", async () => {
  for (const failure of [() => response(429), () => response(408), () => Promise.reject(new TypeError("offline"))]) {
    const { client, clock, sent, gw, storage } = started();
    let n = 0;
    gw.events = () => (n++ === 0 ? failure() : response(202, { accepted: 1 }));
    client.track("view", { item: "a" });
    await clock.advance(1000 + 1000);
    assert.equal(sent().length, 2);
    assert.deepEqual(storage.json("tailor:q"), []);
  }
});

test("4xx is never retried: the batch is logged and dropped", async () => {
  for (const status of [400, 413, 415, 422]) {
    const { client, clock, sent, gw, storage, logs } = started();
    gw.events = () => response(status, { error: { code: "invalid-events" } });
    client.track("view", { item: "a" });
    await clock.advance(120000);
    assert.equal(sent().length, 1, `status ${status}`);
    assert.deepEqual(storage.json("tailor:q"), []);
    assert.ok(logs.some((l) => l.includes(String(status))));
  }
});

test("events the gateway rejects are dropped and logged; a ts in the future is sent again without ts", async () => {
  const { client, clock, sent, gw, storage, logs } = started();
  let n = 0;
  gw.events = (call) => {
    n++;
    if (n > 1) return response(202, { accepted: call.body.events.length });
    return response(202, {
      accepted: 1,
      duplicates: 0,
      rejected: [
        { index: 0, code: "unknown-event", message: "unknown event type", field: "event" },
        { index: 2, code: "ts-in-future", message: "`ts` is more than 5 minutes ahead", field: "ts" },
      ],
    });
  };
  client.track("wishlist", { item: "a" });
  client.track("view", { item: "b" });
  const late = client.track("view", { item: "c" });
  await clock.advance(1000);
  assert.ok(logs.some((l) => l.includes("unknown-event")));
  await clock.advance(1000);
  assert.equal(sent().length, 2);
  assert.deepEqual(sent()[1].body.events, [{ event: "view", item: "c", id: late, ts: null, visitor: "v1" }]);
  assert.deepEqual(storage.json("tailor:q"), []);
});

test("an anonymous visitor gets its id from POST /v1/token once, and keeps it", async () => {
  const storage = new MemoryStorage();
  const t = setup({ storage });
  t.client.consent.grant("analytics");
  t.client.init({ gateway: GW });
  t.client.track("view", { item: "a" });
  await t.clock.advance(1000);
  t.client.track("view", { item: "b" });
  await t.clock.advance(1000);
  assert.deepEqual(
    t.calls.map((c) => c.path),
    ["/v1/token", "/v1/consent", "/v1/events", "/v1/events"]
  );
  assert.deepEqual(
    t.sent().flatMap((c) => c.body.events.map((e) => e.visitor)),
    ["anon-1", "anon-1"]
  );
  assert.equal(t.client.visitor().visitor, "anon-1");
  const again = setup({ storage });
  again.client.init({ gateway: GW });
  assert.deepEqual(again.client.visitor(), { visitor: "anon-1" });
});

test("a signed-in user's events carry `user`", async () => {
  const { client, clock, sent } = started({ visitor: undefined, user: "u7" });
  client.track("purchase", { item: "a", value: 12.5 });
  await clock.advance(1000);
  assert.deepEqual(
    sent()[0].body.events.map(({ id, ts, ...e }) => e),
    [{ event: "purchase", item: "a", value: 12.5, user: "u7" }]
  );
});

test("pagehide hands waiting events to sendBeacon as text; they stay stored until acknowledged", async () => {
  const beacons = [];
  const sendBeacon = (url, body) => (beacons.push({ url, body }), true);
  const { client, fire, storage, clock, sent, env } = started({}, { sendBeacon, document: { visibilityState: "hidden" } });
  const a = client.track("view", { item: "a" });
  const b = client.track("click", { item: "b" });
  fire("visibilitychange");
  fire("pagehide"); // both fire on a navigation: one beacon
  assert.equal(beacons.length, 1);
  assert.equal(beacons[0].url, `${GW}/v1/events`);
  assert.equal(typeof beacons[0].body, "string");
  assert.deepEqual(
    JSON.parse(beacons[0].body).events.map((e) => [e.id, e.visitor]),
    [
      [a, "v1"],
      [b, "v1"],
    ]
  );
  assert.equal(storage.json("tailor:q").length, 2);
  // The page lives on (tab switched back): the next flush sends them again, the gateway counts them once.
  env.document.visibilityState = "visible";
  fire("visibilitychange");
  await clock.advance(1000);
  assert.equal(sent().length, 1);
  assert.deepEqual(storage.json("tailor:q"), []);
});

test("big queues are beaconed in chunks; a refused beacon falls back to fetch keepalive", async () => {
  const beacons = [];
  const sendBeacon = (url, body) => (beacons.push(body), beacons.length < 2);
  const { client, fire, sent, clock } = started({ batchSize: 1000, beaconChunk: 2 }, { sendBeacon });
  for (const item of ["a", "b", "c", "d", "e"]) client.track("view", { item });
  fire("pagehide");
  await clock.advance(0);
  assert.equal(beacons.length, 3); // ab (ok), cd (refused), e (refused)
  const fetched = sent().filter((c) => c.init.keepalive);
  assert.deepEqual(
    fetched.map((c) => c.body.events.map((e) => e.item).join("")),
    ["cd", "e"]
  );
});

test("with a key, events carry X-Tailor-Key and the unload flush uses fetch keepalive (beacons have no headers)", async () => {
  const beacons = [];
  const { client, fire, sent, clock } = started({ key: "pk_test" }, { sendBeacon: (u, b) => (beacons.push(b), true) });
  client.track("view", { item: "a" });
  fire("pagehide");
  await clock.advance(0);
  assert.equal(beacons.length, 0);
  assert.equal(sent().length, 1);
  assert.equal(sent()[0].init.keepalive, true);
  assert.equal(sent()[0].init.headers["X-Tailor-Key"], "pk_test");
});

test("works with storage that throws (private mode): memory only", async () => {
  const broken = {
    getItem() {
      throw new Error("SecurityError");
    },
    setItem() {
      throw new Error("QuotaExceededError");
    },
    removeItem() {},
  };
  const { client, clock, sent } = started({}, { storage: broken });
  client.track("view", { item: "a" });
  await clock.advance(1000);
  assert.equal(sent().length, 1); // the grant holds for this page
  assert.equal(client.consent.state().analytics, true);
});

test("createClient needs nothing global", () => {
  const clock = makeClock();
  const client = createClient({ now: clock.now, random: Math.random, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout });
  assert.throws(() => client.init({}), /gateway/);
  assert.equal(typeof client.track("view", { item: "a" }), "string");
});
