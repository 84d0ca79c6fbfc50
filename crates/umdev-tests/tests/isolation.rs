#![allow(clippy::unwrap_used)]
//! Worker isolation (`isolation = "worker"`) through a real daemon and devices created by
//! sysfs `create`: each group in a process of its own, a child of the daemon, serving the
//! device's socket; killing one worker with SIGKILL while clients use devices in two groups
//! leaves the other group's client answered throughout, the daemon restarts the worker and
//! the killed group's device takes a new client; removing a device ends its worker and the
//! daemon's stop leaves no worker behind.

mod mdev;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mdev::{new_uuid, ppid, workers, Daemon};
use umdev_client::Client;
use umdev_tests::device::reg;
use umdev_tests::drivers::ATTR_TRAPPED_BAR2;

const CONFIG: &str = r#"
isolation = "worker"
release_timeout_ms = 300

[[parent]]
name = "test0"
driver = "umdevtest"
options = { pool = 2 }

[[parent]]
name = "mtty0"
driver = "mtty"
options = { ports = 2, console = "none" }

[[parent]]
name = "p2p0"
driver = "mtty"
options = { ports = 3, console = "none", peer_to_peer = true }
"#;

fn connect(socket: &Path) -> (Client, u32) {
    umdev_tests::connect_served(socket).unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_worker_takes_down_only_its_group_and_comes_back() {
    let mut d = Daemon::start_test_daemon(CONFIG);
    let daemon = d.child.as_ref().unwrap().id();
    let (a, b) = (new_uuid(), new_uuid());
    d.create("test0", "umdevtest-plain", &a).unwrap();
    d.create("mtty0", "mtty-1", &b).unwrap();
    let (mut ca, pa) = connect(&d.socket(&a));
    let (mut cb, pb) = connect(&d.socket(&b));
    assert_ne!(pa, pb, "two groups, two processes");
    assert!(
        pa != daemon && pb != daemon,
        "no device is served by the daemon"
    );
    assert_eq!(workers(daemon), {
        let mut v = vec![pa, pb];
        v.sort_unstable();
        v
    });
    let state = |u: &str| {
        std::fs::read_to_string(d.mdev_dir(u).join("state"))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!((state(&a), state(&b)), ("running".into(), "running".into()));
    // Vendor attributes come from the worker through the daemon's tree.
    let attr_path = d.mdev_dir(&a).join(ATTR_TRAPPED_BAR2);
    let attr = || std::fs::read_to_string(&attr_path).unwrap();
    assert_eq!(attr().trim(), "0");

    // Device a's client keeps asking while b's worker is killed.
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let hammer = std::thread::spawn(move || {
        let (mut n, mut worst) = (0u64, Duration::ZERO);
        while !s.load(Ordering::Relaxed) {
            let t = Instant::now();
            ca.region_write(0, 0, &n.to_le_bytes()).unwrap();
            let mut back = [0u8; 8];
            ca.region_read(0, 0, &mut back).unwrap();
            assert_eq!(back, n.to_le_bytes(), "request {n}");
            worst = worst.max(t.elapsed());
            n += 1;
        }
        (n, worst, ca)
    });
    std::thread::sleep(Duration::from_millis(200));
    let killed_at = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(pb).unwrap()).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    // b's client finds its server gone; the tree says so until it is back (the worker is
    // started again 100 ms after its death, so the state can be read in between).
    assert!(cb.device_info().is_err(), "a killed worker still answered");
    wait_until("the tree never said b's worker died", || {
        state(&b) == "worker-died"
    });
    // The daemon starts b's worker again: a new client gets the device.
    let mut back = None;
    wait_until("b never took a new client", || {
        back = umdev_tests::connect_served(&d.socket(&b)).ok();
        back.is_some()
    });
    let restarted = killed_at.elapsed();
    wait_until("b's state never came back to running", || {
        state(&b) == "running"
    });
    assert_eq!(state(&a), "running");
    let (mut cb2, pb2) = back.unwrap();
    assert_ne!(pb2, pb);
    assert_eq!(ppid(pb2), Some(daemon), "the daemon started it");
    assert_eq!(cb2.device_info().unwrap().num_regions, 9);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (n, worst, mut ca) = hammer.join().unwrap();
    assert!(n > 0);
    eprintln!(
        "group a: {n} write+read pairs across the kill, slowest {worst:?}; b served again after {restarted:?}"
    );
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none());
    assert!(ca.device_info().is_ok());
    assert_eq!(attr().trim(), "0");
    drop(cb2);

    // Removing b ends its worker; a stop that removes every device ends a's (a plain
    // SIGTERM would leave it serving: see below).
    std::fs::write(d.mdev_dir(&b).join("remove"), "1\n").unwrap();
    wait_until("b's worker outlived its device", || ppid(pb2).is_none());
    assert_eq!(workers(daemon), vec![pa]);
    drop(ca);
    let o = d.umdevctl(&["shutdown", "--remove-devices"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let status = d.child.as_mut().unwrap().wait().unwrap();
    assert!(status.success(), "{status}");
    wait_until("a worker outlived the daemon", || {
        std::fs::metadata(format!("/proc/{pa}")).is_err() || ppid(pa).is_none()
    });
}

#[test]
fn devices_that_share_a_group_share_a_worker() {
    let d = Daemon::start_test_daemon(CONFIG);
    let daemon = d.child.as_ref().unwrap().id();
    let (a, b, c) = (new_uuid(), new_uuid(), new_uuid());
    for u in [&a, &b, &c] {
        d.create("p2p0", "mtty-1", u).unwrap();
    }
    let p2p = |u: &str| d.mdev_dir(u).join("peer_to_peer_resource_uuid");
    let server = |u: &str| connect(&d.socket(u)).1;
    // A group moves only while nobody holds it: the probing clients above let go when
    // their sessions end, a moment after they close.
    let set_p2p = |u: &str, value: &str| {
        wait_until("a group stayed held", || {
            match std::fs::write(p2p(u), value) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(16) => false,
                Err(e) => panic!("{e}"),
            }
        });
    };
    let (sa, sb, sc) = (server(&a), server(&b), server(&c));
    assert!(
        sa != sb && sb != sc && sa != sc,
        "three groups, three workers"
    );
    // b joins a's group: the group gets a worker sealed for both (a sealed worker can
    // open nothing new), and the two old workers end.
    let resource = std::fs::read_to_string(p2p(&a)).unwrap();
    set_p2p(&b, &resource);
    let ab = server(&a);
    assert_eq!(server(&b), ab);
    assert!(ab != sa && ab != sb);
    wait_until("an old worker outlived its group", || {
        ppid(sa).is_none() && ppid(sb).is_none()
    });
    let group = |u: &str| std::fs::read_link(d.mdev_dir(u).join("iommu_group")).unwrap();
    assert_eq!(group(&a), group(&b));
    // c joins too (a new worker for the three), then leaves for a group of its own: a new
    // worker for c, the others stay where they are.
    set_p2p(&c, &resource);
    let abc = server(&c);
    assert_eq!((server(&a), server(&b)), (abc, abc));
    wait_until("c's old worker outlived its group", || ppid(sc).is_none());
    assert_eq!(workers(daemon), vec![abc]);
    set_p2p(&c, &format!("{}\n", new_uuid()));
    let c_alone = server(&c);
    assert!(c_alone != abc);
    assert_eq!(server(&a), abc);
    assert_eq!(workers(daemon).len(), 2);
    // While a client holds a (the worker asked the daemon's group rules when it opened),
    // its group cannot change.
    let (_held, _) = connect(&d.socket(&a));
    std::thread::sleep(Duration::from_millis(100));
    let e = std::fs::write(p2p(&b), format!("{}\n", new_uuid())).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(16), "EBUSY: {e}");
}

