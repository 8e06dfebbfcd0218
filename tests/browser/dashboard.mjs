// Drives Debian's chromium (headless, through playwright-core) through the dashboard, inside
// the test's network namespace. Run by tests/dashboard.rs; one scenario per run:
//   MODE=admin  log in, deploy through the form and see it running, expose a port through the
//               form (and a bad spec shown next to the field), see CLI stops/starts live
//               without reloading, visit every page (screenshots), log out.
//   MODE=viewer log in, no mutating control on any page, its API calls get 403, no terminal,
//               log out.
//   MODE=terminal  (admin, a running machine "web") open the machine's terminal, run a command
//               and see its output, follow a resize, exit and reconnect, a dropped connection
//               reopened by itself (three tries, then the button), leaving ends the shell.
// Env: URL, USER, PASS, SHOTS (screenshot folder), SISTEMO (binary), SOCKET, CHROMIUM.
// Prints "ok <check>" lines; exits 1 with "FAIL <reason>" on the first failure.
import { env, URL, MODE, SHOTS, T, ok, fail, cli, openPage, runScenario } from "./harness.mjs";
import { appendFileSync } from "node:fs";

const browser = await openPage();
const { page } = browser;
// A blocked style or script (the terminal's styles need the policy's inline styles) is a failure.
page.on("console", (m) => { if (m.type() === "error" && /Content Security Policy/.test(m.text())) browser.errors.push(m.text()); });
const shot = async (name) => page.screenshot({ path: `${SHOTS}/${MODE}-${name}.png`, fullPage: true });
const heading = (text) => page.locator("main h1", { hasText: text }).waitFor({ timeout: T });
const go = async (hash, title) => { await page.evaluate((h) => { location.hash = h; }, hash); await heading(title); };

// Chromium aborts a navigation when an interface appears in its namespace (a machine's link,
// made by the test): that is no failure of the page, so the navigation is retried.
async function open(url) {
  for (let i = 0; ; i++) {
    try {
      return await page.goto(url);
    } catch (e) {
      if (i >= 5 || !/ERR_NETWORK_CHANGED/.test(String(e))) throw e;
    }
  }
}

async function login() {
  await open(URL);
  await page.getByLabel("User name").waitFor({ timeout: T });
  await shot("login");
  // Keyboard only: type, Tab to the password, Enter submits.
  await page.getByLabel("User name").fill(env("USER"));
  await page.keyboard.press("Tab");
  await page.keyboard.type(env("PASS"));
  await page.keyboard.press("Enter");
  await heading("Overview");
  ok("logged in as " + env("USER"));
  await page.evaluate(() => { window.__noReload = 1; });
}

async function notReloaded(what) {
  if ((await page.evaluate(() => window.__noReload)) !== 1) fail("the page reloaded during " + what);
}

async function waitState(name, state) {
  await page.locator(`main .facts [data-state="${state}"]`).waitFor({ timeout: T });
  ok(`${name} shows ${state} without reloading`);
}

async function admin() {
  await login();
  await shot("overview");
  await page.getByRole("link", { name: "Deploy" }).first().click();
  await heading("Deploy a machine");
  await page.getByLabel("Image").fill("debian");
  await page.getByLabel("Name").fill("web");
  await shot("deploy");
  await page.getByRole("button", { name: "Deploy" }).click();
  await page.waitForFunction(() => location.hash === "#/machine/web", null, { timeout: 120000 });
  await heading("web");
  await waitState("web", "running");
  await notReloaded("the deploy");
  if ((await page.locator("[data-testid=progress] li").count()) === 0 &&
      (await page.evaluate(() => document.body.innerText.includes("running"))) !== true) fail("no progress");

  // A bad spec: the error is shown next to the field, nothing exposed.
  const spec = page.getByLabel("Port", { exact: true });
  await spec.fill("99999");
  await spec.press("Enter");
  const err = page.locator(".field-error", { hasText: "99999" });
  await err.waitFor({ timeout: T });
  if ((await spec.getAttribute("aria-invalid")) !== "true") fail("the bad field is not marked invalid");
  ok("a bad spec is shown next to its field: " + (await err.innerText()));
  await spec.fill("8080:80");
  await page.getByRole("button", { name: "Expose" }).click();
  await page.locator('tr[data-port="8080:80/tcp"]').waitFor({ timeout: T });
  ok("exposed 8080:80 through the form");
  await shot("machine");

  // The console is live: a line the guest writes shows up without a reload or a click.
  const id = JSON.parse(cli("machine", "status", "web", "-o", "json")).id;
  await page.locator("[data-testid=logs][data-state=live]").waitFor({ timeout: T });
  appendFileSync(`${env("DATA")}/machines/${id}/console.log`, "console-line-" + 6 * 7 + "\n");
  await page.locator("[data-testid=logs]", { hasText: "console-line-42" }).waitFor({ timeout: T });
  ok("a new console line appeared on the machine page by itself");

  // Changes made elsewhere (the CLI) arrive through the event stream.
  const t0 = Date.now();
  cli("machine", "expose", "web", "--port", "127.0.0.1:5353:53/udp");
  await page.locator('tr[data-port="127.0.0.1:5353:53/udp"]').waitFor({ timeout: T });
  console.log("event_latency_ms " + (Date.now() - t0));
  cli("machine", "stop", "web");
  await waitState("web", "stopped");
  cli("machine", "start", "web");
  await waitState("web", "running");
  await notReloaded("CLI changes");

  await go("#/machines", "Machines");
  await page.locator('tr[data-machine="web"] [data-state="running"]').waitFor({ timeout: T });
  await page.getByLabel("Filter machines").fill("nomatch");
  await page.locator("td.empty").waitFor({ timeout: T });
  await page.getByLabel("Filter machines").fill("web");
  await shot("machines");
  for (const [hash, title] of [["#/networks", "Networks"], ["#/images", "Images"], ["#/history", "History"], ["#/system", "System"], ["#/", "Overview"]]) {
    await go(hash, title);
    await shot(title.toLowerCase());
  }
  const running = await page.locator("[data-testid=count-running] .num").innerText();
  if (running !== "1") fail("overview counts " + running + " running machines");
  await page.setViewportSize({ width: 390, height: 844 });
  await go("#/machine/web", "web");
  await shot("machine-phone");
  await page.setViewportSize({ width: 1280, height: 800 });
  await notReloaded("the tour");
  await logout();
}

