//! The dashboard's images page in a real headless Chromium (Debian's, driven by playwright-core
//! from tests/browser/images.mjs), browser, daemon and real registries (Debian's
//! `docker-registry`) inside the test's network namespace: an admin pulls an OCI image through
//! the page and sees its progress live, and pulls from a registry with a login with a user and
//! password given for that pull; a refused pull lists nothing; a viewer gets no form and a 403.
//! Screenshots land in target/screenshots (images-*.png).

mod common;
mod oci_support;
use common::vm_state::seed;
use common::web::*;
use common::*;
use oci_support::{Registry, build_layout, images, push};

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn images_page_pulls_from_a_registry_in_headless_chromium() {
    // The QEMU backend's daemon (no machine is booted): the netns backend has no images.
    let env = Env::qemu("hrimg", &seed());
    add_user(&env, "ada", "admin", "ada-password");
    add_user(&env, "val", "viewer", "val-password");
    let work = env.dir.join("oci");
    std::fs::create_dir_all(&work).unwrap();
    let layout = build_layout(&work);
    let _reg = Registry::start(&env.ns, &work, "reg", "127.0.0.1:5077", None);
    let _auth = Registry::with_login(&env.ns, &work, "authreg", "127.0.0.1:5078", "soci", "sociPW");
    push(&env, &layout, "web", "127.0.0.1:5077/web:1");
    push(&env, &layout, "web", "127.0.0.1:5078/private:1");

    let before = images(&env).len();
    step("admin: a refused pull, a pull with progress and an extra tag, a private registry");
    scenario(&env, "admin", "ada", "ada-password");
    let listed = images(&env);
    let web = listed
        .iter()
        .find(|i| {
            i["tags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t == "127.0.0.1:5077/web:1")
        })
        .unwrap_or_else(|| panic!("the pulled image is not listed: {listed:?}"));
    assert!(
        web["tags"].as_array().unwrap().iter().any(|t| t == "webby"),
        "{web}"
    );
    assert!(
        web["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "127.0.0.1:5078/private:1"),
        "{web}"
    );
    // One image, three tags: the same manifest pulled from both registries.
    assert_eq!(
        listed.len(),
        before + 1,
        "the refused pulls stored nothing: {listed:?}"
    );
    let h: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["history", "--action", "image.pull", "-o", "json"])).unwrap();
    let by_ada: Vec<&str> = h
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == "user ada")
        .map(|e| e["result"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(by_ada.len(), 4, "{h}");
    assert_eq!(by_ada.iter().filter(|r| **r == "ok").count(), 2, "{h}");

    step("viewer: read-only, the pull API refused");
    scenario(&env, "viewer", "val", "val-password");
    assert_eq!(images(&env).len(), before + 1);
}

/// Run one scenario of tests/browser/images.mjs in the env's namespace.
fn scenario(env: &Env, mode: &str, user: &str, pass: &str) {
    browser_scenario(env, "images.mjs", "http://127.0.0.1:7777/", mode, user, pass);
}
