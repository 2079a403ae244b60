//! Compressed checkpoints (`checkpoint --compress zstd|lz4`): pages are stored as
//! independently compressed frames, read back frame by frame on restart. Text-like
//! memory must shrink, and a restart from a chain of incremental checkpoints stored
//! with different compressions must give back every byte.
mod common;
use common::*;
use serde_json::Value;
use std::ffi::OsStr;

fn checkpoint_with(w: &Work, extra: &[&str]) -> CmdOut {
    let mut args: Vec<&OsStr> = vec![OsStr::new("checkpoint")];
    args.extend(extra.iter().map(OsStr::new));
    args.push(w.ck.as_os_str());
    w.stasis("ckpt", &args)
}

/// (compression, logical bytes, bytes in the part files) of the newest checkpoint's
/// process with the most pages.
fn page_files(w: &Work) -> (String, u64, u64) {
    let meta = w.inspect_json();
    let procs = meta["processes"].as_array().expect("processes");
    let p = procs
        .iter()
        .max_by_key(|p| p["pages"]["bytes"].as_u64().unwrap_or(0))
        .expect("a process");
    let pages = &p["pages"];
    let ck = w.newest_checkpoint();
    let on_disk: u64 = pages["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .map(|n| {
            let path = ck.join(n.as_str().expect("part name"));
            std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .len()
        })
        .sum();
    (
        pages["compression"].as_str().unwrap_or("?").to_string(),
        pages["bytes"].as_u64().unwrap_or(0),
        on_disk,
    )
}

fn expect_ok(r: CmdOut) {
    assert!(r.status.success(), "{r}");
}

/// textmem (32 MiB of text that keeps changing): a zstd checkpoint that leaves it
/// running, an uncompressed incremental one, then an lz4 incremental one with
/// --kill; both compressed images are much smaller than the memory they hold; the
/// restart from the three-link chain (frames of two codecs and a plain file)
/// continues the ticks exactly and the program finds every page as it left it.
#[test]
fn compressed_incremental_chain_restores_exactly() {
    let w = Work::new("compress_chain");
    let mut s = Session::start(&w, &[prog("textmem")]);
    s.cur().wait_tick(3, T_READY);
    expect_ok(checkpoint_with(
        &w,
        &["--incremental", "--compress", "zstd"],
    ));
    let (how, logical, disk) = page_files(&w);
    eprintln!("zstd: {logical} logical bytes in {disk} bytes");
    assert_eq!(how, "zstd");
    assert!(logical >= 32 << 20, "only {logical} bytes of pages saved");
    assert!(
        disk * 3 < logical,
        "zstd stored {disk} bytes for {logical} bytes of text"
    );
    s.cur().wait_more_ticks(10, T_READY);
    expect_ok(checkpoint_with(&w, &["--incremental"]));
    assert_eq!(page_files(&w).0, "none");
    s.cur().wait_more_ticks(10, T_READY);
    expect_ok(checkpoint_with(
        &w,
        &["--incremental", "--compress", "lz4", "--kill"],
    ));
    s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
    let meta: Value = w.inspect_json();
    let deps: Vec<u64> = meta["depends_on"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    assert!(
        deps.contains(&1),
        "the lz4 checkpoint should refer to the zstd one: depends_on {deps:?}"
    );
    assert_eq!(page_files(&w).0, "lz4");
    s.restart(Probe::Ticks);
    let ok = s.finish();
    s.assert_no_rerun();
    let ticks = assert_ticks_consecutive(&s.outputs(), Some(0));
    assert_eq!(
        field_num(&ok, "ticks"),
        ticks.len() as u64,
        "OK line {ok:?} vs {} ticks printed",
        ticks.len()
    );
}

/// A full lz4 checkpoint with --kill of a process with random, zeroed, sparse and
/// read-only memory (memory.c) restores exactly, and an unknown compression is
/// refused before anything is done.
#[test]
fn lz4_checkpoint_of_mixed_memory_restores_exactly() {
    let w = Work::new("compress_lz4");
    let mut s = Session::start(&w, &[prog("memory")]);
    let r = checkpoint_with(&w, &["--compress", "brotli"]);
    assert!(
        !r.status.success(),
        "an unknown compression was accepted: {r}"
    );
    assert!(
        r.stderr.contains("brotli") && r.stderr.contains("zstd"),
        "the error should name the bad value and the choices: {r}"
    );
    assert!(w.checkpoints().is_empty(), "a checkpoint was written");
    expect_ok(checkpoint_with(&w, &["--compress", "lz4", "--kill"]));
    s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
    assert_eq!(page_files(&w).0, "lz4");
    s.restart(Probe::Ping);
    let ok = s.finish();
    assert_eq!(ok, format!("OK rand={}", s.ready_field("rand")));
}
