// What the browser scenarios (dashboard.mjs, volumes.mjs, images.mjs) share: their environment
// (URL, MODE, USER, PASS, SHOTS, SISTEMO, SOCKET, CHROMIUM), their output ("ok <check>" lines,
// then "PASS <mode>" or "FAIL <reason>"), the CLI, a headless Chromium page, and logging in.
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import { mkdirSync } from "node:fs";

export const env = (k) => { const v = process.env[k]; if (!v) throw new Error("missing env " + k); return v; };
export const URL = env("URL"), MODE = env("MODE"), SHOTS = env("SHOTS");
export const T = 20000;
export const ok = (what) => console.log("ok " + what);
export const fail = (what) => { throw new Error(what); };
export const cli = (...args) => execFileSync(env("SISTEMO"), ["--socket", env("SOCKET"), ...args], { encoding: "utf8" });

// Debian's Chromium with one page; uncaught page errors are collected in `errors`. An https URL
// is the daemon's self-signed listener (its fingerprint is pinned by the CLI tests).
export async function openPage() {
  mkdirSync(SHOTS, { recursive: true });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 }, ignoreHTTPSErrors: URL.startsWith("https:") });
  const page = await ctx.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  return { browser, page, errors };
}

// Run the scenario MODE names, then say PASS, or FAIL with a "failure" screenshot (`shot`);
// errors the page raised meanwhile fail it too.
export async function runScenario({ browser, errors }, scenarios, shot) {
  try {
    const scenario = scenarios[MODE];
    if (!scenario) fail(`MODE ${MODE} is not one of ${Object.keys(scenarios).join(", ")}`);
    await scenario();
    if (errors.length) fail("page errors: " + errors.join("; "));
    console.log("PASS " + MODE);
  } catch (e) {
    await shot("failure").catch(() => {});
    console.log("FAIL " + e.message);
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}

// Log in as USER with PASS on the dashboard at URL, then open the page its menu calls `title`.
export async function logInTo(page, title) {
  const heading = (text) => page.locator("main h1", { hasText: text }).waitFor({ timeout: T });
  await page.goto(URL);
  await page.getByLabel("User name").fill(env("USER"));
  await page.getByLabel("Password").fill(env("PASS"));
  await page.keyboard.press("Enter");
  await heading("Overview");
  await page.getByRole("link", { name: title }).click();
  await heading(title);
  ok(`logged in as ${env("USER")}, on the ${title.toLowerCase()} page`);
}
