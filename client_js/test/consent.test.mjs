// Consent is enforced in the client: in opt-in mode (the default) nothing is sent for a purpose
// before it is granted.
import { test } from "node:test";
import assert from "node:assert/strict";
import { setup, MemoryStorage, response, FakeWebSocket, GW, makeClock, START } from "./helpers.mjs";

test("opt-in: before analytics is granted nothing is sent or stored; granting sends what was tracked", async () => {
  const { client, clock, calls, storage, sent } = setup();
  client.init({ gateway: GW });
  const id = client.track("view", { item: "a" });
  await clock.advance(60000);
  assert.deepEqual(calls, []); // not even POST /v1/token
  assert.equal(storage.getItem("tailor:q"), null);
  assert.equal(storage.getItem("tailor:id"), null);
  assert.deepEqual(client.consent.state(), {
    mode: "opt-in",
    choices: {},
    analytics: false,
    personalization: false,
    marketing: false,
  });

  client.consent.grant("analytics");
  await clock.advance(1000);
  // the gateway learns the choice before it sees any event (else it would not store them)
  assert.deepEqual(
    calls.map((c) => c.path),
    ["/v1/token", "/v1/consent", "/v1/events"]
  );
  assert.deepEqual(calls[1].body, { choices: { analytics: "granted" }, token: "tok-1" });
  assert.equal(sent()[0].body.token, "tok-1");
  assert.deepEqual(
    sent()[0].body.events.map((e) => [e.id, e.visitor]),
    [[id, "anon-1"]]
  );
});

test("granting personalization alone neither sends nor drops the events waiting for analytics", async () => {
  const { client, clock, sent } = setup();
  client.init({ gateway: GW, visitor: "v1" });
  client.track("view", { item: "a" });
  client.consent.grant("personalization");
  await clock.advance(5000);
  assert.equal(sent().length, 0);
  client.consent.grant("analytics");
  await clock.advance(1000);
  assert.equal(sent().length, 1);
});

test("denying analytics drops the unsent queue, stored and in memory, and later events", async () => {
  const { client, clock, storage, sent, gw } = setup();
  client.consent.grant("analytics");
  client.init({ gateway: GW, visitor: "v1" });
  gw.events = () => response(503);
  client.track("view", { item: "a" });
  client.track("view", { item: "b" });
  await clock.advance(1000);
  assert.equal(storage.json("tailor:q").length, 2);
  client.consent.deny("analytics");
  assert.deepEqual(storage.json("tailor:q"), []);
  assert.equal(client.track("view", { item: "c" }).length > 0, true);
  await clock.advance(120000);
  assert.equal(sent().length, 1); // the failed attempt before the refusal; no retry after it
  assert.deepEqual(storage.json("tailor:q"), []);
});

test("denying before init drops events tracked before init (e.g. queued by the stub)", async () => {
  const { client, clock, sent } = setup();
  client.track("view", { item: "a" });
  client.consent.deny("analytics");
  client.consent.grant("analytics");
  client.init({ gateway: GW, visitor: "v1" });
  await clock.advance(5000);
  assert.equal(sent().length, 0);
});

test("choices persist: a new page on the same storage remembers them", async () => {
  const storage = new MemoryStorage();
  const first = setup({ storage });
  first.client.consent.grant(["analytics", "marketing"]);
  first.client.consent.deny("personalization");
  const second = setup({ storage });
  second.client.init({ gateway: GW, visitor: "v1" });
  assert.deepEqual(second.client.consent.state(), {
    mode: "opt-in",
    choices: { analytics: "granted", marketing: "granted", personalization: "denied" },
    analytics: true,
    personalization: false,
    marketing: true,
  });
  second.client.track("view", { item: "a" });
  await second.clock.advance(1000);
  assert.equal(second.sent().length, 1);
});

test("grant() with no purpose grants all; unknown purposes are ignored and logged", () => {
  const { client, logs } = setup();
  client.consent.grant();
  client.consent.deny("telepathy");
  const s = client.consent.state();
  assert.equal(s.analytics && s.personalization && s.marketing, true);
  assert.deepEqual(Object.keys(s.choices).sort(), ["analytics", "marketing", "personalization"]);
  assert.ok(logs.some((l) => l.includes("telepathy")));
});

test("opt-out mode: everything is allowed until denied", async () => {
  const { client, clock, sent, calls } = setup();
  client.init({ gateway: GW, visitor: "v1", consent: { mode: "opt-out" } });
  assert.equal(client.consent.state().analytics, true);
  client.track("view", { item: "a" });
  await clock.advance(1000);
  assert.equal(sent().length, 1);
  client.consent.deny("analytics");
  client.track("view", { item: "b" });
  await clock.advance(60000);
  assert.equal(sent().length, 1);
  const r = await client.recommend({ n: 3 });
  assert.equal(r.items.length, 2);
  assert.equal(new URL(calls.at(-1).url).searchParams.get("visitor"), "v1"); // personalization still allowed
});

