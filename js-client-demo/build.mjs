// Bundles src/app.js with the SignalR client packages into dist/app.js (committed, so the
// server embeds it without npm). `OUT_DIR=/tmp/x npm run build` writes elsewhere (the
// staleness test in protocol-tests/browser.rs compares such a build with dist/app.js).
import { build } from "esbuild";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const outdir = process.env.OUT_DIR ? path.resolve(process.env.OUT_DIR) : path.join(here, "dist");

await build({
    absWorkingDir: here,
    entryPoints: ["src/app.js"],
    outfile: path.join(outdir, "app.js"),
    bundle: true,
    format: "iife",
    platform: "browser",
    target: ["es2020"],
    minify: true,
    keepNames: true,
    legalComments: "eof",
    charset: "utf8",
    logLevel: "info",
});
