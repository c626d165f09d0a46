// Live recommendations over WS /v1/stream: reconnects with jittered backoff, token refresh on
// 4401, no retry on 4400, HTTP fallback while the socket is down.
import { test } from "node:test";
import assert from "node:assert/strict";
import { setup, response, FakeWebSocket, MemoryStorage, GW } from "./helpers.mjs";

const push = (ws, request_id, cause = "connect") =>
  ws.push({ type: "recommendations", cause, seq: 1, recommendations: { request_id, items: [] } });

function live(options = {}, env = {}) {
  const got = [];
  const t = setup(env);
  t.client.consent.grant();
  t.client.init({ gateway: GW, onRecommendations: (r, cause) => got.push(`${cause}:${r.request_id}`), ...options });
  return { ...t, got, sockets: FakeWebSocket.instances };
}

test("an anonymous visitor gets a token, opens the stream and receives pushes", async () => {
  const { clock, calls, got, sockets, client } = live({ n: 6, category: ["fashion", "beauty"] });
  await clock.advance(0);
  assert.deepEqual(
    calls.map((c) => c.path),
    ["/v1/token", "/v1/consent"]
  );
  assert.equal(sockets.length, 1);
  assert.equal(sockets[0].url, "wss://gw.example/v1/stream?token=tok-1&n=6&category=fashion%2Cbeauty");
  push(sockets[0], "a");
  sockets[0].push({ type: "ping", ts: 1 });
  push(sockets[0], "b", "events");
  assert.deepEqual(got, ["connect:a", "events:b"]);
  assert.deepEqual(client.visitor(), { visitor: "anon-1" });
});

test("http gateways get ws://, and a key goes as key= on the socket and X-Tailor-Key on requests", async () => {
  const { clock, sockets, calls } = live({ gateway: "http://localhost:8000/", key: "pk_1" });
  await clock.advance(0);
  assert.equal(sockets[0].url, "ws://localhost:8000/v1/stream?token=tok-1&key=pk_1");
  assert.equal(calls[0].init.headers["X-Tailor-Key"], "pk_1");
});

test("a dropped socket reconnects after jittered exponential delays, with one HTTP fallback per outage", async () => {
  const randoms = [];
  const { clock, sockets, got, calls } = live({}, { random: () => randoms.shift() ?? 0.5 });
  await clock.advance(0);
  push(sockets[0], "a");
  randoms.push(0.1, 0.9, 0.3);
  sockets[0].drop(1006);
  await clock.advance(0);
  assert.deepEqual(got, ["connect:a", "fetch:req-1"]); // the page is not left without a list
  assert.deepEqual(clock.pending().slice(-1), [550]); // backoff(0, 0.1) = 500 + 50
  await clock.advance(550);
  assert.equal(sockets.length, 2);
  sockets[1].drop(1013);
  await clock.advance(0);
  assert.equal(clock.pending().at(-1), 1900); // backoff(1, 0.9) = 1000 + 900
  await clock.advance(1900);
  assert.equal(sockets.length, 3);
  sockets[2].drop(1006);
  await clock.advance(0);
  assert.equal(clock.pending().at(-1), 2600); // backoff(2, 0.3) = 2000 + 600
  await clock.advance(2600);
  assert.equal(sockets.length, 4);
  assert.equal(calls.filter((c) => c.path === "/v1/recommend").length, 1); // one fallback for the outage
  assert.ok(sockets.every((s) => s.url.includes("token=tok-1"))); // same token each time
  // A delivery ends the outage: the attempts start again from the first delay.
  push(sockets[3], "b");
  sockets[3].drop(1006);
  await clock.advance(0);
  assert.equal(clock.pending().at(-1), 750);
  assert.equal(calls.filter((c) => c.path === "/v1/recommend").length, 2);
});

test("4401 (bad or expired token): the token is renewed for the same visitor and the stream reopens", async () => {
  const { clock, sockets, calls, storage } = live();
  await clock.advance(0);
  push(sockets[0], "a");
  sockets[0].drop(4401);
  await clock.advance(1000);
  const asked = calls.filter((c) => c.path === "/v1/token");
  assert.equal(asked.length, 2);
  assert.deepEqual(asked[1].body, { token: "tok-1" }); // a renewal, not a new visitor
  assert.equal(sockets.length, 2);
  assert.match(sockets[1].url, /token=tok-2/);
  assert.equal(storage.json("tailor:id").visitor, "anon-1");
});

test("a renewal the gateway refuses (401) falls back to a new anonymous visitor", async () => {
  const storage = new MemoryStorage();
  storage.setItem("tailor:id", JSON.stringify({ visitor: "anon-old", token: "tok-ancient", expires_at: 1 }));
  const { clock, sockets, calls, gw } = live({}, { storage });
  gw.refused.add("tok-ancient");
  await clock.advance(0);
  const asked = calls.filter((c) => c.path === "/v1/token");
  assert.deepEqual(
    asked.map((c) => c.body),
    [{ token: "tok-ancient" }, undefined]
  );
  assert.match(sockets[0].url, /token=tok-2/);
  assert.equal(storage.json("tailor:id").visitor, "anon-2");
});

test("a stored token that expired is replaced before connecting", async () => {
  const storage = new MemoryStorage();
  storage.setItem("tailor:id", JSON.stringify({ visitor: "anon-old", token: "tok-old", expires_at: 1 }));
  const { clock, sockets } = live({}, { storage });
  await clock.advance(0);
  assert.match(sockets[0].url, /token=tok-1/);
});

