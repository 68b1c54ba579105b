//! The crash nemesis's two halves together: `crash/crashfs.c` preloaded into a real process
//! that writes, fsyncs and writes again, then `disk::rollback` undoing what no fsync covered.
//! Needs no root: the tracked "disk" is a temp dir, wherever it lives.
//!
//! The child is this test binary itself, re-run with `CRASHFS_CHILD` set.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use engram_jepsen::disk;

const PAGE: usize = 4096;

/// What the child leaves: `durable` (written, then fsynced, then overwritten in part,
/// extended, and cut), `fresh` (created, never fsynced), `replaced` (O_TRUNC over a synced
/// file), and `synced` (written and fsynced last: nothing to undo).
fn child(dir: &Path) {
    let mut f = std::fs::File::create(dir.join("durable")).unwrap();
    f.write_all(&vec![b'a'; 3 * PAGE]).unwrap();
    f.sync_data().unwrap();
    f.write_at(&[b'b'; 100], 10).unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(&vec![b'c'; 2 * PAGE]).unwrap();
    f.set_len(4 * PAGE as u64).unwrap();
    f.write_at(&vec![b'd'; PAGE], 2 * PAGE as u64).unwrap();

    std::fs::write(dir.join("fresh"), vec![b'e'; PAGE + 1]).unwrap();

    let mut r = std::fs::File::create(dir.join("replaced")).unwrap();
    r.write_all(b"the old contents").unwrap();
    r.sync_all().unwrap();
    drop(r);
    std::fs::write(dir.join("replaced"), b"new").unwrap();

    let mut s = std::fs::File::create(dir.join("synced")).unwrap();
    s.write_all(&vec![b'f'; 5000]).unwrap();
    s.sync_all().unwrap();
    // Gone with its undo log: nothing to roll back for it.
    std::fs::write(dir.join("removed"), b"x").unwrap();
    std::fs::remove_file(dir.join("removed")).unwrap();
}

fn run_child(root: &Path, undo: &Path) {
    let exe = std::env::current_exe().unwrap();
    let status = Command::new(exe)
        .args(["--exact", "a_crash_undoes_exactly_what_no_fsync_covered", "--nocapture", "--test-threads", "1"])
        .env("CRASHFS_CHILD", root)
        .env("LD_PRELOAD", disk::CRASHFS)
        .env("ENGRAM_CRASH_DEV", root)
        .env("ENGRAM_CRASH_UNDO", undo)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_crash_undoes_exactly_what_no_fsync_covered() {
    if let Some(dir) = std::env::var_os("CRASHFS_CHILD") {
        child(Path::new(&dir));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (root, undo) = (tmp.path().join("disk"), tmp.path().join("undo"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&undo).unwrap();
    run_child(&root, &undo);
    // Before the rollback the files hold everything written (the page cache kept it).
    assert_eq!(std::fs::read(root.join("durable")).unwrap().len(), 4 * PAGE);
    assert_eq!(std::fs::read(root.join("replaced")).unwrap(), b"new");

    let rolled = disk::rollback(&root, &undo, None).unwrap();
    assert_eq!(std::fs::read(root.join("durable")).unwrap(), vec![b'a'; 3 * PAGE], "back to its fsync");
    assert_eq!(std::fs::read(root.join("fresh")).unwrap(), b"", "never fsynced: empty");
    assert_eq!(std::fs::read(root.join("replaced")).unwrap(), b"the old contents");
    assert_eq!(std::fs::read(root.join("synced")).unwrap(), vec![b'f'; 5000], "fsynced: untouched");
    assert_eq!(rolled.files, 3, "{rolled}");
    assert_eq!(rolled.resized, 3, "{rolled}");
    assert_eq!(std::fs::read_dir(&undo).unwrap().count(), 0, "undo logs are consumed");
    // A second rollback finds nothing to do.
    assert_eq!(disk::rollback(&root, &undo, None).unwrap(), disk::Rolled::default());
}

#[test]
fn a_torn_crash_leaves_each_page_from_one_side() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, undo) = (tmp.path().join("disk"), tmp.path().join("undo"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&undo).unwrap();
    // Reuse the child of the other test.
    let exe = std::env::current_exe().unwrap();
    let status = Command::new(exe)
        .args(["--exact", "a_crash_undoes_exactly_what_no_fsync_covered", "--test-threads", "1"])
        .env("CRASHFS_CHILD", &root)
        .env("LD_PRELOAD", disk::CRASHFS)
        .env("ENGRAM_CRASH_DEV", &root)
        .env("ENGRAM_CRASH_UNDO", &undo)
        .status()
        .unwrap();
    assert!(status.success());
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(9);
    disk::rollback(&root, &undo, Some(&mut rng)).unwrap();
    // `durable` synced as 3 pages of 'a'; written since: 'b' at 10..110, 'c' and 'd' pages.
    let got = std::fs::read(root.join("durable")).unwrap();
    assert!(got.len() == 3 * PAGE || got.len() == 4 * PAGE, "{}", got.len());
    for (i, b) in got.iter().enumerate() {
        let old = if i < 3 * PAGE { b'a' } else { 0 };
        let new = match i {
            10..110 => b'b',
            _ if (2 * PAGE..3 * PAGE).contains(&i) => b'd',
            _ if i >= 3 * PAGE => b'c',
            _ => b'a',
        };
        assert!(*b == old || *b == new, "byte {i} is {b}, neither {old} nor {new}");
    }
    assert_eq!(std::fs::read(root.join("synced")).unwrap(), vec![b'f'; 5000]);
}
