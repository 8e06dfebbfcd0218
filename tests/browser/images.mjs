// Drives Debian's chromium (headless, through playwright-core) through the dashboard's images
// page, inside the test's network namespace. Run by tests/dashboard_images.rs; one scenario per
// run (registries in the namespace serve 127.0.0.1:5077/web:1 and 127.0.0.1:5078/private:1):
//   MODE=admin  pull a tag the registry lacks (the error shown, nothing listed), then pull
//               web:1 with an extra tag: its progress lines shown live, the image listed; from
//               a registry with a login (127.0.0.1:5078, soci/sociPW): a wrong password
//               refused, the right one pulls.
//   MODE=viewer no pull or build form, and the pull API answers 403.
// Env: URL, USER, PASS, SHOTS, SISTEMO, SOCKET, CHROMIUM. Prints "ok <check>" lines; exits 1
// with "FAIL <reason>" on the first failure.
import { MODE, SHOTS, T, ok, fail, openPage, runScenario, logInTo } from "./harness.mjs";

const browser = await openPage();
const { page } = browser;
const shot = async (name) => page.screenshot({ path: `${SHOTS}/images-${MODE}-${name}.png`, fullPage: true });
const row = (tag) => page.locator("main tbody tr", { hasText: tag });
const REF = "127.0.0.1:5077/web:1", PRIVATE = "127.0.0.1:5078/private:1";

const login = () => logInTo(page, "Images");

async function admin() {
  await login();
  const pull = page.getByRole("form", { name: "Pull an image" });
  await pull.getByLabel("Reference").fill("127.0.0.1:5077/web:nope");
  await pull.getByRole("button", { name: "Pull" }).click();
  const shown = pull.locator(".field-error:not(:empty), .form-error:not(:empty)");
  await shown.first().waitFor({ timeout: T });
  const said = await shown.first().innerText();
  if (!said.includes("web:nope") || !said.includes("not found in its registry")) fail("the refused pull says " + said);
  ok("a tag the registry lacks is refused in the form: " + said);
  if (await row("web:nope").count()) fail("a failed pull listed an image");

  await pull.getByLabel("Reference").fill(REF);
  await pull.getByLabel("Extra tag").fill("webby");
  await pull.getByLabel("Extra tag").press("Enter");
  await page.locator("ol.progress li").first().waitFor({ timeout: T });
  ok("the pull's progress is shown while it runs: " + (await page.locator("ol.progress li").first().innerText()));
  await row(REF).waitFor({ timeout: 60000 });
  const tags = await row(REF).locator("td").first().innerText();
  if (!tags.includes("webby")) fail("the pulled image's tags are " + tags);
  const lines = await page.locator("ol.progress li").allInnerTexts();
  if (lines.length < 2) fail("the pull showed " + lines.length + " progress lines");
  if (await pull.locator(".field-error:not(:empty), .form-error:not(:empty)").count()) fail("the earlier error is still shown");
  ok(`pulled ${REF} as ${tags} (${lines.length} progress lines), listed without reloading`);

  // A private registry: a wrong password is shown next to the user, the right one pulls.
  await pull.getByLabel("Reference").fill(PRIVATE);
  await pull.getByLabel("Extra tag").fill("");
  await pull.getByText("Private registry").click();
  await pull.getByLabel("Registry user").fill("soci");
  await pull.getByLabel("Registry password").fill("wrong");
  await pull.getByRole("button", { name: "Pull" }).click();
  const denied = pull.locator(".field-error:not(:empty)", { hasText: "authentication" });
  await denied.waitFor({ timeout: T });
  ok("a wrong registry password is refused next to the user: " + (await denied.innerText()));
  await pull.getByLabel("Registry password").fill("sociPW");
  await pull.getByRole("button", { name: "Pull" }).click();
  await row(PRIVATE).waitFor({ timeout: 60000 });
  if ((await pull.getByLabel("Registry password").inputValue()) !== "") fail("the password stays in the form after the pull");
  ok("pulled " + PRIVATE + " with the registry's user and password, not kept in the form");
  await shot("pulled");
}

async function viewer() {
  await login();
  await row(REF).waitFor({ timeout: T });
  if (await page.locator("main form").count()) fail("the viewer sees a form on the images page");
  if (await page.getByRole("button", { name: "Pull" }).count()) fail("the viewer sees a Pull button");
  const code = await page.evaluate(async (ref) => {
    const me = await (await fetch("/v1/session")).json();
    const r = await fetch("/v1/images/pull", { method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": me.csrf }, body: JSON.stringify({ reference: ref }) });
    return r.status;
  }, REF);
  if (code !== 403) fail("the viewer's pull answered " + code);
  ok("the viewer sees the images read-only and its pull gets 403");
}

await runScenario(browser, { admin, viewer }, shot);