const MUTATING = ["Start", "Stop", "Restart", "Delete", "Expose", "Unexpose", "Deploy", "Create", "Build debian"];

async function viewer() {
  await login();
  if (await page.locator("nav a", { hasText: "Deploy" }).count()) fail("the viewer's menu offers Deploy");
  for (const [hash, title] of [["#/", "Overview"], ["#/machines", "Machines"], ["#/machine/web", "web"],
    ["#/networks", "Networks"], ["#/images", "Images"], ["#/history", "History"], ["#/system", "System"], ["#/deploy", "Deploy"]]) {
    await go(hash, title);
    for (const name of MUTATING) {
      const n = await page.getByRole("button", { name, exact: true }).count() +
        await page.getByRole("link", { name, exact: true }).count();
      if (n) fail(`the viewer sees a ${name} control on ${hash}`);
    }
    if (await page.locator("main form:not([role=search])").count()) fail("the viewer sees a form on " + hash);
    await shot(title.toLowerCase());
  }
  ok("no mutating control on any page");
  const codes = await page.evaluate(async () => {
    const me = await (await fetch("/v1/session")).json();
    const h = { "Content-Type": "application/json", "X-CSRF-Token": me.csrf };
    const stop = await fetch("/v1/machines/web/stop", { method: "POST", headers: h });
    const expose = await fetch("/v1/machines/web/expose", { method: "POST", headers: h, body: '{"ports":["9090:80"]}' });
    const del = await fetch("/v1/machines/web", { method: "DELETE", headers: h });
    return [stop.status, expose.status, del.status, (await stop.json()).kind];
  });
  if (codes.slice(0, 3).some((c) => c !== 403) || codes[3] !== "forbidden") fail("viewer API calls answered " + codes);
  ok("the viewer's API calls get 403");
  await viewerTerminal();
  await logout();
}

// The viewer gets no terminal: no link, the page says so, the route answers 403.
async function viewerTerminal() {
  await go("#/machine/web", "web");
  if (await page.locator("[data-testid=terminal-open]").count()) fail("the viewer is offered a terminal");
  await page.locator("[data-testid=no-terminal]").waitFor({ timeout: T });
  await go("#/terminal/web", "Terminal");
  if (await page.locator(".xterm").count()) fail("the viewer's terminal page shows a terminal");
  const code = await page.evaluate(async () => (await fetch("/v1/machines/web/terminal")).status);
  if (code !== 403) fail("the viewer's terminal request answered " + code);
  const opened = await page.evaluate(() => new Promise((resolve) => {
    const ws = new WebSocket("ws://" + location.host + "/v1/machines/web/terminal");
    ws.onopen = () => { ws.close(); resolve(true); };
    ws.onerror = () => resolve(false);
  }));
  if (opened) fail("the viewer opened a terminal WebSocket");
  ok("the viewer gets no terminal (no link, 403, no WebSocket)");
}

// The terminal's visible text.
const screenText = () => page.evaluate(() => (document.querySelector(".xterm-rows") || {}).textContent || "");

// Wait until the terminal's text matches the regular expression `re` and does not contain `not`.
async function waitScreen(what, re, not) {
  await page.waitForFunction(([re, not]) => {
    const t = (document.querySelector(".xterm-rows") || {}).textContent || "";
    return new RegExp(re).test(t) && !(not && t.includes(not));
  }, [re, not], { timeout: T }).catch(async () => fail(`${what}: the terminal shows ${JSON.stringify(await screenText())}`));
}

async function typeLine(line) {
  await page.locator("[data-testid=terminal-screen]").click();
  await page.keyboard.type(line);
  await page.keyboard.press("Enter");
}

