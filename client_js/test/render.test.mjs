// The render helper (attribution marks, clicks -> click events) and the anti-flicker class, on a
// tiny fake DOM (helpers.mjs).
import { test } from "node:test";
import assert from "node:assert/strict";
import { renderInto, query } from "../src/tailor.js";
import { setup, Document, ITEMS, GW, START, makeClock } from "./helpers.mjs";

const ANSWER = { request_id: "req-42", snapshot: "s1", items: ITEMS, fallback: null, profile: "live" };

function page() {
  const doc = new Document();
  const box = doc.body.appendChild(doc.createElement("div"));
  box.id = "recs";
  return { doc, box };
}

test("render fills the container and marks each item with its id and the request id", () => {
  const { doc, box } = page();
  box.appendChild(doc.createElement("p")).textContent = "old";
  assert.equal(renderInto(doc, "#recs", ANSWER), box);
  assert.equal(box.children.length, 2);
  assert.deepEqual(
    box.children.map((el) => [el.tagName, el.className, el.textContent, el.getAttribute("data-tailor-item"), el.getAttribute("data-tailor-request")]),
    [
      ["DIV", "tailor-item", "Red shoes", "i1", "req-42"],
      ["DIV", "tailor-item", "Blue <hat>", "i2", "req-42"], // text, never parsed as HTML
    ]
  );
  assert.equal(renderInto(doc, "#missing", ANSWER), null);
});

test("a template may return an element or the HTML of one", () => {
  const { doc, box } = page();
  renderInto(doc, box, ANSWER, (item, i) => {
    if (i === 0) {
      const li = doc.createElement("li");
      li.textContent = item.title;
      return li;
    }
    return ` <a href="/p/${item.id}"><span>${item.id}</span></a> `;
  });
  assert.deepEqual(
    box.children.map((el) => [el.tagName, el.getAttribute("href"), el.getAttribute("data-tailor-item")]),
    [
      ["LI", null, "i1"],
      ["A", "/p/i2", "i2"],
    ]
  );
});

test("a bare array of items renders with an empty request id", () => {
  const { doc, box } = page();
  renderInto(doc, box, ITEMS);
  assert.deepEqual(
    box.children.map((el) => el.getAttribute("data-tailor-request")),
    ["", ""]
  );
});

test("a click anywhere inside a rendered item is one click event attributed to the request", async () => {
  const { doc, box } = page();
  const { client, clock, sent } = setup({ document: doc });
  client.consent.grant("analytics");
  client.init({ gateway: GW, visitor: "v1" });
  client.render(box, ANSWER, (item) => `<a href="/p/${item.id}"><span>${item.title}</span></a>`);
  client.render(box, { ...ANSWER, request_id: "req-43" }, (item) => `<a href="/p/${item.id}"><span>${item.title}</span></a>`);
  box.children[1].children[0].dispatch("click"); // the <span> inside the second item
  box.dispatch("click"); // on the container itself: not an item
  await clock.advance(1000);
  assert.equal(sent().length, 1);
  assert.deepEqual(
    sent()[0].body.events.map(({ id, ...e }) => e),
    [{ event: "click", item: "i2", request_id: "req-43", ts: START, visitor: "v1" }]
  );
});

test("init({target}) renders every delivery into the target", async () => {
  const { doc, box } = page();
  const { client, clock } = setup({ document: doc });
  client.init({ gateway: GW, target: "#recs", template: (item) => `<li>${item.id}</li>` });
  await clock.advance(0);
  assert.deepEqual(
    box.children.map((el) => [el.tagName, el.getAttribute("data-tailor-request")]),
    [
      ["LI", "req-1"],
      ["LI", "req-1"],
    ]
  );
});

test("anti-flicker: <html> gets the hiding class and its CSS until the first recommendations", async () => {
  const { doc } = page();
  const html = doc.documentElement;
  const { client, clock, gw } = setup({ document: doc });
  const slow = gw.recommend;
  let release;
  gw.recommend = () => new Promise((resolve) => (release = () => resolve(slow())));
  client.init({ gateway: GW, antiFlickerMs: 800, onRecommendations() {} });
  assert.equal(html.classList.contains("tailor-loading"), true);
  assert.equal(doc.getElementById("tailor-hide").textContent, ".tailor-loading [data-tailor-slot]{visibility:hidden}");
  await clock.advance(300);
  assert.equal(html.classList.contains("tailor-loading"), true);
  release();
  await clock.advance(0);
  assert.equal(html.classList.contains("tailor-loading"), false);
});

test("anti-flicker is bounded: revealed after antiFlickerMs without an answer", async () => {
  const { doc } = page();
  const html = doc.documentElement;
  const { client, clock, gw } = setup({ document: doc });
  gw.recommend = () => new Promise(() => {});
  client.init({ gateway: GW, antiFlickerMs: 800, onRecommendations() {} });
  await clock.advance(799);
  assert.equal(html.classList.contains("tailor-loading"), true);
  await clock.advance(1);
  assert.equal(html.classList.contains("tailor-loading"), false);
});

test("anti-flicker counts from when the stub ran, and is off by default", async () => {
  const clock = makeClock();
  const late = setup({ document: new Document(), clock, start: START - 900 });
  late.gw.recommend = () => new Promise(() => {});
  late.client.init({ gateway: GW, antiFlickerMs: 800, onRecommendations() {} });
  assert.equal(late.env.document.documentElement.classList.contains("tailor-loading"), false);

  const some = setup({ document: new Document(), clock, start: START - 500 });
  some.gw.recommend = () => new Promise(() => {});
  some.client.init({ gateway: GW, antiFlickerMs: 800, onRecommendations() {} });
  const html = some.env.document.documentElement;
  assert.equal(html.classList.contains("tailor-loading"), true);
  await clock.advance(300);
  assert.equal(html.classList.contains("tailor-loading"), false);

  const off = setup({ document: new Document() });
  off.client.init({ gateway: GW, onRecommendations() {} });
  assert.equal(off.env.document.documentElement.classList.contains("tailor-loading"), false);
  assert.equal(off.env.document.getElementById("tailor-hide"), null);
});

test("query strings skip empty values and join lists with commas", () => {
  assert.equal(query({ n: 3, category: ["a", "b/c"], exclude: [], visitor: undefined, user: null, x: "" }), "n=3&category=a%2Cb%2Fc");
});