test("a stored token still valid is reused: no POST /v1/token", async () => {
  const storage = new MemoryStorage();
  const first = live({}, { storage });
  await first.clock.advance(0);
  const second = live({}, { storage });
  await second.clock.advance(0);
  assert.deepEqual(second.calls, []);
  assert.match(second.sockets[0].url, /token=tok-1/);
});

test("a signed-in user: the token given, then getToken() after a 4401; never POST /v1/token", async () => {
  let minted = 0;
  const getToken = async () => `user-tok-${++minted}`;
  const { clock, sockets, calls } = live({ user: "u7", token: "user-tok-0", getToken });
  await clock.advance(0);
  assert.match(sockets[0].url, /token=user-tok-0/);
  sockets[0].drop(4401);
  await clock.advance(1000);
  assert.match(sockets[1].url, /token=user-tok-1/);
  assert.equal(calls.filter((c) => c.path === "/v1/token").length, 0);
  const recommend = calls.filter((c) => c.path === "/v1/recommend");
  assert.equal(new URL(recommend[0].url).searchParams.get("user"), "u7");
});

test("a known visitor without a token (nor getToken) is served over HTTP only", async () => {
  const { clock, sockets, got, calls } = live({ visitor: "cookie-1" });
  await clock.advance(0);
  assert.equal(sockets.length, 0);
  assert.deepEqual(got, ["fetch:req-1"]);
  assert.equal(calls.find((c) => c.path == "/v1/recommend").url, `${GW}/v1/recommend?visitor=cookie-1`);
  // its consent is recorded by id (a gateway with API keys refuses that: such a site passes tokens)
  const everything = { analytics: "granted", personalization: "granted", marketing: "granted" };
  assert.deepEqual(calls.find((c) => c.path == "/v1/consent").body, { choices: everything, visitor: "cookie-1" });
});

test("4400 (a bad parameter) is not retried: HTTP fallback only", async () => {
  const { clock, sockets, got, logs } = live({ category: "nope" });
  await clock.advance(0);
  sockets[0].drop(4400);
  await clock.advance(120000);
  assert.equal(sockets.length, 1);
  assert.deepEqual(got, ["fetch:req-1"]);
  assert.ok(logs.some((l) => l.includes("HTTP only")));
});

test("a socket silent after opening is given up after connectMs; a quiet live one after staleMs", async () => {
  const { clock, sockets, got } = live({ connectMs: 3000, staleMs: 50000 });
  await clock.advance(2999);
  assert.equal(sockets[0].closedWith, null);
  await clock.advance(1);
  assert.equal(sockets[0].closedWith, 1005);
  assert.deepEqual(got, ["fetch:req-1"]);
  await clock.advance(750);
  assert.equal(sockets.length, 2);
  push(sockets[1], "a");
  await clock.advance(49999);
  assert.equal(sockets[1].closedWith, null);
  sockets[1].push({ type: "ping", ts: 2 }); // a ping keeps it alive
  await clock.advance(49999);
  assert.equal(sockets[1].closedWith, null);
  await clock.advance(1);
  assert.equal(sockets[1].closedWith, 1005);
  await clock.advance(750);
  assert.equal(sockets.length, 3);
  push(sockets[2], "b");
  // the close event the browser fires late for the abandoned socket changes nothing
  sockets[1].drop(1006);
  await clock.advance(10000);
  assert.equal(sockets.length, 3);
  assert.equal(sockets[2].closedWith, null);
  push(sockets[2], "c", "events");
  assert.deepEqual(got, ["fetch:req-1", "connect:a", "fetch:req-2", "connect:b", "events:c"]);
});

test("no WebSocket at all: recommendations over HTTP", async () => {
  const { clock, got, calls } = live({}, { WebSocket: undefined });
  await clock.advance(0);
  assert.deepEqual(got, ["fetch:req-1"]);
  assert.deepEqual(
    calls.map((c) => c.path),
    ["/v1/token", "/v1/consent", "/v1/recommend"]
  );
  const asked = new URL(calls[2].url).searchParams;
  assert.deepEqual([asked.get("visitor"), asked.get("token")], ["anon-1", "tok-1"]);
});

test("a slow HTTP fallback never overwrites a newer push", async () => {
  let release;
  const { clock, sockets, got, gw } = live();
  await clock.advance(0);
  gw.recommend = () => new Promise((resolve) => (release = () => resolve(response(200, { request_id: "late", items: [] }))));
  sockets[0].drop(1006);
  await clock.advance(750);
  push(sockets[1], "fresh");
  release();
  await clock.advance(0);
  assert.deepEqual(got, ["connect:fresh"]);
});

test("pagehide closes the socket (back/forward cache); pageshow reopens it", async () => {
  const { clock, sockets, fire } = live();
  await clock.advance(0);
  push(sockets[0], "a");
  fire("pagehide");
  assert.equal(sockets[0].closedWith, 1000);
  await clock.advance(120000);
  assert.equal(sockets.length, 1);
  fire("pageshow", { persisted: true });
  await clock.advance(0);
  assert.equal(sockets.length, 2);
});

test("recommend() failures reject with the status", async () => {
  const { client, gw } = live({ live: false, onRecommendations: undefined });
  gw.recommend = () => response(400, { error: { code: "unknown-category" } });
  await assert.rejects(client.recommend({ category: "x" }), (err) => err.status === 400);
});
