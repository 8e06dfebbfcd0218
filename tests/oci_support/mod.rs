//! Shared by the OCI tests: Debian's `docker-registry` in the test's namespace, images built with
//! `umoci` from the host's static busybox, pushed with `skopeo`, and the store as `image list` shows it.
#![allow(dead_code)]

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `docker-registry` serving `dir` on `addr` inside namespace `ns`; killed on drop.
pub struct Registry {
    child: Child,
}

impl Registry {
    pub fn start(ns: &str, dir: &Path, name: &str, addr: &str, htpasswd: Option<&Path>) -> Registry {
        let auth = htpasswd.map_or(String::new(), |p| {
            format!("auth:\n  htpasswd:\n    realm: soci\n    path: {}\n", p.display())
        });
        let cfg = dir.join(format!("{name}.yml"));
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{auth}",
                dir.join(name).display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "docker-registry", "serve"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let url = format!("http://{addr}/v2/");
        poll("the registry", Duration::from_secs(30), || {
            let o = run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &url,
            ]);
            let code = String::from_utf8_lossy(&o.stdout).into_owned();
            (code == "200" || code == "401").then_some(())
        });
        Registry { child }
    }

    /// [`Registry::start`] asking for basic credentials: `user` with `password` (bcrypt in an
    /// htpasswd file, as the registry wants it).
    pub fn with_login(ns: &str, dir: &Path, name: &str, addr: &str, user: &str, password: &str) -> Registry {
        let hash = sh(&format!(
            "/usr/bin/python3 -W ignore -c \"import crypt; print(crypt.crypt('{password}', crypt.mksalt(crypt.METHOD_BLOWFISH)))\""
        ));
        let htpasswd = dir.join(format!("{name}.htpasswd"));
        std::fs::write(&htpasswd, format!("{user}:{}", hash.trim())).unwrap();
        Registry::start(ns, dir, name, addr, Some(&htpasswd))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sh(cmd: &str) -> String {
    let o = run(&["sh", "-c", cmd]);
    assert!(
        o.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// An OCI layout at `dir/layout` with `web` (one layer: busybox serving /www on 8080, with an
/// `/etc/hosts` and `/etc/resolv.conf` of its own that sistemo's must replace) and
/// `three` (web plus three layers: a whiteout, an opaque directory, a hard link, a file
/// capability, owners and modes).
pub fn build_layout(dir: &Path) -> PathBuf {
    let l = dir.join("layout");
    let b = dir.join("bundle");
    let (l, b) = (l.display().to_string(), b.display().to_string());
    sh(&format!(
        "umoci init --layout {l} && umoci new --image {l}:web && umoci unpack --image {l}:web {b} && \
         mkdir -p {b}/rootfs/bin {b}/rootfs/www {b}/rootfs/etc && cp /bin/busybox {b}/rootfs/bin/ && \
         ln -s busybox {b}/rootfs/bin/sh && echo 'hello from an OCI image' > {b}/rootfs/www/index.html && \
         echo 'root:x:0:0:root:/root:/bin/sh' > {b}/rootfs/etc/passwd && \
         echo '10.9.9.9 image-hosts' > {b}/rootfs/etc/hosts && \
         echo 'nameserver 10.9.9.9' > {b}/rootfs/etc/resolv.conf && \
         umoci repack --image {l}:web {b} && rm -rf {b} && \
         umoci config --image {l}:web --config.entrypoint /bin/busybox --config.cmd httpd \
           --config.cmd -f --config.cmd -vv --config.cmd -p --config.cmd 8080 --config.cmd -h --config.cmd /www \
           --config.exposedports 8080/tcp --config.env PATH=/bin --config.workingdir /www"
    ));
    // Layer 2 and 3 on top of web.
    sh(&format!(
        "umoci tag --image {l}:web three && umoci unpack --image {l}:three {b} && r={b}/rootfs && \
         mkdir -p $r/data $r/opq/lowerdir && echo gone > $r/data/gone && echo 1 > $r/opq/lower1 && \
         echo 1 > $r/opq/lowerdir/f && echo owned > $r/etc/owned && chown 1234:5678 $r/etc/owned && \
         chmod 640 $r/etc/owned && cp /bin/busybox $r/bin/suid && chmod 4755 $r/bin/suid && \
         umoci repack --image {l}:three {b} && rm -rf {b} && \
         umoci unpack --image {l}:three {b} && r={b}/rootfs && rm $r/data/gone && \
         echo linked > $r/data/hard && ln $r/data/hard $r/data/hard2 && \
         printf '#!/bin/sh\\necho cap\\n' > $r/bin/capped && chmod 755 $r/bin/capped && \
         setcap cap_net_bind_service+ep $r/bin/capped && \
         umoci repack --image {l}:three {b} && rm -rf {b}"
    ));
    // Layer 3: an opaque directory, written with Python's tarfile (umoci writes whiteouts one
    // by one), added as a raw layer.
    let tar = dir.join("opaque.tar");
    sh(&format!(
        "/usr/bin/python3 - <<'EOF'\nimport tarfile, io\nt = tarfile.open('{}', 'w')\nfor name, data in [('opq/.wh..wh..opq', b''), ('opq/new', b'new\\n')]:\n    i = tarfile.TarInfo(name); i.size = len(data); i.mode = 0o644\n    t.addfile(i, io.BytesIO(data))\nt.close()\nEOF\numoci raw add-layer --image {l}:three {}",
        tar.display(),
        tar.display()
    ));
    PathBuf::from(l)
}

pub fn push(env: &Env, layout: &Path, tag: &str, dest: &str) {
    let o = env.sh(&format!(
        "skopeo copy --quiet --dest-tls-verify=false --dest-creds soci:sociPW oci:{}:{tag} docker://{dest}",
        layout.display()
    ));
    assert!(
        o.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn images(env: &Env) -> Vec<serde_json::Value> {
    serde_json::from_str(&env.cli_ok(&["image", "list", "-o", "json"])).unwrap()
}
