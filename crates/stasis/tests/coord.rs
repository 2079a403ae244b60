//! The multi-node coordinator (issue #13, first phase) with simulated agents: real
//! `stasis coordinator`, `stasis agent --simulate` and `stasis checkpoint --coordinator`
//! processes over real TCP sockets on this machine.
//!
//! * A global checkpoint is published with one part per agent, then another, then one
//!   with `--kill` (every agent exits 75).
//! * An agent killed during freeze, and one killed during dump: the checkpoint is
//!   abandoned, nothing is published, the previous one stays the newest, the other
//!   agents resume and the next checkpoint succeeds without the dead one.
//! * An agent that does not answer within the coordinator's timeout, and one whose dump
//!   fails: likewise, and the late one resumes when it gets the abort.
//! * An agent speaking another protocol version is refused with a clear error.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

struct Coord {
    proc: Proc,
    addr: String,
}

/// Starts `stasis coordinator` on a free loopback port, checkpoints in w.ck.
fn coordinator(w: &Work, timeout: &str) -> Coord {
    let cmd = w.stasis_cmd(&[
        "coordinator".as_ref(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--dir".as_ref(),
        w.ck.as_os_str(),
        "--timeout".as_ref(),
        timeout.as_ref(),
    ]);
    let mut proc = w.spawn("coordinator", cmd, Stdio::null());
    let t0 = Instant::now();
    let addr = loop {
        // Complete lines only: the address is known once its line has ended.
        if let Some(a) = complete_lines(&proc.stderr())
            .iter()
            .find_map(|l| l.split("listening on ").nth(1))
            .and_then(|rest| rest.split(',').next())
        {
            break a.to_string();
        }
        assert!(proc.running(), "the coordinator exited\n{}", proc.diag());
        assert!(
            t0.elapsed() < T_CMD,
            "the coordinator did not start\n{}",
            proc.diag()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    Coord { proc, addr }
}

struct Agent {
    proc: Proc,
    state: PathBuf,
    node: String,
}

impl Agent {
    fn state(&self) -> String {
        std::fs::read_to_string(&self.state)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Waits until the simulated part's state is `want`.
    fn wait_state(&mut self, want: &str, timeout: Duration) {
        let t0 = Instant::now();
        while self.state() != want {
            if t0.elapsed() > timeout {
                let d = self.proc.diag();
                panic!(
                    "agent {} is {:?}, not {want:?} after {timeout:?}\n{d}",
                    self.node,
                    self.state()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Starts `stasis agent --simulate` as node `node`, with extra (hidden test) options,
/// and waits until the coordinator has taken it in.
fn agent(w: &Work, c: &Coord, node: &str, extra: &[&str]) -> Agent {
    let state = w.path(&format!("{node}.state"));
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "agent".as_ref(),
        "--coordinator".as_ref(),
        c.addr.as_ref(),
        "--node".as_ref(),
        node.as_ref(),
        "--simulate".as_ref(),
        "--simulate-state".as_ref(),
        state.as_os_str(),
    ];
    args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
    let mut proc = w.spawn(&format!("agent-{node}"), w.stasis_cmd(&args), Stdio::null());
    proc.wait_line_err("joined", T_CMD);
    Agent {
        proc,
        state,
        node: node.into(),
    }
}

trait ErrLine {
    fn wait_line_err(&mut self, what: &str, timeout: Duration);
}

impl ErrLine for Proc {
    /// Waits until stderr contains `what`.
    fn wait_line_err(&mut self, what: &str, timeout: Duration) {
        let t0 = Instant::now();
        while !self.stderr().contains(what) {
            if !self.running() || t0.elapsed() > timeout {
                let d = self.diag();
                panic!(
                    "{} did not say {what:?} (within {timeout:?})\n{d}",
                    self.label
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// `stasis checkpoint --coordinator ADDR [--kill]`, started (not waited for).
fn request(w: &Work, c: &Coord, kill: bool) -> Proc {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "checkpoint".as_ref(),
        "--coordinator".as_ref(),
        c.addr.as_ref(),
    ];
    if kill {
        args.push("--kill".as_ref());
    }
    w.spawn("checkpoint", w.stasis_cmd(&args), Stdio::null())
}

/// Entries of the checkpoint directory (sorted).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Checks that published checkpoint `name` holds one part per node of `nodes`, in order.
fn assert_parts(w: &Work, name: &str, nodes: &[&str]) {
    let dir = w.ck.join(name);
    let global: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("global.json")).unwrap()).unwrap();
    let parts = global["parts"].as_array().unwrap();
    assert_eq!(parts.len(), nodes.len(), "{global}");
    let mut listed: Vec<String> = entries(&dir);
    listed.retain(|e| e != "global.json");
    let want: Vec<String> = (0..nodes.len()).map(|k| format!("node-{k}")).collect();
    assert_eq!(listed, want, "parts of {name}");
    for (k, node) in nodes.iter().enumerate() {
        assert_eq!(parts[k]["node"], *node, "{global}");
        let part: serde_json::Value = serde_json::from_str(
            std::fs::read_to_string(dir.join(format!("node-{k}/part.json")))
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(part["node"], *node);
        assert_eq!(part["checkpoint"], global["checkpoint"]);
    }
}

#[test]
fn global_checkpoint_has_one_part_per_agent_and_kill_stops_all() {
    let w = Work::new("coord_publish");
    let c = coordinator(&w, "10s");
    let nodes = ["n1", "n2", "n3", "n4"];
    let mut agents: Vec<Agent> = nodes.iter().map(|n| agent(&w, &c, n, &[])).collect();
    for a in &mut agents {
        a.wait_state("running", T_CMD);
    }
    for (round, name) in [(1, "checkpoint-000001"), (2, "checkpoint-000002")] {
        let mut r = request(&w, &c, false);
        r.expect_exit(0, T_CMD);
        assert!(
            r.stderr()
                .contains(&format!("checkpoint {round} of 4 nodes published")),
            "{}",
            r.diag()
        );
        assert_eq!(entries(&w.ck).last().unwrap(), name);
        assert_parts(&w, name, &nodes);
        for a in &mut agents {
            assert_eq!(
                a.state(),
                "running",
                "agent {} after checkpoint {round}",
                a.node
            );
            assert!(a.proc.running(), "{}", a.proc.diag());
        }
    }
    let mut r = request(&w, &c, true);
    r.expect_exit(0, T_CMD);
    assert_eq!(
        entries(&w.ck),
        [
            "checkpoint-000001",
            "checkpoint-000002",
            "checkpoint-000003"
        ]
    );
    assert_parts(&w, "checkpoint-000003", &nodes);
    for a in &mut agents {
        a.proc.expect_exit(EXIT_CHECKPOINTED, T_CMD);
        assert_eq!(a.state(), "killed 3");
    }
    drop(c);
}

/// An agent killed in `phase` ("freezing" or "dumping") of checkpoint 2.
fn agent_lost(phase: &str, delay: &str) {
    let w = Work::new(&format!("coord_lost_{phase}"));
    let c = coordinator(&w, "10s");
    let mut a = agent(&w, &c, "a", &[]);
    let mut b = agent(&w, &c, "b", &[]);
    request(&w, &c, false).expect_exit(0, T_CMD);
    let mut slow = agent(&w, &c, "slow", &["--simulate-delay", delay]);
    let t0 = Instant::now();
    let mut r = request(&w, &c, false);
    slow.wait_state(&format!("{phase} 2"), T_CMD);
    slow.proc.kill();
    let status = r.wait(T_CMD);
    let err = r.stderr();
    assert_eq!(status.code(), Some(1), "{}", r.diag());
    let verb = &phase[..phase.len() - 3]; // freezing -> freez(e), dumping -> dump
    assert!(
        err.contains("checkpoint 2 abandoned, nothing published")
            && err.contains("agent 2 (node slow")
            && err.contains(&format!(
                "was lost during {}",
                if verb == "freez" { "freeze" } else { "dump" }
            )),
        "{err}"
    );
    // Abandoned at once (not after the delay or a timeout).
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(
        entries(&w.ck),
        ["checkpoint-000001"],
        "nothing published, no partial left"
    );
    for x in [&mut a, &mut b] {
        assert_eq!(x.state(), "running", "agent {} resumed", x.node);
        assert!(x.proc.running(), "{}", x.proc.diag());
    }
    // The job goes on: the next checkpoint has the two agents left.
    let mut r = request(&w, &c, false);
    r.expect_exit(0, T_CMD);
    assert_eq!(entries(&w.ck), ["checkpoint-000001", "checkpoint-000002"]);
    assert_parts(&w, "checkpoint-000002", &["a", "b"]);
}

#[test]
fn agent_killed_during_freeze_abandons_the_checkpoint() {
    agent_lost("freezing", "freeze=20s");
}

#[test]
fn agent_killed_during_dump_abandons_the_checkpoint() {
    agent_lost("dumping", "dump=20s");
}

#[test]
fn agent_timing_out_or_failing_abandons_the_checkpoint() {
    let w = Work::new("coord_timeout");
    let c = coordinator(&w, "1s");
    let mut a = agent(&w, &c, "a", &[]);
    let mut slow = agent(&w, &c, "slow", &["--simulate-delay", "freeze=2500ms"]);
    let mut r = request(&w, &c, false);
    r.expect_exit(1, T_CMD);
    let err = r.stderr();
    assert!(
        err.contains("checkpoint 1 abandoned, nothing published")
            && err.contains("agent 1 (node slow")
            && err.contains("did not freeze for checkpoint 1 within 1.0 s"),
        "{err}"
    );
    assert_eq!(entries(&w.ck), Vec::<String>::new(), "nothing published");
    assert_eq!(a.state(), "running");
    // The late agent finishes freezing, then obeys the abort: it runs on, and stays.
    slow.wait_state("running", T_CMD);
    assert!(slow.proc.running(), "{}", slow.proc.diag());
    assert!(a.proc.running(), "{}", a.proc.diag());
    drop(slow);

    // An agent whose dump fails: abandoned with its error.
    let _bad = agent(&w, &c, "bad", &["--simulate-fail", "dump"]);
    let mut r = request(&w, &c, false);
    r.expect_exit(1, T_CMD);
    let err = r.stderr();
    assert!(
        err.contains("abandoned, nothing published")
            && err.contains("(node bad")
            && err.contains("could not dump")
            && err.contains("fails Dump"),
        "{err}"
    );
    assert_eq!(entries(&w.ck), Vec::<String>::new(), "nothing published");
    a.wait_state("running", T_CMD);
}

#[test]
fn protocol_version_mismatch_is_refused_clearly() {
    let w = Work::new("coord_version");
    let mut c = coordinator(&w, "10s");
    let state = w.path("v9.state");
    let cmd = w.stasis_cmd(&[
        "agent".as_ref(),
        "--coordinator".as_ref(),
        c.addr.as_ref(),
        "--node".as_ref(),
        "v9".as_ref(),
        "--simulate".as_ref(),
        "--simulate-state".as_ref(),
        state.as_os_str(),
        "--protocol-version".as_ref(),
        "9".as_ref(),
    ]);
    let mut old = w.spawn("agent-v9", cmd, Stdio::null());
    old.expect_exit(1, T_CMD);
    let err = old.stderr();
    assert!(
        err.contains("refused this agent: protocol version mismatch: the agent on node v9")
            && err.contains("speaks version 9 and this coordinator 1")
            && err.contains("use the same stasis release on every node"),
        "{err}"
    );
    // The coordinator serves on; the refused agent is not part of checkpoints.
    let _a = agent(&w, &c, "a", &[]);
    request(&w, &c, false).expect_exit(0, T_CMD);
    assert_parts(&w, "checkpoint-000001", &["a"]);
    assert!(c.proc.running(), "{}", c.proc.diag());
}

/// A real part (a counter under `stasis agent -- counter`) whose agent is killed while
/// the part is written and held frozen for the others (a simulated agent slow to
/// dump): the checkpoint is abandoned, nothing is published, the previous checkpoint
/// stays the newest, and the part (its init saw the agent go) runs on: its ticks go on
/// and it ends with its own checks passed.
#[test]
fn real_part_runs_on_when_its_agent_dies_mid_checkpoint() {
    let w = Work::new("coord_real_agent_lost");
    let c = coordinator(&w, "10s");
    let counter = prog("counter");
    let mut cmd = w.stasis_cmd(&[
        "agent".as_ref(),
        "--coordinator".as_ref(),
        c.addr.as_ref(),
        "--node".as_ref(),
        "real".as_ref(),
        "--".as_ref(),
        counter.as_os_str(),
    ]);
    cmd.current_dir(&w.dir);
    let mut real = w.spawn_io("agent-real", cmd, Stdio::null(), true);
    real.wait_tick(3, T_READY);
    real.wait_line_err("joined", T_CMD);
    let _slow = agent(&w, &c, "slow", &["--simulate-delay", "dump=4s"]);
    request(&w, &c, false).expect_exit(0, T_CMD);
    assert_eq!(entries(&w.ck), ["checkpoint-000001"]);
    let t = real.last_tick().unwrap();
    real.wait_tick(t + 3, T_CMD);
    let mut r = request(&w, &c, false);
    // The real part is frozen once its ticks stop; the slow agent is still dumping.
    let t0 = Instant::now();
    loop {
        let a = real.last_tick();
        std::thread::sleep(Duration::from_millis(300));
        if real.last_tick() == a {
            break;
        }
        assert!(t0.elapsed() < T_CMD, "the real part was never frozen");
    }
    // SAFETY: kill(2) of the agent process we started.
    unsafe { libc::kill(real.pid(), libc::SIGKILL) };
    let status = r.wait(T_CMD);
    let err = r.stderr();
    assert_eq!(status.code(), Some(1), "{}", r.diag());
    assert!(
        err.contains("checkpoint 2 abandoned, nothing published") && err.contains("node real"),
        "{err}"
    );
    assert_eq!(entries(&w.ck), ["checkpoint-000001"], "nothing published");
    // The part runs on without its agent.
    let t = real.last_tick().unwrap();
    let t0 = Instant::now();
    while real.last_tick().unwrap() < t + 5 {
        assert!(
            t0.elapsed() < T_CMD,
            "the part stayed frozen after its agent died\n{}",
            real.diag()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    w.go();
    let t0 = Instant::now();
    while !real.stdout().contains("OK ticks=") {
        assert!(
            !real.stdout().contains("FAIL") && t0.elapsed() < T_CMD,
            "{}",
            real.diag()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ticks_consecutive(&[("real part".into(), real.stdout())], Some(0));
    drop(c);
}

/// A part that meets a passing state (a connection not accepted yet...) fails its dump
/// as `passing`: the coordinator abandons that try, lets the job run a moment and
/// tries again (50 ms, doubling), so the client's one request is published; a state
/// that does not pass is given up after the last try, naming it, with nothing
/// published and every part running.
#[test]
fn a_passing_state_is_tried_again() {
    let w = Work::new("coord_passing");
    let c = coordinator(&w, "10s");
    let mut a = agent(&w, &c, "a", &[]);
    let mut b = agent(&w, &c, "b", &["--simulate-passing", "2"]);
    let mut r = request(&w, &c, false);
    r.expect_exit(0, T_CMD);
    assert!(
        r.stderr().contains("checkpoint 1 of 2 nodes published"),
        "{}",
        r.diag()
    );
    assert_eq!(entries(&w.ck), ["checkpoint-000001"], "no partial left");
    assert_parts(&w, "checkpoint-000001", &["a", "b"]);
    let log = c.proc.stderr();
    assert_eq!(
        log.matches("met a passing state of the job; trying again")
            .count(),
        2,
        "{log}"
    );
    // Never given up: 8 tries in all, then the error names the state.
    let mut stuck = agent(&w, &c, "stuck", &["--simulate-passing", "100"]);
    let t0 = Instant::now();
    let mut r = request(&w, &c, false);
    let status = r.wait(Duration::from_secs(60));
    let err = r.stderr();
    assert_eq!(status.code(), Some(1), "{}", r.diag());
    assert!(
        err.contains("abandoned, nothing published")
            && err.contains("node stuck")
            && err.contains("meets a passing state")
            && err.contains("tried 8 times"),
        "{err}"
    );
    // The waits between tries (50 ms doubling up to 2 s: 5.15 s) were waited.
    assert!(t0.elapsed() >= Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(entries(&w.ck), ["checkpoint-000001"]);
    for x in [&mut a, &mut b, &mut stuck] {
        assert_eq!(x.state(), "running", "agent {}", x.node);
        assert!(x.proc.running(), "{}", x.proc.diag());
    }
}
