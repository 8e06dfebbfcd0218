// Drives Debian's chromium (headless, through playwright-core) through the dashboard's volumes
// page, inside the test's network namespace. Run by tests/dashboard_volumes.rs; one scenario
// per run (machines "db", stopped, and "web", running, exist):
//   MODE=admin  create a volume (a bad size shown next to its field), see one made with the CLI
//               appear live, snapshot, clone, attach to the stopped machine (a running one
//               refused next to the machine field), delete refused while attached (the API's
//               error shown), detach, delete; screenshots.
//   MODE=viewer the page lists the volumes, no mutating control or form, the API answers 403.
// Env: URL, USER, PASS, SHOTS, SISTEMO, SOCKET, CHROMIUM. Prints "ok <check>" lines; exits 1
// with "FAIL <reason>" on the first failure.
import { MODE, SHOTS, T, ok, fail, cli, openPage, runScenario, logInTo } from "./harness.mjs";

const browser = await openPage();
const { page } = browser;
page.on("dialog", (d) => d.accept());
const shot = async (name) => page.screenshot({ path: `${SHOTS}/volumes-${MODE}-${name}.png`, fullPage: true });
const row = (name) => page.locator(`tr[data-volume="${name}"]`);
const cell = (name, f) => row(name).locator(`[data-field="${f}"]`);
const form = (label) => page.getByRole("form", { name: label });

async function waitText(locator, re, what) {
  await page.waitForFunction(([sel, re]) => {
    const el = document.querySelector(sel);
    return el && new RegExp(re).test(el.textContent);
  }, [locator, re], { timeout: T }).catch(async () => fail(what + ": not " + re));
}

async function login() {
  await logInTo(page, "Volumes");
  await page.evaluate(() => { window.__noReload = 1; });
}

async function notReloaded(what) {
  if ((await page.evaluate(() => window.__noReload)) !== 1) fail("the page reloaded during " + what);
}

