//! OCI pulls that must resolve or refuse cleanly, with real tools and no Docker: a multi-arch
//! index assembled by `podman manifest` from `umoci` images and pushed with `--all` into Debian's
//! `docker-registry` (loopback, in the test's namespace); an index without linux/amd64; a
//! three-layer image whose last layer is corrupt in the registry's storage; `image prune`
//! freeing exactly the layers no image uses; and an `oci-archive` made by `skopeo` imported.

mod common;
mod oci_support;
use common::vm_state::seed;
use common::*;
use oci_support::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Every file of the image store (path → size), lock files aside: what a failed pull or import
/// must leave exactly as it was (images, the index, blobs, temporary files, scratch folders).
fn store_files(env: &Env) -> BTreeMap<String, u64> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u64>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel == "blobs/locks" {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                out.insert(format!("{rel}/"), 0);
                walk(root, &p, out);
            } else {
                out.insert(rel, md.len());
            }
        }
    }
    let root = env.dir.join("data/images");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The cached layer blobs (digest → size).
fn blob_files(env: &Env) -> BTreeMap<String, u64> {
    std::fs::read_dir(env.dir.join("data/images/blobs/sha256"))
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    (
                        format!("sha256:{}", e.file_name().to_string_lossy()),
                        e.metadata().unwrap().len(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The ext4 file of image `row` (as `image list -o json` shows it).
fn ext4(env: &Env, row: &serde_json::Value) -> std::path::PathBuf {
    env.dir
        .join("data/images")
        .join(format!("{}.ext4", row["sha256"].as_str().unwrap()))
}

/// `podman` with its own storage under `dir` (nothing of the host's), inside the namespace.
fn podman(env: &Env, dir: &Path, args: &str) -> String {
    let cmd = format!(
        "podman --root {0}/storage --runroot {0}/run --storage-driver vfs --events-backend none {args}",
        dir.display()
    );
    let o = env.sh(&cmd);
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Tag `tag` of layout `l`: `web` plus a layer holding `/etc/arch` = `arch`, its config for
/// linux/`arch`; returns its manifest's digest.
fn arch_image(l: &Path, work: &Path, tag: &str, arch: &str) -> String {
    let b = work.join(format!("bundle-{tag}"));
    let (l, b) = (l.display(), b.display());
    sh(&format!(
        "umoci tag --image {l}:web {tag} && umoci unpack --image {l}:{tag} {b} && \
         echo {arch} > {b}/rootfs/etc/arch && umoci repack --image {l}:{tag} {b} && rm -rf {b} && \
         umoci config --image {l}:{tag} --os linux --architecture {arch}"
    ));
    manifest_digest(&format!("oci:{l}:{tag}"))
}

/// The digest of the manifest skopeo reads at `src` (a transport:reference).
fn manifest_digest(src: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&sh(&format!("skopeo inspect {src}"))).unwrap();
    v["Digest"].as_str().unwrap().to_string()
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn oci_multi_arch_index_resolves_to_amd64_and_refusals_leave_the_store_as_it_was() {
    let env = Env::qemu("hoidx", &seed());
    let work = env.dir.join("oci");
    std::fs::create_dir_all(&work).unwrap();
    let layout = build_layout(&work);
    let _reg = Registry::start(&env.ns, &work, "reg", "127.0.0.1:5077", None);

    step("a multi-arch index made by podman manifest, pushed with --all");
    let amd = arch_image(&layout, &work, "amd", "amd64");
    let arm = arch_image(&layout, &work, "arm", "arm64");
    let s390 = arch_image(&layout, &work, "s390", "s390x");
    let l = layout.display();
    podman(&env, &work, "manifest create homulti");
    podman(
        &env,
        &work,
        &format!("manifest add --os linux --arch arm64 homulti oci:{l}:arm"),
    );
    podman(
        &env,
        &work,
        &format!("manifest add --os linux --arch amd64 homulti oci:{l}:amd"),
    );
    podman(
        &env,
        &work,
        "manifest push --all --tls-verify=false homulti docker://127.0.0.1:5077/multi:1",
    );
    podman(&env, &work, "manifest create honoamd");
    podman(
        &env,
        &work,
        &format!("manifest add --os linux --arch arm64 honoamd oci:{l}:arm"),
    );
    podman(
        &env,
        &work,
        &format!("manifest add --os linux --arch s390x honoamd oci:{l}:s390"),
    );
    podman(
        &env,
        &work,
        "manifest push --all --tls-verify=false honoamd docker://127.0.0.1:5077/noamd:1",
    );
    // What the registry serves: an index (manifest list) whose amd64 entry is `amd`.
    let raw = env.sh("skopeo inspect --raw --tls-verify=false docker://127.0.0.1:5077/multi:1");
    let index: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    let entries = index["manifests"].as_array().expect("an index");
    assert_eq!(entries.len(), 2, "{index}");
    assert!(
        entries
            .iter()
            .any(|e| e["digest"] == amd.as_str() && e["platform"]["architecture"] == "amd64"),
        "{index}"
    );
    assert!(entries.iter().any(|e| e["digest"] == arm.as_str()), "{index}");
    assert_ne!(entries[0]["digest"], amd.as_str(), "amd64 is not the first entry");

    step("the pull resolves the index to its linux/amd64 manifest");
    env.cli_ok(&["image", "pull", "127.0.0.1:5077/multi:1"]);
    let multi = images(&env)
        .into_iter()
        .find(|i| {
            i["tags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t == "127.0.0.1:5077/multi:1")
        })
        .expect("multi listed");
    assert_eq!(multi["oci"]["digest"], amd.as_str(), "{multi}");
    let file = ext4(&env, &multi);
    let o = run(&["debugfs", "-R", "cat /etc/arch", file.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "amd64\n");
    assert_ne!(amd, s390);

    step("an index without linux/amd64: one line naming it and what is allowed, nothing kept");
    let before = store_files(&env);
    let e = env.cli_err(&["image", "pull", "127.0.0.1:5077/noamd:1"]);
    eprintln!("refusal: {e}");
    assert!(
        e.contains("127.0.0.1:5077/noamd:1")
            && e.contains("no linux/amd64")
            && e.contains("linux/arm64, linux/s390x")
            && e.contains("allowed: images for linux/amd64")
            && !e.contains("not found"),
        "{e}"
    );
    assert_eq!(store_files(&env), before, "nothing stored by the refused pull");

    step("a three-layer image whose last layer is corrupt: refused, the blob cache as it was");
    let mut layers = Vec::new();
    for i in 1..=3 {
        let tar = work.join(format!("part{i}.tar"));
        sh(&format!(
            "/usr/bin/python3 - <<'EOF'\nimport tarfile, io, os\nt = tarfile.open('{}', 'w')\ndata = os.urandom(300000)\ni = tarfile.TarInfo('part{i}'); i.size = len(data)\nt.addfile(i, io.BytesIO(data))\nt.close()\nEOF",
            tar.display()
        ));
        layers.push(tar);
    }
    sh(&format!(
        "umoci new --image {l}:parts && umoci raw add-layer --image {l}:parts {} && \
         umoci raw add-layer --image {l}:parts {} && umoci raw add-layer --image {l}:parts {} && \
         umoci config --image {l}:parts --config.cmd /part1",
        layers[0].display(),
        layers[1].display(),
        layers[2].display()
    ));
    push(&env, &layout, "parts", "127.0.0.1:5077/parts:1");
    let m: serde_json::Value =
        serde_json::from_str(&sh(&format!("skopeo inspect --raw oci:{l}:parts"))).unwrap();
    let digests: Vec<String> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(digests.len(), 3);
    let hex = digests[2].strip_prefix("sha256:").unwrap();
    let data = work.join(format!(
        "reg/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bytes = std::fs::read(&data).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let (before, blobs_before) = (store_files(&env), blob_files(&env));
    let o = env.cli(&["image", "pull", "127.0.0.1:5077/parts:1"]);
    let out = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("layer 1/3") && out.contains("layer 2/3") && out.contains("downloaded"),
        "layers 1 and 2 were downloaded before layer 3 failed: {out}"
    );
    let e: Vec<&str> = out.lines().filter(|x| !x.starts_with('…')).collect();
    assert_eq!(e.len(), 1, "one line: {out}");
    assert!(e[0].contains(&digests[2]) && e[0].contains("corrupt"), "{out}");
    assert_eq!(blob_files(&env), blobs_before, "the blob cache exactly as before");
    assert_eq!(store_files(&env), before, "nothing else kept either");

    step("the same image with its layer repaired pulls");
    push(&env, &layout, "parts", "127.0.0.1:5077/parts:2");
    let mut fixed = std::fs::read(&data).unwrap();
    fixed[n - 100] ^= 0xff;
    std::fs::write(&data, fixed).unwrap();
    env.cli_ok(&["image", "pull", "127.0.0.1:5077/parts:1"]);
    for d in &digests {
        assert!(blob_files(&env).contains_key(d), "{d} cached");
    }
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn oci_prune_frees_the_layers_no_image_uses_and_oci_archives_import() {
    let env = Env::qemu("hoprune", &seed());
    let work = env.dir.join("oci");
    std::fs::create_dir_all(&work).unwrap();
    let layout = build_layout(&work);
    let _reg = Registry::start(&env.ns, &work, "reg", "127.0.0.1:5077", None);
    push(&env, &layout, "web", "127.0.0.1:5077/web:1");
    push(&env, &layout, "three", "127.0.0.1:5077/three:1");

    step("two images sharing their lowest layer");
    env.cli_ok(&["image", "pull", "127.0.0.1:5077/web:1"]);
    env.cli_ok(&["image", "pull", "127.0.0.1:5077/three:1"]);
    let find = |tag: &str| {
        images(&env)
            .into_iter()
            .find(|i| i["tags"].as_array().unwrap().iter().any(|t| t == tag))
    };
    let three = find("127.0.0.1:5077/three:1").unwrap();
    let m: serde_json::Value = serde_json::from_str(&sh(&format!(
        "skopeo inspect --raw oci:{}:three",
        layout.display()
    )))
    .unwrap();
    let layers: Vec<String> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(layers.len(), 4);
    let cached = blob_files(&env);
    assert_eq!(cached.keys().cloned().collect::<Vec<_>>(), {
        let mut l = layers.clone();
        l.sort();
        l
    });

    step("prune with every layer used frees nothing");
    let v: serde_json::Value = serde_json::from_str(&env.cli_ok(&["image", "prune", "-o", "json"])).unwrap();
    assert_eq!(v["freed_bytes"], 0, "{v}");
    assert_eq!(blob_files(&env), cached);

    step("three's last tag removed: prune frees its own layers, the shared one stays");
    let also = "hothree";
    env.cli_ok(&["image", "pull", "127.0.0.1:5077/three:1", "--name", also]);
    env.cli_ok(&["-y", "image", "rm", "127.0.0.1:5077/three:1"]);
    assert_eq!(
        blob_files(&env),
        cached,
        "a tag left: the image and its layers stay"
    );
    let v: serde_json::Value = serde_json::from_str(&env.cli_ok(&["image", "prune", "-o", "json"])).unwrap();
    assert_eq!(v["freed_bytes"], 0, "{v}");
    env.cli_ok(&["-y", "image", "rm", also]);
    assert!(
        find(also).is_none() && !ext4(&env, &three).exists(),
        "the image is gone"
    );
    let own: u64 = layers[1..].iter().map(|d| cached[d]).sum();
    let v: serde_json::Value = serde_json::from_str(&env.cli_ok(&["image", "prune", "-o", "json"])).unwrap();
    assert_eq!(v["freed_bytes"], own, "the bytes of three's own layers: {v}");
    let left = blob_files(&env);
    assert_eq!(left.keys().collect::<Vec<_>>(), [&layers[0]], "web's layer stays");
    for d in &layers[1..] {
        let hex = d.strip_prefix("sha256:").unwrap();
        assert!(!env.dir.join("data/images/blobs/sha256").join(hex).exists());
    }
    let locks: Vec<String> = std::fs::read_dir(env.dir.join("data/images/blobs/locks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(locks, ["cache.lock"], "prune leaves no digest lock file");
    let text = env.cli_ok(&["image", "prune"]);
    assert!(text.contains("0 MiB of unused layers removed"), "{text}");

    step("an oci-archive made by skopeo imports; its layers cached again");
    let archive = work.join("three-oci.tar");
    sh(&format!(
        "skopeo copy --quiet oci:{}:three oci-archive:{}:hoarch:1",
        layout.display(),
        archive.display()
    ));
    let out = env.cli_ok(&["image", "import", archive.to_str().unwrap()]);
    assert!(out.contains("docker.io/library/hoarch:1"), "{out}");
    let imported = find("docker.io/library/hoarch:1").expect("imported listed");
    assert_eq!(
        imported["oci"]["digest"], three["oci"]["digest"],
        "the same manifest"
    );
    let file = ext4(&env, &imported);
    let o = run(&["debugfs", "-R", "stat /data/hard", file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Links: 2"));
    assert_eq!(blob_files(&env), cached, "all four layers back");
    let before = store_files(&env);
    let bad = work.join("truncated.tar");
    let bytes = std::fs::read(&archive).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let e = env.cli_err(&["image", "import", bad.to_str().unwrap()]);
    eprintln!("refusal: {e}");
    assert!(e.contains(bad.to_str().unwrap()), "{e}");
    assert_eq!(store_files(&env), before, "nothing kept by the refused import");
}
