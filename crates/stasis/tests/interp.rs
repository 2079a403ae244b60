//! A real interpreter: a python3 script with state in a dict, a list and a
//! running sum survives two checkpoint --kill/restart cycles; the sequence of
//! sums is exactly the one of an uninterrupted computation (checked here
//! independently, and by the script itself at the end).
mod common;
use common::*;

const SCRIPT: &str = r#"
import os, sys, time

def value(n):
    return (n * n * 2654435761 + 12345) % 1000003

state = {"sum": 0, "hist": {}}
vals = []
n = 0
pid0 = os.getpid()
sys.stdout.write("ready pid=%d\n" % pid0)
sys.stdout.flush()
while not os.path.exists("go"):
    v = value(n)
    vals.append(v)
    state["hist"][v % 17] = state["hist"].get(v % 17, 0) + 1
    state["sum"] = (state["sum"] * 31 + v) % (1 << 61)
    sys.stdout.write("tick %d %d\n" % (n, state["sum"]))
    sys.stdout.flush()
    n += 1
    time.sleep(0.02)

s, hist = 0, {}
for i, v in enumerate(vals):
    if v != value(i):
        print("FAIL vals[%d] = %d, want %d" % (i, v, value(i)))
        sys.exit(1)
    hist[v % 17] = hist.get(v % 17, 0) + 1
    s = (s * 31 + v) % (1 << 61)
if len(vals) != n or s != state["sum"] or hist != state["hist"]:
    print("FAIL state mismatch: n=%d len=%d sum=%d/%d" % (n, len(vals), s, state["sum"]))
    sys.exit(1)
if os.getpid() != pid0:
    print("FAIL pid changed from %d to %d" % (pid0, os.getpid()))
    sys.exit(1)
print("OK ticks=%d sum=%d" % (n, s))
"#;

fn python() -> &'static str {
    // a real binary rather than a version-manager shim
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn expected_sum(upto: u64) -> Vec<u64> {
    let mut s: u128 = 0;
    (0..=upto)
        .map(|n| {
            let n = n as u128;
            let v = (n * n * 2654435761 + 12345) % 1000003;
            s = (s * 31 + v) % (1u128 << 61);
            s as u64
        })
        .collect()
}

#[test]
fn python_script_survives_two_restarts() {
    let w = Work::new("python");
    std::fs::write(w.path("script.py"), SCRIPT).unwrap();
    let mut s = Session::start(&w, &[python(), "-u", "script.py"]);
    s.cur().wait_tick(5, T_READY);
    s.cycle(Probe::Ticks);
    s.cycle(Probe::Ticks);
    let ok = s.finish();
    s.assert_no_rerun();
    let all = assert_ticks_consecutive(&s.outputs(), Some(0));
    let last = *all.last().unwrap();
    let sums = expected_sum(last);
    for (label, text) in s.outputs() {
        for l in complete_lines(&text) {
            if let Some((n, rest)) = parse_tick(&l) {
                let got: u64 = rest
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{label}: bad line {l:?}"));
                assert_eq!(
                    got, sums[n as usize],
                    "{label}: tick {n}: sum {got}, want {}",
                    sums[n as usize]
                );
            }
        }
    }
    assert_eq!(
        ok,
        format!("OK ticks={} sum={}", last + 1, sums[last as usize])
    );
}
