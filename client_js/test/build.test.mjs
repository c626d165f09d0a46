// The committed bundles (gateway/static/client/, the Python package's data): what `npm run build` makes
// from src/ right now, within the size budget, and working: the classic script drains the stub and becomes window.Tailor.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";
import vm from "node:vm";
import { gzipSync } from "node:zlib";
import { build, OUTDIR, OUTPUTS } from "../build.mjs";
import { fakeWindow, runStub, GW } from "./helpers.mjs";

const DIST = pathToFileURL(OUTDIR + path.sep);
const BUDGET = 6 * 1024; // bytes, minified + gzipped
let fresh;
let tmp;

before(async () => {
  tmp = mkdtempSync(path.join(tmpdir(), "tailor-build-"));
  fresh = await build(tmp);
});
after(() => rmSync(tmp, { recursive: true, force: true }));

for (const [format, file] of Object.entries(OUTPUTS)) {
  test(`${file} is up to date (run npm run build)`, () => {
    const committed = readFileSync(new URL(file, DIST));
    assert.ok(committed.equals(readFileSync(fresh[format])), `${file} differs from a fresh build of src/`);
  });

  test(`${file} is within the ${BUDGET}-byte budget (minified + gzipped)`, (t) => {
    const code = readFileSync(fresh[format]);
    const gz = gzipSync(code, { level: 9 }).length;
    t.diagnostic(`${file}: ${code.length} bytes minified, ${gz} bytes gzipped`);
    assert.ok(gz <= BUDGET, `${file} is ${gz} bytes gzipped`);
  });
}

test("the classic build drains the stub and becomes window.Tailor", async () => {
  const win = fakeWindow();
  const stub = runStub(win);
  stub.consent.grant("analytics");
  stub.init({ gateway: GW, visitor: "v1" });
  stub.track("view", { item: "a" });
  vm.runInNewContext(readFileSync(fresh.iife, "utf8"), { window: win, URL });
  assert.notEqual(win.Tailor, stub);
  assert.equal(typeof win.Tailor.render, "function");
  await win.clock.advance(1000);
  assert.deepEqual(
    win.calls.map((c) => [c.url, c.body.events ? c.body.events.map((e) => e.item) : c.body.choices]),
    [
      [`${GW}/v1/consent`, { analytics: "granted" }],
      [`${GW}/v1/events`, ["a"]],
    ]
  );
});

test("the ES module build exports the client factory (and no instance outside a browser)", async () => {
  const mod = await import(new URL(OUTPUTS.esm, DIST));
  assert.equal(mod.default, undefined);
  for (const name of ["createClient", "install", "renderInto", "backoff", "VERSION"]) assert.ok(name in mod, name);
  const win = fakeWindow();
  const client = mod.install(win);
  assert.equal(win.Tailor, client);
});