#[test]
fn the_sandbox_refuses_opens_and_kills_exec_and_stray_system_calls() {
    // The sandbox as a production daemon has it by default, written out.
    let d = Daemon::start_test_daemon(&format!(
        "sandbox = {{ enabled = true, on_violation = \"kill\" }}\n{CONFIG}"
    ));
    let (a, b) = (new_uuid(), new_uuid());
    d.create("test0", "umdevtest-plain", &a).unwrap();
    d.create("mtty0", "mtty-1", &b).unwrap();
    let (mut other, other_pid) = connect(&d.socket(&b));
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, "not for devices").unwrap();
    let marker = outside.path().join("exec-ran");
    // Tells device a to misbehave with `path`; what it got, or None if its worker died.
    let misbehave = |c: &mut Client, cmd: u32, path: &Path| -> Option<u32> {
        let mut p = path.display().to_string().into_bytes();
        p.push(0);
        c.region_write(0, 0, &p).ok()?;
        c.region_write(0, reg::MISBEHAVE, &cmd.to_le_bytes()).ok()?;
        let mut got = [0u8; 4];
        c.region_read(0, reg::MISBEHAVE_RESULT, &mut got).ok()?;
        Some(u32::from_le_bytes(got))
    };
    let (mut ca, pa) = connect(&d.socket(&a));
    // Opening a file outside its rules: refused, and the worker goes on.
    assert_eq!(
        misbehave(&mut ca, 1, &secret),
        Some(13),
        "EACCES from Landlock"
    );
    assert!(ca.device_info().is_ok());
    assert!(ppid(pa).is_some(), "the worker lives on");
    drop(ca);
    // Running a program, and a system call outside the filter: the worker is killed.
    for (cmd, what) in [(2, "exec"), (3, "a stray system call")] {
        let (mut ca, pa) = wait_for_client(&d, &a);
        assert_eq!(
            misbehave(&mut ca, cmd, &marker),
            None,
            "{what}: the worker lived"
        );
        wait_until("the worker outlived its misbehaviour", || {
            ppid(pa).is_none()
        });
        // The other group never noticed; the daemon serves a again.
        assert_eq!(other.device_info().unwrap().num_regions, 9, "{what}");
        let (_c, again) = wait_for_client(&d, &a);
        assert_ne!(again, pa, "{what}: a new worker");
    }
    assert!(!marker.exists(), "the exec'd program ran");
    let daemon = d.child.as_ref().unwrap().id();
    assert_eq!(
        ppid(other_pid),
        Some(daemon),
        "b's worker was never restarted"
    );
    assert!(other.device_info().is_ok());
}

