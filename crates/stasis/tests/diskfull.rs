//! A full disk: the checkpoint directory is on a 1 MiB tmpfs (mounted in a user
//! and mount namespace of the test's own, so no privilege is needed). The first
//! checkpoint fits; after the application grows by 8 MiB the next one cannot. That
//! checkpoint must fail with a clear "No space left" error naming the file, leave
//! no partial checkpoint behind, keep the first checkpoint intact (`stasis verify`),
//! and the application must keep running unharmed and finish its own checks.
mod common;
use common::*;
use std::process::Command;

const SCRIPT: &str = r#"
set -u
W=$1; S=$2; PROG=$3
mkdir -p "$W/small"
mount -t tmpfs -o size=1m tmpfs "$W/small" || { echo "MOUNT_FAILED"; exit 90; }
cd "$W"
waitfor() { for _ in $(seq 400); do grep -q "$1" app.out 2>/dev/null && return 0; sleep 0.05; done; echo "TIMEOUT $1"; cat app.out app.err; exit 92; }
"$S" run --dir "$W/small/ck" -- "$PROG" > app.out 2> app.err &
RUN=$!
waitfor ready
"$S" checkpoint "$W/small/ck" 2> first.err || { echo "FIRST_FAILED"; cat first.err; exit 91; }
touch grow
waitfor grown
"$S" checkpoint "$W/small/ck" 2> second.err
echo "SECOND_RC=$?"
echo "SECOND_ERR: $(cat second.err)"
echo "ENTRIES: $(ls -A "$W/small/ck" | tr '\n' ' ')"
"$S" verify "$W/small/ck" > verify.out 2>&1
echo "VERIFY_RC=$?"
kill -0 $RUN 2>/dev/null && echo "APP_ALIVE"
T0=$(grep -c tick app.out); sleep 0.3; T1=$(grep -c tick app.out)
[ "$T1" -gt "$T0" ] && echo "APP_TICKING"
touch go
wait $RUN
echo "RUN_RC=$?"
echo "LAST: $(tail -n 1 app.out)"
"#;

#[test]
fn full_disk_fails_cleanly_and_keeps_the_last_good_checkpoint() {
    let w = Work::new("diskfull");
    let script = w.path("diskfull.sh");
    std::fs::write(&script, SCRIPT).unwrap();
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "bash"])
        .arg(&script)
        .arg(w.path(""))
        .arg(env!("CARGO_BIN_EXE_stasis"))
        .arg(prog("grow"))
        .output()
        .expect("running unshare");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let diag = format!("{text}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "scenario failed: {diag}");
    assert_ne!(
        field("SECOND_RC="),
        "0",
        "the checkpoint that cannot fit succeeded: {diag}"
    );
    let err = field("SECOND_ERR:");
    assert!(
        err.contains("No space left on device"),
        "no clear disk-full error: {diag}"
    );
    assert!(
        err.contains("small/ck"),
        "the error does not name the file: {diag}"
    );
    assert!(
        err.contains("keeps running"),
        "the error does not say the app runs on: {diag}"
    );
    assert_eq!(
        field("ENTRIES:"),
        ".lock checkpoint-000001",
        "partial checkpoint left behind: {diag}"
    );
    assert_eq!(
        field("VERIFY_RC="),
        "0",
        "the last good checkpoint was damaged: {diag}"
    );
    assert!(
        text.contains("APP_ALIVE") && text.contains("APP_TICKING"),
        "the app was harmed: {diag}"
    );
    assert_eq!(field("RUN_RC="), "0", "{diag}");
    assert!(field("LAST:").starts_with("OK ticks="), "{diag}");
}
