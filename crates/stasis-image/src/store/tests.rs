//! Tests of the image store.

use super::*;
use crate::model::*;

fn meta(seq: u64) -> Checkpoint {
    Checkpoint {
        sequence: seq,
        arch: "x86_64".into(),
        kernel: "test".into(),
        page_size: 4096,
        origin: Origin::Run,
        root_pid: 2,
        processes: vec![],
        zombies: vec![],
        pipes: vec![],
        depends_on: vec![],
        shared_memory: vec![],
        sockets: vec![],
        inet_sockets: vec![],
        private_network: false,
        node_addresses: Vec::new(),
        address_map: Vec::new(),
        port_map: Vec::new(),
        private_dirs: Vec::new(),
        ptys: vec![],
        sysv: Default::default(),
        timings: Timings::default(),
    }
}

fn tmpdir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("stasis-image-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&p);
    p
}

/// A property test of the image reader (issue #14): the metadata, the manifest,
/// page runs and page hashes made of random bytes, or of a valid file with random
/// changes, are refused or read, never a panic; a checkpoint whose files are
/// changed at random never opens unless its bytes are intact.
#[test]
fn reader_never_panics_on_damaged_input() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let root = tmpdir("fuzz");
    let lock = DirLock::acquire(&root).unwrap();
    let mut w = CheckpointWriter::begin(&lock).unwrap();
    let mut d = w.data_file("runs-2.bin").unwrap();
    d.write_all(&[7u8; 96]).unwrap();
    w.finish_data(d).unwrap();
    let good = w.commit(&meta(1)).unwrap();
    let names = [MANIFEST, METADATA, "runs-2.bin"];
    let originals: Vec<Vec<u8>> = names
        .iter()
        .map(|n| fs::read(good.join(n)).unwrap())
        .collect();
    let mut opened_intact = 0;
    for round in 0..600 {
        let mut bytes: Vec<Vec<u8>> = originals.clone();
        let k = (next() % 3) as usize;
        let b = &mut bytes[k];
        match next() % 5 {
            0 => *b = (0..next() % 300).map(|_| next() as u8).collect(),
            1 if !b.is_empty() => {
                let n = b.len();
                b[(next() % n as u64) as usize] = next() as u8;
            }
            2 if !b.is_empty() => b.truncate((next() % b.len() as u64) as usize),
            3 => {
                // A number in the JSON replaced by a random one.
                if let Some(i) = (0..b.len()).find(|&i| b[i].is_ascii_digit() && next() % 8 == 0) {
                    let v = next().to_string();
                    b.splice(i..i + 1, v.bytes());
                }
            }
            _ => b.extend((0..next() % 40).map(|_| next() as u8)),
        }
        for (n, content) in names.iter().zip(&bytes) {
            fs::write(good.join(n), content).unwrap();
        }
        let r = std::panic::catch_unwind(|| CheckpointReader::open(&good).is_ok());
        let ok = r.unwrap_or_else(|_| panic!("round {round}: the reader panicked"));
        if ok {
            assert_eq!(bytes, originals, "round {round}: a changed image opened");
            opened_intact += 1;
        }
        // The decoders alone, on the same bytes.
        let raw = &bytes[k];
        assert!(std::panic::catch_unwind(|| {
            let _ = crate::PageRun::decode_all(raw);
            let _ = crate::PageHashes::decode(raw);
            let _ = serde_json::from_slice::<Checkpoint>(raw);
            let _ = serde_json::from_slice::<Manifest>(raw);
        })
        .is_ok());
    }
    // Runs decoded from random bytes attached to a process never panic either.
    for _ in 0..200 {
        let raw: Vec<u8> = (0..next() % 400).map(|_| next() as u8).collect();
        if let Some(runs) = crate::PageRun::decode_all(&raw) {
            let mut p: Process = serde_json::from_value(serde_json::json!({
                "pid": 2, "ppid": 1, "comm": "x",
                "exe": {"path": "/x", "dev": 0, "ino": 0, "size": 0, "mtime_ns": 0},
                "cwd": "/", "umask": 18, "personality": 0, "rlimits": [],
                "mm": serde_json::to_value(MmFields::default()).unwrap(),
                "mappings": [{
                    "start": 0x10000, "end": 0x90000, "prot": 3, "shared": false,
                    "kind": {"type": "anonymous"}, "name": "", "pages": []
                }],
                "pages": serde_json::to_value(PageFiles::default()).unwrap(),
                "fds": [],
                "signals": serde_json::to_value(Signals::default()).unwrap(),
                "itimers": [], "threads": []
            }))
            .unwrap();
            assert!(std::panic::catch_unwind(move || {
                let _ = p.attach_runs(runs);
            })
            .is_ok());
        }
    }
    eprintln!("600 damaged images: none opened but intact ones ({opened_intact})");
    let _ = fs::remove_dir_all(&root);
}

#[test]
fn write_verify_tamper_prune() {
    let root = tmpdir("wv");
    let lock = DirLock::acquire(&root).unwrap();
    assert!(matches!(DirLock::acquire(&root), Err(ImageError::Busy(_))));
    for round in 1..=3u64 {
        let mut w = CheckpointWriter::begin(&lock).unwrap();
        assert_eq!(w.sequence(), round);
        let mut d = w.data_file("pages-2.img").unwrap();
        let data: Vec<u8> = (0..(3 * CHUNK_SIZE as usize + 100))
            .map(|i| (i * 7 + round as usize) as u8)
            .collect();
        d.write_all(&data[..5000]).unwrap();
        d.write_all(&data[5000..]).unwrap();
        w.finish_data(d).unwrap();
        w.commit(&meta(round)).unwrap();
    }
    let r = CheckpointReader::open_latest(&root).unwrap();
    assert_eq!(r.meta.sequence, 3);
    let pages = r.data_path("pages-2.img").unwrap();
    let mut bytes = fs::read(&pages).unwrap();
    bytes[2 * CHUNK_SIZE as usize + 3] ^= 1;
    fs::write(&pages, &bytes).unwrap();
    assert!(matches!(
        CheckpointReader::open_latest(&root),
        Err(ImageError::Checksum { .. })
    ));
    bytes.truncate(100);
    fs::write(&pages, &bytes).unwrap();
    assert!(matches!(
        CheckpointReader::open_latest(&root),
        Err(ImageError::Truncated { .. })
    ));
    // An unfinished writer leaves nothing behind.
    drop(CheckpointWriter::begin(&lock).unwrap());
    assert_eq!(list_checkpoints(&root).unwrap().len(), 3);
    prune(&lock, 2).unwrap();
    let left: Vec<u64> = list_checkpoints(&root)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(left, vec![2, 3]);
    // Tampered manifest.
    let m = root.join("checkpoint-000002").join(MANIFEST);
    let t = fs::read_to_string(&m)
        .unwrap()
        .replace("\"sequence\": 2", "\"sequence\": 9");
    fs::write(&m, t).unwrap();
    assert!(matches!(
        CheckpointReader::open(&root.join("checkpoint-000002")),
        Err(ImageError::Checksum { .. })
    ));
    fs::remove_dir_all(&root).unwrap();
}
