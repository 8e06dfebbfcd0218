//! Host-hardening cases of the machine service with the fakes: a deploy failing after boot
//! stops its VMM and removes its rules, CPU caps, the start-up sweep, and restarts that never
//! hold up the liveness pass.

use super::*;

#[tokio::test]
async fn deploy_failing_in_the_wait_after_boot_stops_its_vmm_and_removes_its_rules() {
    let r = rig().await;
    *r.vmm.fail.lock().unwrap() = Fail::Init;
    let mut d = web(&["28106:80"]);
    d.wait = crate::domain::WaitFor::Init;
    let e = r.deploy(d).await.unwrap_err();
    assert!(crate::error::chain(&e).contains("fake"), "{e}");
    r.assert_nothing_left();
}

#[tokio::test]
async fn a_cpu_limit_is_stored_and_one_over_the_vcpus_is_refused_leaving_nothing() {
    let r = rig().await;
    let mut d = web(&["28107:80"]);
    d.vcpus = Some(1);
    d.cpu_limit = Some("1.5".parse().unwrap());
    let e = r.deploy(d).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(
        e.to_string().contains("cpu limit 1.5") && e.to_string().contains("up to 1"),
        "{e}"
    );
    r.assert_nothing_left();
    let mut d = web(&[]);
    d.vcpus = Some(2);
    d.cpu_limit = Some("0.5".parse().unwrap());
    let v = r.deploy(d).await.unwrap();
    assert_eq!(v.machine.cpu_limit.map(|c| c.milli()), Some(500));
    assert_eq!(
        *r.vmm.started_cpu_limit.lock().unwrap(),
        500,
        "the VMM started with the cap"
    );
    let spec = r.host.machines.spec_of(&v.machine).unwrap();
    assert_eq!(spec.cpu_limit_milli, 500, "and starts with it again");
}

#[tokio::test]
async fn start_up_sweeps_links_and_scratch_folders_no_row_owns() {
    let r = rig().await;
    let v = r.deploy(web(&[])).await.unwrap();
    let own = crate::net::host_ifname(&v.machine.id);
    // A crash left a TAP on our bridge and a build's scratch folder; another daemon in this
    // namespace has a machine link on its own bridge.
    r.links.links.lock().unwrap().insert("sm0123456789".into());
    r.links.foreign.lock().unwrap().insert("smabcdefabcd".into());
    let images = r.dir.join("images");
    std::fs::create_dir_all(images.join(".build-1-x/root")).unwrap();
    std::fs::create_dir_all(images.join(".upload-2-y")).unwrap();
    std::fs::write(images.join("kept.ext4"), b"image").unwrap();
    r.host.machines.readopt().await.unwrap();
    let links = r.links.links.lock().unwrap().clone();
    assert!(
        !links.contains("sm0123456789"),
        "the stray TAP is deleted: {links:?}"
    );
    assert!(links.contains(&own), "the running machine's TAP stays");
    assert!(
        r.links.foreign.lock().unwrap().contains("smabcdefabcd"),
        "another daemon's link stays"
    );
    let left: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["kept.ext4"]);
}

#[tokio::test]
async fn a_slow_restart_does_not_delay_noticing_another_death() {
    let r = rig().await;
    let mut d = web(&[]);
    d.restart = RestartPolicy::Always;
    let a = r.deploy(d).await.unwrap();
    let mut d = web(&[]);
    d.name = Some("other".parse().unwrap());
    let b = r.deploy(d).await.unwrap();
    kill_vmm(&r, a.machine.id);
    assert_eq!(r.host.machines.reap_dead().await.unwrap(), 1);
    // web's restart falls due after 1 s and its boot hangs (held by the fake); the liveness
    // pass never runs it: past the back-off it still answers at once, web still down
    r.vmm.hold_start.store(true, Ordering::SeqCst);
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        tokio::time::timeout(Duration::from_secs(1), r.host.machines.reap_dead())
            .await
            .expect("the liveness pass ran a restart's boot")
            .unwrap();
        assert_eq!(
            r.host.machines.get("web").unwrap().machine.state,
            MachineState::Error
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let host = r.host.clone();
    let restart = tokio::spawn(async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while host.machines.get("web").unwrap().machine.state != MachineState::Running {
            assert!(std::time::Instant::now() < deadline, "never restarted");
            host.machines.restart_due().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while r.host.machines.get("web").unwrap().machine.state != MachineState::Starting {
        assert!(std::time::Instant::now() < deadline, "the restart never began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // while it boots, another machine dies: the liveness pass notices it at once
    kill_vmm(&r, b.machine.id);
    let n = tokio::time::timeout(Duration::from_secs(1), r.host.machines.reap_dead())
        .await
        .expect("the liveness pass waited for a restart's boot")
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(
        r.host.machines.get("other").unwrap().machine.state,
        MachineState::Error
    );
    r.vmm.hold_start.store(false, Ordering::SeqCst);
    r.vmm.release_start.notify_waiters();
    restart.await.unwrap();
}