async function terminal() {
  // The terminal's sockets pass through a route in the browser (set before the page loads, as
  // Playwright's WebSocket routes need), which can drop them (as a daemon restart or a network
  // would) or refuse new ones (a daemon still away).
  const sockets = [];
  let refuse = false;
  await page.routeWebSocket(/\/terminal\?/, (ws) => {
    if (refuse) ws.close({ code: 4001, reason: "refused by the test" });
    else sockets.push([ws, ws.connectToServer()]);
  });
  const drop = async () => {
    const [ws, server] = sockets[sockets.length - 1];
    await server.close({ code: 4000, reason: "dropped by the test" });
    await ws.close({ code: 4000, reason: "dropped by the test" });
  };
  await login();
  const secure = await page.evaluate(() => location.protocol === "https:");
  await go("#/machine/web", "web");
  await page.locator("[data-testid=terminal-open]").click();
  await heading("web — terminal");
  await page.locator("[data-testid=terminal][data-state=open]").waitFor({ timeout: T });
  ok("the terminal connected" + (secure ? " (wss)" : ""));
  await typeLine("echo sistemo-$((6*7))");
  await waitScreen("echo", "sistemo-42");
  ok("ran a command in the terminal and saw its output");
  // The machine's own name, from inside it (the typed line itself shows `host=/`, never `host=web`).
  await typeLine("hostname | sed 's/^/host=/'");
  await waitScreen("hostname", "host=web");
  ok("hostname in the terminal is the machine's name");
  await typeLine("stty size | sed 's/^/size=/; s/ /x/'");
  await waitScreen("stty size", "size=\\d+x\\d+");
  const before = (await screenText()).match(/size=(\d+x\d+)/)[1];
  await shot("terminal");
  await page.setViewportSize({ width: 900, height: 600 });
  await typeLine("clear; stty size | sed 's/^/size=/; s/ /x/'");
  await waitScreen("stty size after a resize", "size=\\d+x\\d+", "size=" + before);
  const after = (await screenText()).match(/size=(\d+x\d+)/)[1];
  ok(`the terminal followed the window: ${before} -> ${after}`);
  await page.setViewportSize({ width: 1280, height: 800 });
  await typeLine("exit");
  await page.locator("[data-testid=terminal][data-state=closed]").waitFor({ timeout: T });
  const status = await page.locator(".term-status").innerText();
  if (!status.includes("exit 0")) fail("after exit the terminal says " + status);
  await page.getByRole("button", { name: "Reconnect" }).click();
  await page.locator("[data-testid=terminal][data-state=open]").waitFor({ timeout: T });
  await typeLine("echo again-$((6*7))");
  await waitScreen("echo after reconnecting", "again-42");
  ok("exit, then Reconnect opened a new shell");
  await drop();
  await page.locator("[data-testid=terminal][data-state=connecting]").waitFor({ timeout: T });
  const retrying = await page.locator(".term-status").innerText();
  if (!retrying.includes("reconnecting (1/3)")) fail("after a drop the terminal says " + retrying);
  await page.locator("[data-testid=terminal][data-state=open]").waitFor({ timeout: T });
  if (sockets.length !== 3) fail(`${sockets.length} sockets after one drop, not 3`);
  await typeLine("echo back-$((6*7))");
  await waitScreen("echo after a drop", "\\[connection lost\\][^]*\\[reconnected: a new shell\\][^]*back-42");
  ok("a dropped connection reconnected by itself, the screen says so");
  refuse = true;
  await drop();
  await page.locator("[data-testid=terminal][data-state=closed]").waitFor({ timeout: T });
  const gaveUp = await page.locator(".term-status").innerText();
  if (!gaveUp.includes("3 reconnects failed")) fail("after refused reconnects the terminal says " + gaveUp);
  refuse = false;
  await page.getByRole("button", { name: "Reconnect" }).click();
  await page.locator("[data-testid=terminal][data-state=open]").waitFor({ timeout: T });
  if (sockets.length !== 4) fail(`${sockets.length} sockets after three refused tries, not 4`);
  ok("a daemon that stays away: three tries, then the Reconnect button");
  await typeLine("sleep 4242");
  await waitScreen("sleep", "sleep 4242");
  const sleeping = () => cli("machine", "exec", "web", "pgrep -f '^sleep 4242$' || true").trim();
  const until = Date.now() + T;
  while (!sleeping() && Date.now() < until) await page.waitForTimeout(100);
  if (!sleeping()) fail("the terminal's sleep is not running in the machine");
  await go("#/machines", "Machines");
  const end = Date.now() + T;
  while (sleeping() && Date.now() < end) await page.waitForTimeout(100);
  if (sleeping()) fail("the shell outlived the terminal page");
  ok("leaving the page ended the shell");
  await logout();
}

async function logout() {
  await page.getByRole("button", { name: "Log out" }).click();
  await page.getByLabel("User name").waitFor({ timeout: T });
  const code = await page.evaluate(async () => (await fetch("/v1/machines")).status);
  if (code !== 401) fail("after log-out the API answered " + code);
  ok("logged out");
}

await runScenario(browser, { admin, terminal, viewer }, shot);