test("without personalization: no stream, recommendations without a visitor id (popular)", async () => {
  const got = [];
  const { client, clock, calls, gw } = setup();
  client.consent.grant("analytics");
  client.init({ gateway: GW, n: 4, onRecommendations: (r, cause) => got.push([r.request_id, cause]) });
  await clock.advance(0);
  assert.equal(FakeWebSocket.instances.length, 0);
  // the visitor's id and token serve only to record the analytics consent at the gateway
  assert.deepEqual(
    calls.map((c) => c.url),
    [`${GW}/v1/token`, `${GW}/v1/recommend?n=4`, `${GW}/v1/consent`]
  );
  assert.deepEqual(gw.recorded, [{ choices: { analytics: "granted" }, token: "tok-1" }]);
  assert.deepEqual(got, [["req-1", "fetch"]]);
  // explicit calls too, even once the visitor has an id (analytics made one for its events)
  client.track("view", { item: "a" });
  await clock.advance(1000);
  await client.recommend({ category: ["fashion", "beauty"], exclude: "i9" });
  assert.equal(calls.at(-1).url, `${GW}/v1/recommend?n=4&category=fashion%2Cbeauty&exclude=i9`);
});

test("granting personalization opens the stream; denying it closes the stream and fetches popular items", async () => {
  const got = [];
  const { client, clock, calls, gw } = setup();
  client.init({ gateway: GW, n: 4, onRecommendations: (r, cause) => got.push(cause) });
  await clock.advance(0);
  client.consent.grant("personalization");
  await clock.advance(0);
  assert.deepEqual(
    calls.map((c) => c.path),
    ["/v1/recommend", "/v1/token", "/v1/consent"]
  );
  const ws = FakeWebSocket.last();
  assert.equal(ws.url, "wss://gw.example/v1/stream?token=tok-1&n=4");
  ws.push({ type: "recommendations", cause: "connect", seq: 1, recommendations: { request_id: "p1", items: [] } });
  client.consent.deny("personalization");
  await clock.advance(0);
  assert.equal(ws.closedWith, 1000);
  assert.deepEqual(got, ["fetch", "connect", "fetch"]);
  assert.equal(calls.filter((c) => c.path == "/v1/recommend").at(-1).url, `${GW}/v1/recommend?n=4`);
  // the gateway hears of the refusal, for the visitor the token named; then (neither analytics
  // nor personalization) the stored anonymous id is forgotten
  assert.deepEqual(gw.recorded.at(-1), { choices: { personalization: "denied" }, token: "tok-1" });
  assert.equal(client.visitor(), null);
});

test("the gateway hears each choice once, and again after a week (it forgets idle visitors)", async () => {
  const storage = new MemoryStorage();
  const first = setup({ storage });
  first.client.consent.grant("analytics");
  first.client.init({ gateway: GW });
  await first.clock.advance(0);
  assert.equal(first.gw.recorded.length, 1);
  const again = setup({ storage }); // the next page, same choices: nothing to say
  again.client.init({ gateway: GW });
  await again.clock.advance(0);
  assert.equal(again.gw.recorded.length, 0);
  const later = setup({ storage, clock: makeClock(START + 8 * 864e5) });
  later.client.init({ gateway: GW });
  await later.clock.advance(0);
  assert.deepEqual(
    later.gw.recorded.map((b) => b.choices),
    [{ analytics: "granted" }]
  );
});

test("events the gateway did not store for want of consent go again after the choices, once", async () => {
  const { client, clock, sent, gw } = setup();
  client.consent.grant("analytics");
  client.init({ gateway: GW });
  let forgot = 2; // the gateway lost the visitor's consent, and (second time) it still refuses
  gw.events = (call) =>
    forgot-- > 0
      ? response(202, { accepted: 0, duplicates: 0, rejected: [], unconsented: call.body.events.length })
      : response(202, { accepted: call.body.events.length, duplicates: 0, rejected: [] });
  client.track("view", { item: "a" });
  await clock.advance(1000);
  assert.equal(gw.recorded.length, 2); // at init, then after the first `unconsented`
  assert.equal(sent().length, 2); // the batch again, after the choices; the second refusal is final
  assert.deepEqual(
    sent().map((c) => c.body.events[0].item),
    ["a", "a"]
  );
  client.track("view", { item: "b" });
  await clock.advance(1000);
  assert.equal(gw.recorded.length, 2); // once per page
  assert.equal(sent().at(-1).body.events[0].item, "b");
});

test("a 401 on events (an expired token) renews the token and sends the batch again", async () => {
  const { client, clock, sent, gw } = setup();
  client.consent.grant("analytics");
  client.init({ gateway: GW });
  let refuse = true;
  gw.events = (call) => {
    if (refuse) {
      refuse = false;
      return response(401, { error: { code: "expired-token" } });
    }
    return response(202, { accepted: call.body.events.length, duplicates: 0, rejected: [] });
  };
  client.track("view", { item: "a" });
  await clock.advance(1000);
  await clock.advance(1000);
  assert.deepEqual(
    sent().map((c) => c.body.token),
    ["tok-1", "tok-2"]
  );
  assert.equal(client.visitor().visitor, "anon-1"); // renewed for the same visitor
});