async function admin() {
  await login();
  const create = form("Create a volume");
  // A bad size: the API's error next to the Size field.
  await create.getByLabel("Size").fill("0");
  await create.getByLabel("Name").fill("pgdata");
  await create.getByRole("button", { name: "Create" }).click();
  const err = create.locator(".field-error", { hasText: "size" });
  await err.waitFor({ timeout: T });
  if ((await create.getByLabel("Size").getAttribute("aria-invalid")) !== "true") fail("the bad size is not marked invalid");
  ok("a bad size is shown next to its field: " + (await err.innerText()));
  if (await row("pgdata").count()) fail("a bad size made a volume");
  // Keyboard: fix the size and press Enter.
  await create.getByLabel("Size").fill("64M");
  await create.getByLabel("Size").press("Enter");
  await row("pgdata").waitFor({ timeout: T });
  if ((await cell("pgdata", "size").innerText()) !== "64.0 MiB") fail("pgdata's size shows " + (await cell("pgdata", "size").innerText()));
  ok("created pgdata (64 MiB, ext4) through the form");

  const t0 = Date.now();
  cli("volume", "create", "32M", "--name", "fromcli", "--format", "raw");
  await row("fromcli").waitFor({ timeout: T });
  console.log("volume_event_latency_ms " + (Date.now() - t0));
  if ((await row("fromcli").locator("td").nth(2).innerText()) !== "raw") fail("fromcli is not shown raw");
  ok("a volume made with the CLI appeared without reloading");

  const copy = form("Snapshot or clone");
  await copy.getByLabel("From").selectOption("pgdata");
  await copy.getByLabel("New name").fill("pg-snap");
  await copy.getByRole("button", { name: "Snapshot" }).click();
  await page.locator('tr[data-volume="pg-snap"][data-kind="snapshot"]').waitFor({ timeout: T });
  await waitText('tr[data-volume="pgdata"] [data-field="snapshots"]', "pg-snap", "pgdata's snapshots");
  await copy.getByLabel("From").selectOption("pg-snap");
  await copy.getByLabel("New name").fill("pg-clone");
  await copy.getByRole("button", { name: "Clone" }).click();
  await page.locator('tr[data-volume="pg-clone"][data-kind="volume"]').waitFor({ timeout: T });
  ok("snapshot pg-snap of pgdata, clone pg-clone of the snapshot");

  const attach = form("Attach a volume");
  await attach.getByLabel("Volume").selectOption("pgdata");
  await attach.getByLabel("Machine").selectOption("web");
  await attach.getByRole("button", { name: "Attach" }).click();
  const merr = attach.locator(".field-error", { hasText: "running" });
  await merr.waitFor({ timeout: T });
  ok("a running machine is refused next to the machine field: " + (await merr.innerText()));
  await attach.getByLabel("Machine").selectOption("db");
  await attach.getByLabel("Mount point").fill("/data");
  await attach.getByRole("button", { name: "Attach" }).click();
  await waitText('tr[data-volume="pgdata"] [data-field="attached"]', "^db:/data$", "pgdata's attachment");
  ok("attached pgdata to db at /data");
  await shot("attached");

  await row("pgdata").getByRole("button", { name: "Delete" }).click();
  const alert = page.locator("[data-testid=volumes-error]");
  await waitText("[data-testid=volumes-error]", "attached", "the refused delete");
  ok("deleting an attached volume shows the API's error: " + (await alert.innerText()));
  if (!(await row("pgdata").count())) fail("pgdata went away");

  cli("machine", "volume", "detach", "db", "pgdata");
  await waitText('tr[data-volume="pgdata"] [data-field="attached"]', "^-$", "pgdata detached by the CLI");
  ok("a detach made with the CLI appeared without reloading");
  cli("machine", "volume", "attach", "db", "pg-clone", "--readonly");
  await waitText('tr[data-volume="pg-clone"] [data-field="attached"]', "^db \\(ro\\)$", "pg-clone attached by the CLI");
  await row("pg-clone").getByRole("button", { name: "Detach from db" }).click();
  await waitText('tr[data-volume="pg-clone"] [data-field="attached"]', "^-$", "pg-clone detached");
  ok("detached pg-clone from db through the page");
  await row("fromcli").getByRole("button", { name: "Delete" }).click();
  await row("fromcli").waitFor({ state: "detached", timeout: T });
  ok("deleted fromcli");
  await notReloaded("the volume changes");
  await shot("page");
  await page.setViewportSize({ width: 390, height: 844 });
  await shot("phone");
}

async function viewer() {
  await login();
  await row("pgdata").waitFor({ timeout: T });
  for (const name of ["Create", "Snapshot", "Clone", "Attach", "Delete"]) {
    if (await page.getByRole("button", { name }).count()) fail(`the viewer sees a ${name} control`);
  }
  if (await page.locator("main button").count()) fail("the viewer sees a button on the volumes page");
  if (await page.locator("main form").count()) fail("the viewer sees a form on the volumes page");
  ok("the viewer sees the volumes read-only");
  const codes = await page.evaluate(async () => {
    const me = await (await fetch("/v1/session")).json();
    const h = { "Content-Type": "application/json", "X-CSRF-Token": me.csrf };
    const create = await fetch("/v1/volumes", { method: "POST", headers: h, body: '{"size":"16M","name":"nope"}' });
    const del = await fetch("/v1/volumes/pgdata", { method: "DELETE", headers: h });
    const attach = await fetch("/v1/machines/db/volumes", { method: "POST", headers: h, body: '{"volume":"pgdata"}' });
    return [create.status, del.status, attach.status];
  });
  if (codes.some((c) => c !== 403)) fail("the viewer's volume API calls answered " + codes);
  ok("the viewer's volume API calls get 403");
  await shot("page");
}

await runScenario(browser, { admin, viewer }, shot);
