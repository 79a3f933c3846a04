// Drives headless Chromium (Debian's /usr/bin/chromium) through playwright-core
// against a running mltap dashboard.
//
//   node dashboard.mjs --url http://127.0.0.1:PORT/ [--chromium PATH] [--screenshot FILE]
//                      [--bench] [--eager] [--range SECONDS] [--live-timeout-ms N]
//                      [--check-timeout-ms N] [--no-capture-health] [--regression]
//
// Test mode (default): opens the page, checks that the charts hold data points for
// classes, features and accuracy (with --regression: the predictions' distribution
// and MAE/RMSE of a regression model), waits for a live update pushed by Server-Sent
// Events, and saves a screenshot. Any request to a host other than the dashboard's
// fails the run: the page must work with no network beyond mltap.
// Bench mode: loads the page with the given range (and every chart drawn at once
// with --eager) and prints load figures as JSON.
// Exits non-zero with one clear message on any failure.
import { chromium } from "playwright-core";
import { existsSync, mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";

function parseArgs(argv) {
  const args = {
    chromium: "/usr/bin/chromium", bench: false, range: null, liveTimeoutMs: 30000, checkTimeoutMs: 10000,
    expectCaptureHealth: true,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) die(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--url") args.url = next();
    else if (a === "--chromium") args.chromium = next();
    else if (a === "--screenshot") args.screenshot = next();
    else if (a === "--bench") args.bench = true;
    else if (a === "--eager") args.eager = true;
    else if (a === "--range") args.range = Number(next());
    else if (a === "--live-timeout-ms") args.liveTimeoutMs = Number(next());
    else if (a === "--check-timeout-ms") args.checkTimeoutMs = Number(next());
    else if (a === "--no-capture-health") args.expectCaptureHealth = false;
    else if (a === "--regression") args.regression = true;
    else die(`unknown argument ${a}`);
  }
  if (!args.url) die("--url is required");
  return args;
}

class Failure extends Error {}

// Throws, so that the browser is closed and its profile removed before exiting.
function fail(message) {
  throw new Failure(message);
}

function die(message) {
  console.error(`dashboard browser check failed: ${message}`);
  process.exit(1);
}

const args = parseArgs(process.argv.slice(2));
if (!existsSync(args.chromium)) {
  die(`Chromium not found at ${args.chromium}; install it with \`apt-get install -y chromium\``);
}

const origin = new URL(args.url).origin;
const userDataDir = mkdtempSync(join(tmpdir(), "mltap-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: args.chromium,
    headless: true,
    viewport: { width: 1440, height: 1000 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
} catch (e) {
  rmSync(userDataDir, { recursive: true, force: true });
  die(`could not start Chromium at ${args.chromium}: ${e.message.split("\n")[0]}`);
}

const problems = [];
const external = [];
try {
  const page = context.pages()[0] ?? (await context.newPage());
  await page.route("**/*", (route) => {
    const url = route.request().url();
    if (new URL(url).origin !== origin) {
      external.push(url);
      return route.abort();
    }
    return route.continue();
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") problems.push(`console error: ${m.text()}`); });

  const target = new URL(args.url);
  if (args.range) target.searchParams.set("range", String(args.range));
  if (args.eager) target.searchParams.set("eager", "1");
  await page.goto(target.href, { waitUntil: "load" });
  await page.waitForFunction(() => document.body.dataset.rendered === "true", null, { timeout: 120000 })
    .catch(() => fail("the dashboard did not render its charts within 120 s"));

  // What the charts hold, read from the uPlot instances themselves.
  const summarize = () => page.evaluate(() => {
    const d = window.mltapDashboard;
    const charts = {};
    for (const [id, { plot }] of d.charts) {
      const xs = plot.data[0];
      // The newest bucket that holds a value in any series of the chart.
      let latest = null;
      for (let i = xs.length - 1; i >= 0 && latest === null; i--) {
        if (plot.data.slice(1).some((ys) => ys[i] !== null && ys[i] !== undefined)) latest = xs[i];
      }
      charts[id] = {
        buckets: xs.length,
        latest,
        series: plot.series.slice(1).map((s, i) => ({
          label: s.label,
          points: plot.data[i + 1].filter((v) => v !== null && v !== undefined).length,
        })),
      };
    }
    return {
      charts,
      strip: d.strip,
      liveUpdates: d.liveUpdates,
      firstRenderMs: d.firstRenderMs,
      lastRenderMs: d.lastRenderMs,
      domNodes: document.getElementsByTagName("*").length,
      heapBytes: performance.memory ? performance.memory.usedJSHeapSize : null,
      timings: { ...d.timings },
      apiBytes: performance.getEntriesByType("resource")
        .filter((e) => e.name.includes("/api/models")).reduce((t, e) => t + e.encodedBodySize, 0),
    };
  });

  if (args.bench) {
    const loaded = await summarize();
    const buckets = Math.max(...Object.values(loaded.charts).map((c) => c.buckets));
    // Responsiveness after load: how long the page takes to merge and redraw one
    // live bucket, and to switch range.
    const live0 = loaded.liveUpdates;
    await page.waitForFunction((n) => window.mltapDashboard.liveUpdates > n, live0, { timeout: args.liveTimeoutMs })
      .catch(() => fail("no live update arrived during the benchmark"));
    const afterLive = await summarize();
    // Charts drawn on approach: the last feature's chart appears once scrolled to.
    const scrolled = Date.now();
    await page.evaluate(() => window.scrollTo(0, document.body.scrollHeight));
    await page.waitForFunction(() => {
      const cards = document.querySelectorAll('[data-chart^="feature:"]');
      const last = cards[cards.length - 1]?.dataset.chart;
      return last && window.mltapDashboard.charts.has(last);
    }, null, { timeout: 30000 }).catch(() => fail("the last feature chart was not drawn after scrolling to it"));
    const scrollToLastFeatureMs = Date.now() - scrolled;
    await page.evaluate(() => window.scrollTo(0, 0));
    const t = Date.now();
    await page.evaluate(() => { document.body.dataset.rendered = "false"; });
    await page.getByRole("button", { name: "15 min" }).click();
    await page.waitForFunction(() => document.body.dataset.rendered === "true");
    const switchMs = Date.now() - t;
    console.log(JSON.stringify({
      firstRenderMs: Math.round(loaded.firstRenderMs),
      renderMs: Math.round(loaded.lastRenderMs),
      charts: Object.keys(loaded.charts).length,
      buckets,
      stripRows: loaded.strip?.rows,
      apiBytesAtLoad: loaded.apiBytes,
      loadTimings: loaded.timings,
      liveTimings: afterLive.timings,
      domNodes: loaded.domNodes,
      heapBytes: loaded.heapBytes,
      liveRedrawMs: Math.round(afterLive.lastRenderMs),
      rangeSwitchTo15minMs: switchMs,
      scrollToLastFeatureMs,
      problems,
      external,
    }));
  } else {
    // What the page must show; polled, since a fresh mltap fills its history live.
    const unmet = (d) => {
      const missing = [];
      const need = (ok, message) => { if (!ok) missing.push(message); };
      if (args.regression) {
        const prediction = d.charts.prediction;
        need(prediction && ["q25", "q75", "mean"].every((stat) => prediction.series.some((s) => s.label === stat && s.points > 0)),
          "the prediction chart has no mean with its q25-q75 band");
        const errors = d.charts.errors;
        for (const label of ["MAE", "RMSE"]) {
          need(errors && errors.series.some((s) => s.label === label && s.points > 0), `the error chart has no ${label} points`);
        }
        for (const id of ["classes", "proba", "accuracy"]) need(!d.charts[id], `a regression model shows the ${id} chart`);
      } else {
        const classes = d.charts.classes;
        need(classes && classes.series.filter((s) => s.points > 0).length >= 2,
          "the class distribution chart has no data points for at least two classes");
        const accuracy = d.charts.accuracy;
        need(accuracy && accuracy.series.some((s) => s.label.startsWith("estimated") && s.points > 0),
          "the accuracy chart has no estimated accuracy points");
        need(accuracy && accuracy.series.some((s) => s.label.startsWith("accuracy") && s.points > 0),
          "the accuracy chart has no real (label) accuracy points");
      }
      const features = Object.entries(d.charts).filter(([id]) => id.startsWith("feature:"));
      need(features.length > 0 && features.every(([, c]) => c.series.every((s) => s.points > 0)),
        "feature charts are missing or hold no data points");
      need(d.strip && d.strip.rows >= features.length, "the drift heat strip has no rows for the features");
      for (const id of args.regression ? ["traffic", "prediction"] : ["traffic", "proba"]) {
        need(d.charts[id]?.series.some((s) => s.points > 0), `the ${id} chart is missing or empty`);
      }
      if (args.expectCaptureHealth) {
        need(d.charts.health?.series.some((s) => s.label.startsWith("capture drops") && s.points > 0),
          "the capture health chart has no capture drops series");
      }
      return missing;
    };
    const deadline = Date.now() + args.checkTimeoutMs;
    let before = await summarize();
    while (unmet(before).length && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 500));
      before = await summarize();
    }
    const missing = unmet(before);
    if (missing.length) {
      fail(`${missing.join("; ")} (after ${args.checkTimeoutMs} ms)\n${JSON.stringify(before, null, 1).slice(0, 3000)}`);
    }
    // The chart of the model's outputs: classes, or a regression's predictions.
    const main = args.regression ? "prediction" : "classes";
    const classes = before.charts[main];
    const features = Object.entries(before.charts).filter(([id]) => id.startsWith("feature:"));
    const need = (ok, message) => { if (!ok) fail(message); };
    // The output chart's canvas must have been painted, not just fed.
    const painted = await page.evaluate((main) => {
      const { plot } = window.mltapDashboard.charts.get(main);
      const c = plot.ctx.canvas;
      const px = plot.ctx.getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let i = 3; i < px.length; i += 4) if (px[i] !== 0) n++;
      return n;
    }, main);
    need(painted > 1000, `the ${main} chart canvas is blank (${painted} painted pixels)`);

    const latestBefore = classes.latest;
    // A live update of the class chart: a newer bucket with class data, merged and
    // painted without reloading the page.
    // A marker on the window survives live updates, not a reload.
    await page.evaluate(() => { window.mltapCheckMarker = true; });
    const liveDeadline = Date.now() + args.liveTimeoutMs;
    let after = await summarize();
    while (!(after.liveUpdates > before.liveUpdates && after.charts[main]?.latest > latestBefore)) {
      if (Date.now() > liveDeadline) {
        fail(after.liveUpdates > before.liveUpdates
          ? `live updates arrived but the ${main} chart did not move past bucket ${latestBefore} within ${args.liveTimeoutMs} ms`
          : `no live update arrived through Server-Sent Events within ${args.liveTimeoutMs} ms`);
      }
      await new Promise((r) => setTimeout(r, 250));
      after = await summarize();
    }
    need(await page.evaluate(() => window.mltapCheckMarker === true), "the page reloaded instead of updating live");
    if (args.screenshot) {
      mkdirSync(dirname(args.screenshot), { recursive: true });
      await page.evaluate(() => window.scrollTo(0, 0));
      await page.screenshot({ path: args.screenshot, fullPage: false });
    }
    if (external.length) fail(`the page tried to reach other hosts: ${external.join(", ")}`);
    if (problems.length) fail(problems.join("\n"));
    console.log(JSON.stringify({
      ok: true,
      charts: Object.keys(after.charts).length,
      features: features.length,
      classes: classes.series.map((s) => s.label),
      liveUpdates: after.liveUpdates,
      latestBucketBefore: latestBefore,
      latestBucketAfter: after.charts[main].latest,
    }));
  }
} catch (e) {
  console.error(`dashboard browser check failed: ${e instanceof Failure ? e.message : e.stack}`);
  process.exitCode = 1;
} finally {
  await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
