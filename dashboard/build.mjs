// Bundles the dashboard page (source in src/, uPlot from node_modules) into
// ../assets/dashboard/, which the mltap binary embeds. Run `npm ci && npm run build`
// after changing anything here, and commit the result: building mltap never needs
// npm or a network.
import { build } from "esbuild";
import { copyFile, mkdir, readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "assets", "dashboard");
await mkdir(out, { recursive: true });
// uPlot's own header is not a legal comment esbuild keeps; its MIT notice is restated.
const uplot = JSON.parse(await readFile(join(here, "node_modules", "uplot", "package.json"), "utf8"));
const notice = `/*! uPlot ${uplot.version} (c) Leon Sorokin, MIT License */`;
await build({
  entryPoints: { app: join(here, "src", "main.js") },
  bundle: true,
  minify: true,
  format: "iife",
  target: ["chrome100", "firefox100", "safari15"],
  outdir: out,
  legalComments: "eof",
  banner: { js: notice, css: notice },
  logLevel: "info",
});
await copyFile(join(here, "src", "index.html"), join(out, "index.html"));
