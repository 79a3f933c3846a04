//! The delivery spool's cursor is held with an OS file lock: two `mltap serve`
//! processes sharing an output dir (two containers on one volume, both pid 1 in
//! their own PID namespace) do not both deliver from it. The second one keeps
//! serving and reports its delivery as not running.

mod hardening_support;
mod support;

use hardening_support::{get, Serve, ServeOptions};
use std::time::Duration;
use support::fake_tfserving::FakeTfServing;

#[tokio::test]
async fn two_processes_both_pid_1_on_one_spool_do_not_both_deliver() {
    let fake = FakeTfServing::start().await;
    let anodot = hardening_support::free_port();
    let anodot_url = format!("http://{anodot}");
    let out = tempfile::tempdir().unwrap();
    let start = |config: &'static str| {
        let mut options = ServeOptions::new(fake.grpc_url(), fake.rest_url(), out.path());
        options.args = vec!["--anodot-url", &anodot_url];
        options.env = vec![("ANODOT_TOKEN", "tok")];
        options.config = Some(config);
        // Each is pid 1 in a PID namespace of its own, as in a container.
        options.wrapper = vec!["unshare", "--pid", "--fork", "--kill-child"];
        Serve::start(options)
    };
    let first = start("").await;
    let lock = out.path().join("delivery/lock");
    for _ in 0..50 {
        if std::fs::read_to_string(&lock).is_ok_and(|holder| holder.starts_with("pid 1 ")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let holder = std::fs::read_to_string(&lock).expect("the first process holds the lock");
    assert!(holder.starts_with("pid 1 "), "{holder}");

    let mut second = start("").await;
    // The second serves, and says its delivery does not run and why.
    let mut ready = String::new();
    for _ in 0..50 {
        let (status, body) = get(format!("{}/readyz", second.admin_url())).await;
        assert_eq!(status, 200, "{body}");
        ready = body;
        if ready.contains("anodot delivery") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready.contains("monitoring: degraded") && ready.contains("another mltap process (pid 1 "), "{ready}");
    let (status, first_ready) = get(format!("{}/readyz", first.admin_url())).await;
    assert_eq!(status, 200);
    assert!(!first_ready.contains("anodot delivery"), "{first_ready}");
    let stderr = second.stderr().await;
    assert!(stderr.contains("Anodot delivery cannot start"), "{stderr}");

    // Once the first is gone, the lock is free again (the kernel released it).
    drop(first);
    let file = std::fs::OpenOptions::new().write(true).open(&lock).unwrap();
    let mut free = false;
    for _ in 0..50 {
        if file.try_lock().is_ok() {
            free = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(free, "the lock goes with its process");
}
