use super::*;

#[test]
fn page_runs_round_trip_and_find_their_mappings() {
    let runs = vec![
        PageRun {
            addr: 0x1000,
            npages: 2,
            offset: 0,
            from: 0,
        },
        PageRun {
            addr: 0x5000,
            npages: 1,
            offset: 0x2000,
            from: 3,
        },
    ];
    let bytes = PageRun::encode_all(&runs);
    assert_eq!(bytes.len(), 2 * PageRun::SIZE);
    assert_eq!(PageRun::decode_all(&bytes), Some(runs.clone()));
    assert_eq!(PageRun::decode_all(&bytes[..40]), None);
    let map = |start: u64, end: u64| Mapping {
        start,
        end,
        prot: 3,
        shared: false,
        kind: MappingKind::Anonymous,
        name: String::new(),
        growsdown: false,
        advice: Vec::new(),
        pages: Vec::new(),
        content_file: None,
    };
    let mut p: Process = serde_json::from_value(serde_json::json!({
        "pid": 2, "ppid": 1, "comm": "t", "exe": FileId::default(), "cwd": "/",
        "umask": 0, "personality": 0, "rlimits": [], "mm": MmFields::default(),
        "mappings": [], "pages": PageFiles::default(), "fds": [],
        "signals": {"actions": [], "shared_pending": []}, "itimers": [], "threads": []
    }))
    .unwrap();
    p.mappings = vec![map(0x1000, 0x4000), map(0x4000, 0x8000)];
    p.attach_runs(runs.clone()).unwrap();
    assert_eq!(p.mappings[0].pages, runs[..1]);
    assert_eq!(p.mappings[1].pages, runs[1..]);
    // A run no mapping holds whole is refused.
    let mut stray = runs.clone();
    stray[1].npages = 4;
    p.mappings.iter_mut().for_each(|m| m.pages.clear());
    assert!(p.attach_runs(stray).is_err());
}

#[test]
fn page_hashes_round_trip() {
    let hashes: Vec<u128> = (0..5u128).map(|i| (i << 100) | (i * 7)).collect();
    let bytes = PageHashes::encode(&hashes);
    assert_eq!(bytes.len(), hashes.len() * PageHashes::SIZE);
    assert_eq!(PageHashes::decode(&bytes), hashes);
    // A truncated file yields the whole records only.
    assert_eq!(PageHashes::decode(&bytes[..bytes.len() - 3]), hashes[..4]);
    let mut direct = Vec::new();
    PageHashes::encode_into(&hashes, &mut |b| direct.extend_from_slice(b));
    assert_eq!(direct, bytes);
}

/// Records of deleted files, memfds and cwds from images of older versions (without
/// the fields added since) still load, meaning what they meant.
#[test]
fn older_deleted_file_records_load() {
    let fd: FdKind = serde_json::from_value(serde_json::json!({
        "type": "deleted", "path": "/tmp/x", "flags": 2, "pos": 5, "mode": 420,
        "data_file": "file-2-3.img", "size": 10
    }))
    .unwrap();
    assert!(
        matches!(fd, FdKind::Deleted { object: None, ref data_file, .. } if data_file == "file-2-3.img")
    );
    let o: SharedObject = serde_json::from_value(serde_json::json!({
        "id": 7, "name": "m", "size": 4096, "data_file": "shm-7.img"
    }))
    .unwrap();
    assert_eq!((o.mode, o.seals, o.deleted), (None, None, None));
    let p: Process = serde_json::from_value(serde_json::json!({
        "pid": 2, "ppid": 1, "comm": "t", "exe": FileId::default(), "cwd": "/",
        "umask": 0, "personality": 0, "rlimits": [], "mm": MmFields::default(),
        "mappings": [], "pages": PageFiles::default(), "fds": [],
        "signals": {"actions": [], "shared_pending": []}, "itimers": [], "threads": []
    }))
    .unwrap();
    assert!(!p.cwd_removed);
}

#[test]
fn hex_roundtrip() {
    let v = vec![0u8, 1, 0xab, 0xff];
    assert_eq!(from_hex(&to_hex(&v)).unwrap(), v);
    assert!(from_hex("abc").is_none());
    assert!(from_hex("zz").is_none());
}
