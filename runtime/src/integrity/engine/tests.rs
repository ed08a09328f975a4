use super::*;

fn engine(dir: &std::path::Path) -> Arc<Engine> {
    let journal = Arc::new(Journal::open(dir, 15, None).unwrap());
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    Engine::new(journal, tx, DEFAULT_MAX_FILE_SIZE)
}

fn key(dev: u64, ino: u64) -> FileKey {
    FileKey {
        dev,
        ino,
        size: 1,
        mtime: (0, 0),
        ctime: (0, 0),
    }
}

#[test]
fn a_containers_digests_go_with_the_last_container_that_marks_its_filesystems() {
    let d = tempfile::tempdir().unwrap();
    let engine = engine(d.path());
    let measured = |container: &str| {
        Arc::new(Measured {
            pod: "p".into(),
            container: container.into(),
            mode: Mode::Measure,
            allowlist: None,
            charge: None,
            quiet: Default::default(),
            no_anonymous_exec: false,
        })
    };
    // a's rootfs is 7, b's 8; both mark the pod's tmpfs volume, 9; 11
    // is a host filesystem (imacri's init) nobody registers.
    engine.register(measured("a"), vec![7, 9]);
    engine.register(measured("b"), vec![8, 9]);
    for dev in [7, 8, 9, 11] {
        engine.remember(key(dev, 1), Content::digest_only([dev as u8; 32]));
    }
    assert_eq!(engine.cached_digests(), 4);
    engine.unregister("a");
    assert!(engine.cached(&key(7, 1)).is_none());
    assert_eq!(engine.cached_digests(), 3, "the volume is b's too");
    engine.unregister("b");
    assert!(engine.cached(&key(9, 1)).is_none());
    assert!(engine.cached(&key(11, 1)).is_some());
    assert_eq!(engine.cached_digests(), 1);
    // Unknown or already gone: nothing more.
    engine.unregister("b");
    assert_eq!(engine.cached_digests(), 1);
}

#[test]
fn a_full_cache_drops_the_digests_of_the_filesystem_that_filled_it() {
    let d = tempfile::tempdir().unwrap();
    let engine = engine(d.path());
    // Other pods' files on ten filesystems, then a flood of new files
    // on one.
    let others = CACHE_LIMIT as u64 / 4;
    for i in 0..others {
        engine.remember(key(10 + i % 10, i), Content::digest_only([0; 32]));
    }
    for i in others..CACHE_LIMIT as u64 {
        engine.remember(key(1, i), Content::digest_only([1; 32]));
    }
    assert_eq!(engine.cached_digests(), CACHE_LIMIT);
    engine.remember(key(1, u64::MAX), Content::digest_only([1; 32]));
    assert_eq!(engine.cached_digests(), others as usize + 1);
    assert!(engine.cached(&key(10, 0)).is_some(), "the others' kept");
    // Full with no filesystem holding an eighth: cleared.
    let engine = self::engine(&d.path().join("2"));
    for i in 0..CACHE_LIMIT as u64 {
        engine.remember(key(i % 16, i), Content::digest_only([0; 32]));
    }
    engine.remember(key(99, 0), Content::digest_only([0; 32]));
    assert_eq!(engine.cached_digests(), 1);
}
