// The inline stub (src/stub.js, the snippet the README tells sites to paste) queues calls made
// before the script loads; install() replays them in order and takes the stub's place.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { install } from "../src/tailor.js";
import { fakeWindow, runStub, STUB, GW } from "./helpers.mjs";

test("the stub queues calls, with when it ran", () => {
  const win = fakeWindow();
  const stub = runStub(win);
  stub.init({ gateway: GW });
  stub.track("view", { item: "a" });
  stub.consent.grant("analytics");
  stub.consent.deny("marketing");
  assert.deepEqual(
    Array.from(stub.q, ([name, args]) => [name, args.length]),
    [
      ["init", 1],
      ["track", 2],
      ["consent.grant", 1],
      ["consent.deny", 1],
    ]
  );
  assert.equal(typeof stub.t, "number");
  // pasted twice: the same queue
  assert.equal(runStub(win), stub);
  assert.equal(stub.q.length, 4);
});

test("install replays the stub's queue in order, then is window.Tailor", async () => {
  const win = fakeWindow();
  const stub = runStub(win);
  let readyWith = null;
  stub.consent.grant("analytics");
  stub.init({ gateway: "/tailor/" }); // relative: resolved against the page
  const id = stub.track("view", { item: "a" }); // the stub returns nothing
  assert.equal(id, undefined);
  stub.track({ event: "add_to_cart", item: "a" });
  stub.ready((t) => (readyWith = t));
  const client = install(win);
  assert.equal(win.Tailor, client);
  assert.equal(readyWith, client);
  assert.equal(typeof client.recommend, "function");
  await win.clock.advance(1000);
  const events = win.calls.filter((c) => c.url.endsWith("/v1/events"));
  assert.equal(events.length, 1);
  assert.equal(events[0].url, "https://shop.example/tailor/v1/events");
  assert.deepEqual(
    events[0].body.events.map((e) => [e.event, e.visitor]),
    [
      ["view", "anon-w"],
      ["add_to_cart", "anon-w"],
    ]
  );
  assert.equal(install(win), client); // a second copy of the script changes nothing
});

test("a failing queued call is reported and does not stop the replay", async () => {
  const win = fakeWindow();
  const stub = runStub(win);
  stub.init({}); // no gateway: throws
  stub.consent.grant("analytics");
  stub.init({ gateway: GW, visitor: "v" });
  stub.track("view", { item: "a" });
  install(win);
  assert.ok(win.warnings.some((w) => w.includes("init") && w.includes("gateway")));
  await win.clock.advance(1000);
  assert.deepEqual(
    win.calls.map((c) => c.url),
    [`${GW}/v1/consent`, `${GW}/v1/events`]
  );
});

test("without a stub, install just becomes window.Tailor", () => {
  const win = fakeWindow();
  const client = install(win);
  assert.equal(win.Tailor, client);
  assert.deepEqual(client.consent.state().choices, {});
});

test("the README shows the stub exactly as tested", () => {
  const readme = readFileSync(new URL("../README.md", import.meta.url), "utf8");
  assert.ok(readme.includes(STUB), "README.md must contain src/stub.js verbatim");
});
