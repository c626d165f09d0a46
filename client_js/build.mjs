// Build the two minified bundles from src/tailor.js:
//   tailor.esm.min.js  an ES module (`import Tailor from ...`; also exports createClient, render helpers)
//   tailor.min.js      a classic script (an IIFE) that becomes window.Tailor and drains the stub's queue
// `node build.mjs [outdir]`, by default into ../gateway/static/client/: the files are the Python package's
// data, so an installed wheel serves them at /client/. Output is deterministic: test/build.test.mjs
// rebuilds into a temporary directory and fails if the committed files differ from what the source gives.
import { build as esbuild } from "esbuild";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
export const ENTRY = path.join(here, "src", "tailor.js");
export const OUTPUTS = { esm: "tailor.esm.min.js", iife: "tailor.min.js" };
// async/await, ** and Promise#finally, Array#flatMap: every browser since 2019-2020.
const TARGET = ["es2019"];

export const OUTDIR = path.join(here, "..", "gateway", "static", "client");

export async function build(outdir = OUTDIR) {
  const { version } = JSON.parse(readFileSync(path.join(here, "package.json"), "utf8"));
  for (const [format, file] of Object.entries(OUTPUTS)) {
    await esbuild({
      entryPoints: [ENTRY],
      outfile: path.join(outdir, file),
      bundle: true,
      format,
      minify: true,
      target: TARGET,
      platform: "browser",
      legalComments: "none",
      banner: { js: `/* tailor ${version} */` },
      logLevel: "warning",
    });
  }
  return Object.fromEntries(Object.entries(OUTPUTS).map(([format, file]) => [format, path.join(outdir, file)]));
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const out = await build(process.argv[2] ? path.resolve(process.argv[2]) : undefined);
  for (const file of Object.values(out)) console.log(path.relative(process.cwd(), file));
}