/// A client of `uuid`'s device once its worker takes one (it may be restarting).
fn wait_for_client(d: &Daemon, uuid: &str) -> (Client, u32) {
    let mut got = None;
    wait_until("the device never took a client", || {
        got = umdev_tests::connect_served(&d.socket(uuid)).ok();
        got.is_some()
    });
    got.unwrap()
}

#[test]
fn workers_outlive_a_killed_daemon_and_the_next_one_adopts_them() {
    outlive_and_adopt(rustix::process::Signal::KILL);
}

#[test]
fn workers_outlive_a_stopped_daemon_and_the_next_one_adopts_them() {
    outlive_and_adopt(rustix::process::Signal::TERM);
}

/// The daemon goes by `signal` while a client holds a device; its workers serve on and the
/// next daemon adopts them.
fn outlive_and_adopt(signal: rustix::process::Signal) {
    let mut d = Daemon::start_test_daemon(CONFIG);
    let (a, b) = (new_uuid(), new_uuid());
    d.create("test0", "umdevtest-plain", &a).unwrap();
    d.create("mtty0", "mtty-1", &b).unwrap();
    let (mut ca, pa) = connect(&d.socket(&a));
    let written = [0xa5u8, 1, 2, 3, 4, 5, 6, 7];
    ca.region_write(0, 0x10, &written).unwrap();
    let pb = {
        let (_cb, pb) = connect(&d.socket(&b));
        pb
    };
    let me = std::process::id();
    let groups = |d: &Daemon| {
        let o = d.umdevctl(&["groups"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let before = groups(&d);
    assert!(before.contains(&format!("held by pid {me} ")), "{before}");

    // The daemon goes.
    let mut old = d.child.take().unwrap();
    rustix::process::kill_process(rustix::process::Pid::from_child(&old), signal).unwrap();
    let status = old.wait().unwrap();
    if signal == rustix::process::Signal::TERM {
        assert!(status.success(), "{status}");
        assert!(
            std::fs::read_dir(d.sys()).unwrap().next().is_none(),
            "a stopped daemon unmounts its tree"
        );
    }
    // Its workers serve on: a's client keeps its connection and its device's state, and
    // b, which nobody holds, takes a client.
    let mut back = [0u8; 8];
    ca.region_read(0, 0x10, &mut back).unwrap();
    assert_eq!(back, written);
    let (cb, pb_now) = connect(&d.socket(&b));
    assert_eq!(pb_now, pb);
    drop(cb);

    // The next daemon adopts them: the same processes, the tree and the group rules back.
    d.spawn();
    assert!(d.mdev_dir(&a).exists() && d.mdev_dir(&b).exists());
    let state = |u: &str| std::fs::read_to_string(d.mdev_dir(u).join("state")).unwrap();
    assert_eq!((state(&a).trim(), state(&b).trim()), ("running", "running"));
    let after = groups(&d);
    assert!(
        after.contains(&format!("held by pid {me} ")),
        "the client's hold came back: {after}"
    );
    assert!(after.contains(&a) && after.contains(&b), "{after}");
    ca.region_read(0, 0x10, &mut back).unwrap();
    assert_eq!(back, written, "the same connection, the same device");
    assert_eq!(
        connect(&d.socket(&b)).1,
        pb,
        "b is served by the same worker"
    );
    let attr = std::fs::read_to_string(d.mdev_dir(&a).join(ATTR_TRAPPED_BAR2)).unwrap();
    assert_eq!(
        attr.trim(),
        "0",
        "vendor attributes through the adopted worker"
    );
    // The new daemon drives them: removing a (its client gone) ends its worker.
    drop(ca);
    std::thread::sleep(Duration::from_millis(100));
    std::fs::write(d.mdev_dir(&a).join("remove"), "1\n").unwrap();
    wait_until("a's adopted worker outlived its device", || {
        std::fs::metadata(format!("/proc/{pa}")).is_err() || ppid(pa).is_none()
    });
}

/// A client's locked-memory budget is one budget over every worker it uses: pins in two
/// groups (two processes) count together, and what one unpins the other may pin.
#[test]
fn a_clients_pins_in_two_workers_share_one_budget() {
    use umdev_tests::cmd;
    let d = Daemon::start_test_daemon(CONFIG);
    // A budget of 16 pages: the daemon's RLIMIT_MEMLOCK, which its workers get.
    let pages16 = rustix::process::Rlimit {
        current: Some(16 * 4096),
        maximum: Some(16 * 4096),
    };
    let daemon = rustix::process::Pid::from_child(d.child.as_ref().unwrap());
    rustix::process::prlimit(Some(daemon), rustix::process::Resource::Memlock, pages16).unwrap();
    let (a, c) = (new_uuid(), new_uuid());
    d.create("test0", "umdevtest-plain", &a).unwrap();
    d.create("test0", "umdevtest-plain", &c).unwrap();
    let (mut ca, pa) = connect(&d.socket(&a));
    let (mut cc, pc) = connect(&d.socket(&c));
    assert_ne!(pa, pc, "two groups, two workers");
    const BASE: u64 = 0x10_0000;
    let _ma = cmd::map_memfd(&mut ca, BASE, 1 << 20, true);
    let _mc = cmd::map_memfd(&mut cc, BASE, 1 << 20, true);
    let (enomem, ok) = (12, 0);
    assert_eq!(
        cmd::pin(&mut ca, BASE, 12, 3),
        ok,
        "12 of 16 pages in a's worker"
    );
    assert_eq!(
        cmd::pin(&mut cc, BASE, 8, 3),
        enomem,
        "8 more in c's worker pass the client's 16"
    );
    assert_eq!(cmd::pin(&mut cc, BASE, 4, 3), ok, "4 more fit");
    assert_eq!(cmd::unpin(&mut ca, BASE, 12), ok);
    assert_eq!(
        cmd::pin(&mut cc, BASE + 4 * 4096, 12, 3),
        ok,
        "what a's worker gave back, c's may take"
    );
    // A worker that dies gives its client's pages back.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(pc).unwrap()).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    drop(cc);
    // Once the daemon has seen it die (it serves c from a new worker after that).
    wait_until("c was never served again", || {
        umdev_tests::connect_served(&d.socket(&c)).is_ok_and(|(_, p)| p != pc)
    });
    assert_eq!(cmd::pin(&mut ca, BASE, 16, 3), ok, "all 16 free again");
}

/// The daemon dies, then the worker it left serving dies too (nobody is there to start it
/// again): the next daemon starts the device again from its record, in a new worker.
#[test]
fn a_device_whose_worker_and_daemon_both_died_is_started_again() {
    let mut d = Daemon::start_test_daemon(CONFIG);
    let a = new_uuid();
    d.create("test0", "umdevtest-plain", &a).unwrap();
    let (_c, pid) = connect(&d.socket(&a));
    d.kill();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    wait_until("the worker outlived SIGKILL", || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
    });
    d.spawn();
    assert!(d.mdev_dir(&a).exists(), "the device was lost");
    let state = std::fs::read_to_string(d.mdev_dir(&a).join("state")).unwrap();
    assert_eq!(state.trim(), "running");
    let (mut c, now) = connect(&d.socket(&a));
    assert_ne!(now, pid);
    c.device_info().unwrap();
}

/// Where a CPU cgroup for a test can go: cgroup v2's root if it offers the cpu controller,
/// else cgroup v1's cpu hierarchy; and the name of the weight file there.
fn cpu_cgroup_root() -> Option<(std::path::PathBuf, &'static str)> {
    let v2 = Path::new("/sys/fs/cgroup");
    if std::fs::read_to_string(v2.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu"))
    {
        return Some((v2.to_owned(), "cpu.weight"));
    }
    let v1 = Path::new("/sys/fs/cgroup/cpu");
    v1.join("cpu.shares")
        .exists()
        .then(|| (v1.to_owned(), "cpu.shares"))
}

/// `[cgroup]` with a path that is no cgroup: the daemon refuses to start, saying why.
#[test]
fn a_cgroup_path_without_the_cpu_controller_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = Daemon::test_daemon_refuses(&format!(
        "isolation = \"worker\"\n[cgroup]\npath = \"{}\"\n{}",
        dir.path().join("cg").display(),
        mdev::TEST_PARENT
    ));
    assert!(
        err.contains("not a cgroup with the cpu controller"),
        "{err}"
    );
}

/// `[cgroup]`: each worker in a CPU cgroup of its own, with its parent's weight (or the
/// default); a restarted worker gets a new one and the dead one's goes; a removed device's
/// worker leaves none behind.
#[test]
fn each_worker_runs_in_a_cpu_cgroup_with_its_parents_weight() {
    let Some((base, file)) = cpu_cgroup_root() else {
        // Said loudly: the refusal test above still runs.
        eprintln!("NOT RUN: no writable cpu cgroup controller on this machine");
        return;
    };
    let root = base.join(format!("umdev-test-{}", &new_uuid()[..8]));
    let config = format!(
        "isolation = \"worker\"\n[cgroup]\npath = \"{}\"\ncpu_weight = 50\n\n\
         [[parent]]\nname = \"test0\"\ndriver = \"umdevtest\"\noptions = {{ pool = 2 }}\n\
         cpu_weight = 400\n\n[[parent]]\nname = \"test1\"\ndriver = \"umdevtest\"\n\
         options = {{ pool = 2 }}\n",
        root.display()
    );
    // The kernel's values: v2 takes the weight, v1 `weight * 1024 / 100` shares.
    let value = |w: u32| {
        if file == "cpu.weight" {
            w
        } else {
            w * 1024 / 100
        }
    };
    let d = Daemon::start_test_daemon(&config);
    let (a, b) = (new_uuid(), new_uuid());
    d.create("test0", "umdevtest-plain", &a).unwrap();
    d.create("test1", "umdevtest-plain", &b).unwrap();
    let (ca, pa) = connect(&d.socket(&a));
    let (cb, pb) = connect(&d.socket(&b));
    let weight = |pid: u32| -> u32 {
        let dir = root.join(format!("w{pid}"));
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "worker {pid} is not in {}: {procs}",
            dir.display()
        );
        std::fs::read_to_string(dir.join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(weight(pa), value(400));
    assert_eq!(weight(pb), value(50));
    // A worker killed and started again: a new cgroup, the old one removed.
    drop(ca);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(pa).unwrap()).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let (ca, pa2) = wait_for_client(&d, &a);
    assert_ne!(pa, pa2);
    assert_eq!(weight(pa2), value(400));
    wait_until("the dead worker's cgroup is removed", || {
        !root.join(format!("w{pa}")).exists()
    });
    // Removing the devices ends their workers and their cgroups go.
    drop((ca, cb));
    d.remove(&a).unwrap();
    d.remove(&b).unwrap();
    let left = || -> Vec<std::ffi::OsString> {
        std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name())
            .collect()
    };
    wait_until("the workers' cgroups are removed", || left().is_empty());
    drop(d);
    let left = left();
    let _ = std::fs::remove_dir(&root);
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}
