//! The nodes' disks, for the disk-full, crash and slow-disk nemeses.
//!
//! With any of those on, each node slot gets a filesystem of its own: a size-limited tmpfs
//! mounted at `<run>/data/s<slot>` (its source is named `egjdisk-<harness pid>`, so mounts
//! left by a `kill -9`ed harness are swept at the next start). The slot's nodes keep their
//! data dirs on it (`s<slot>/n<id>`), and the nemeses act on it:
//!
//! - **disk full**: a ballast file fills the filesystem to just below the node's free-space
//!   reserve, or to its last byte; removing it frees the space again.
//! - **crash**: `crash/crashfs.c` (LD_PRELOAD) logs, per file, what every write since the
//!   file's last fsync overwrote. After a kill -9, [`rollback`] undoes those writes: all of
//!   them (power loss with nothing flushed), or a random choice of 4 KiB pages and 512-byte
//!   sectors (torn writes). Either is a state a real disk can be left in; what a completed
//!   fsync covered is never touched.
//! - **slow disk**: a control file the library reads at every fsync makes it take longer.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::Rng;

use crate::net;

/// The library `jepsen/build.rs` builds from `crash/crashfs.c`.
pub const CRASHFS: &str = env!("CRASHFS_SO");

const MOUNT_SOURCE: &str = "egjdisk-";
const BALLAST: &str = "ballast";
const PAGE: usize = 4096;
const SECTOR: usize = 512;

pub struct Disks {
    data: PathBuf,
    faults: PathBuf,
    pub bytes: u64,
    mounted: Vec<PathBuf>,
}

/// What a rollback undid.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rolled {
    /// Files with writes undone.
    pub files: u64,
    /// Pages (4 KiB) whose content changed back, wholly or by some sectors.
    pub pages: u64,
    /// Files whose size changed back.
    pub resized: u64,
    /// The disk was too full to roll back, so the ballast had to go first.
    pub ballast_removed: bool,
}

impl std::fmt::Display for Rolled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} files, {} pages, {} sizes undone", self.files, self.pages, self.resized)?;
        if self.ballast_removed {
            write!(f, " (ballast removed to make room)")?;
        }
        Ok(())
    }
}

impl Disks {
    /// Mounts one tmpfs of `bytes` per slot under `<run>/data`.
    pub fn create(run: &Path, slots: usize, bytes: u64) -> Result<Disks> {
        let mut d = Disks { data: run.join("data"), faults: run.join("faults"), bytes, mounted: Vec::new() };
        let source = format!("{MOUNT_SOURCE}{}", std::process::id());
        for s in 0..slots {
            let at = d.mount_point(s);
            std::fs::create_dir_all(&at)?;
            net::sh(&[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0755"),
                &source,
                &at.to_string_lossy(),
            ])
            .with_context(|| format!("mounting a tmpfs at {}", at.display()))?;
            d.mounted.push(at);
            std::fs::create_dir_all(d.undo_dir(s))?;
        }
        Ok(d)
    }

    pub fn mount_point(&self, slot: usize) -> PathBuf {
        self.data.join(format!("s{}", slot + 1))
    }

    /// Where the slot's process logs what its un-fsynced writes overwrote (not on its disk).
    pub fn undo_dir(&self, slot: usize) -> PathBuf {
        self.faults.join(format!("n{}.undo", slot + 1))
    }

    /// The slow-disk control file: milliseconds every fsync takes at least.
    pub fn fsync_delay_file(&self, slot: usize) -> PathBuf {
        self.faults.join(format!("n{}.fsync-delay-ms", slot + 1))
    }

    /// Forgets the undo logs of an earlier life of the slot's process: it ended by a process
    /// crash or a clean stop, and the page cache kept everything it wrote.
    pub fn reset_undo(&self, slot: usize) -> Result<()> {
        let dir = self.undo_dir(slot);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(())
    }

    pub fn set_fsync_delay(&self, slot: usize, ms: u64) -> Result<()> {
        std::fs::write(self.fsync_delay_file(slot), format!("{ms}\n"))?;
        Ok(())
    }

    /// The crash nemesis's own fsync delay (the library takes the larger of the two), so a
    /// crash and a slow-disk fault never undo each other's setting.
    pub fn set_crash_fsync_delay(&self, slot: usize, ms: u64) -> Result<()> {
        std::fs::write(self.faults.join(format!("n{}.fsync-delay-ms.crash", slot + 1)), format!("{ms}\n"))?;
        Ok(())
    }

    /// Free bytes on the slot's filesystem.
    pub fn free(&self, slot: usize) -> Result<u64> {
        Ok(engram::storage::space::statvfs(&self.mount_point(slot))?.0)
    }

    /// Grows the slot's ballast until `leave` bytes (or fewer) are free; returns the free bytes
    /// left. A write that meets ENOSPC ends it: the filesystem is full.
    pub fn fill(&self, slot: usize, leave: u64) -> Result<u64> {
        let path = self.mount_point(slot).join(BALLAST);
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let chunk = vec![0x5au8; 1 << 20];
        loop {
            let free = self.free(slot)?;
            if free <= leave {
                return Ok(free);
            }
            let n = ((free - leave) as usize).min(chunk.len());
            match f.write_all(&chunk[..n]) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => return self.free(slot),
                Err(e) => return Err(e).context("writing the ballast"),
            }
        }
    }

    /// Removes the slot's ballast.
    pub fn clear(&self, slot: usize) -> Result<()> {
        match std::fs::remove_file(self.mount_point(slot).join(BALLAST)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Undoes the slot's un-fsynced writes (see [`rollback`]). The slot's process must be dead.
    /// A rollback that needs more room than a full disk has (it can: undoing a shrink) gets it
    /// by removing the ballast, and says so.
    pub fn rollback(&self, slot: usize, mut torn: Option<&mut rand::rngs::StdRng>) -> Result<Rolled> {
        match rollback(&self.mount_point(slot), &self.undo_dir(slot), torn.as_deref_mut()) {
            Err(e) if self.mount_point(slot).join(BALLAST).exists() => {
                eprintln!("jepsen: n{}: {e:#}; removing the ballast and rolling back again", slot + 1);
                self.clear(slot)?;
                let mut r = rollback(&self.mount_point(slot), &self.undo_dir(slot), torn)?;
                r.ballast_removed = true;
                Ok(r)
            }
            r => r,
        }
    }

    /// Unmounts every disk. With `keep`, copies each one's files to the plain directory left
    /// behind first, so a failed run's data dirs can be looked at.
    pub fn teardown(&mut self, keep: bool) {
        for at in std::mem::take(&mut self.mounted) {
            let copy = at.with_extension("copy");
            let kept = keep && net::sh(&["cp", "-a", &at.to_string_lossy(), &copy.to_string_lossy()]).is_ok();
            if let Err(e) = net::sh(&["umount", &at.to_string_lossy()]) {
                eprintln!("jepsen: unmounting {}: {e:#}; detaching it", at.display());
                let _ = net::sh(&["umount", "-l", &at.to_string_lossy()]);
            }
            if kept {
                let _ = std::fs::remove_dir(&at);
                let _ = std::fs::rename(&copy, &at);
                let _ = std::fs::remove_file(at.join(BALLAST));
            }
        }
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        self.teardown(false);
    }
}

/// Unmounts the disks of harnesses that are gone; returns how many.
pub fn sweep_stale() -> usize {
    sweep(false)
}

/// Unmounts this harness's own disks (an interrupted run, on its way out).
pub fn sweep_own() -> usize {
    sweep(true)
}

fn sweep(own: bool) -> usize {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return 0 };
    let mut swept = 0;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(source), Some(at)) = (f.next(), f.next()) else { continue };
        let Some(pid) = source.strip_prefix(MOUNT_SOURCE).and_then(|p| p.parse::<u32>().ok()) else { continue };
        let mine = pid == std::process::id();
        let gone = !mine && !Path::new(&format!("/proc/{pid}")).exists();
        if (mine == own) && (own || gone) && net::sh(&["umount", "-l", at]).is_ok() {
            swept += 1;
        }
    }
    swept
}

/// One undo record: the file held `old` at `offset` and was `old_size` long before a change.
struct Record {
    offset: u64,
    old: Vec<u8>,
    old_size: u64,
}

const MAGIC: u32 = 0x4e55_4745;
const HEAD: usize = 32;

/// Parses an undo log. A record cut short at the end is one whose change never happened (the
/// library writes the whole record before the change), so it is dropped.
fn parse(bytes: &[u8]) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEAD {
        let word = |i: usize| u64::from_ne_bytes(bytes[at + i..at + i + 8].try_into().expect("8 bytes"));
        let magic = u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        if magic != MAGIC {
            bail!("undo record at byte {at} has no magic");
        }
        let (offset, len, old_size) = (word(8), word(16), word(24));
        let Some(end) = usize::try_from(len).ok().and_then(|l| (at + HEAD).checked_add(l)) else {
            bail!("undo record at byte {at} is too long");
        };
        if end > bytes.len() {
            break;
        }
        out.push(Record { offset, old: bytes[at + HEAD..end].to_vec(), old_size });
        at = end;
    }
    Ok(out)
}

/// The file as its last fsync left it: `now` with the records undone, last first.
fn undo(now: &[u8], records: &[Record]) -> Vec<u8> {
    let mut f = now.to_vec();
    for r in records.iter().rev() {
        if r.old.is_empty() {
            f.resize(r.old_size as usize, 0);
            continue;
        }
        let start = r.offset as usize;
        let end = start + r.old.len();
        if f.len() < end {
            f.resize(end, 0);
        }
        f[start..end].copy_from_slice(&r.old);
        f.resize(r.old_size as usize, 0);
    }
    f
}

/// A crash state between `old` (the last fsync) and `new` (everything written): a size from
/// either, and each differing page from either, or (one in ten) sector by sector. Past the
/// old end, the old side reads as zeros (the size was persisted before the data); past the
/// new end, the new side is the old bytes (a shrink that did not persist cut nothing).
/// Returns the state and how many pages differ from `new`.
fn tear(old: &[u8], new: &[u8], rng: &mut rand::rngs::StdRng) -> (Vec<u8>, u64) {
    let len = if old.len() == new.len() || rng.random_bool(0.5) { new.len() } else { old.len() };
    let old_at = |i: usize| old.get(i).copied().unwrap_or(0);
    let new_at = |i: usize| new.get(i).copied().unwrap_or_else(|| old_at(i));
    let mut out = Vec::with_capacity(len);
    let mut pages = 0;
    for start in (0..len).step_by(PAGE) {
        let end = (start + PAGE).min(len);
        let o: Vec<u8> = (start..end).map(old_at).collect();
        let n: Vec<u8> = (start..end).map(new_at).collect();
        if o == n {
            out.extend_from_slice(&n);
            continue;
        }
        match rng.random_range(0..20) {
            0..=8 => out.extend_from_slice(&n),
            9..=17 => {
                out.extend_from_slice(&o);
                pages += 1;
            }
            _ => {
                for s in (0..n.len()).step_by(SECTOR) {
                    let e = (s + SECTOR).min(n.len());
                    out.extend_from_slice(if rng.random_bool(0.5) { &o[s..e] } else { &n[s..e] });
                }
                pages += 1;
            }
        }
    }
    (out, pages)
}

/// Applies the undo logs in `undo_dir` to the files under `root`, then removes them: every
/// un-fsynced write is lost, or with `torn`, a random part of them. Logs of files that no
/// longer exist are dropped.
pub fn rollback(root: &Path, undo_dir: &Path, mut torn: Option<&mut rand::rngs::StdRng>) -> Result<Rolled> {
    let mut by_inode: HashMap<u64, PathBuf> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.path().symlink_metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                by_inode.insert(meta.ino(), entry.path());
            }
        }
    }
    let mut rolled = Rolled::default();
    let mut logs: Vec<PathBuf> = match std::fs::read_dir(undo_dir) {
        Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    logs.sort();
    for log in logs {
        let name = log.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
        let ino = name
            .strip_suffix(".undo")
            .and_then(|s| s.split_once('-'))
            .and_then(|(_, ino)| u64::from_str_radix(ino, 16).ok());
        let records = parse(&std::fs::read(&log)?).with_context(|| format!("undo log {}", log.display()))?;
        let (Some(ino), false) = (ino, records.is_empty()) else {
            std::fs::remove_file(&log)?;
            continue;
        };
        let Some(path) = by_inode.get(&ino) else {
            std::fs::remove_file(&log)?;
            continue;
        };
        let now = std::fs::read(path)?;
        let old = undo(&now, &records);
        let (state, pages) = match torn.as_deref_mut() {
            Some(rng) => tear(&old, &now, rng),
            None => {
                let pages = (0..old.len().max(now.len()).div_ceil(PAGE))
                    .filter(|p| {
                        let r = p * PAGE..(p + 1) * PAGE;
                        old.get(r.start..r.end.min(old.len())) != now.get(r.start..r.end.min(now.len()))
                    })
                    .count() as u64;
                (old, pages)
            }
        };
        if state != now {
            rolled.files += 1;
            rolled.pages += pages;
            rolled.resized += u64::from(state.len() != now.len());
            write_in_place(path, &now, &state).with_context(|| format!("rolling back {}", path.display()))?;
        }
        // Only once the file is rolled back: a failure leaves the log to retry with.
        std::fs::remove_file(&log)?;
    }
    Ok(rolled)
}

/// Makes the file at `path` (holding `now`) hold `state`, writing only the pages that differ,
/// so a rollback on a nearly full disk needs as little new space as it can.
fn write_in_place(path: &Path, now: &[u8], state: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    if state.len() < now.len() {
        f.set_len(state.len() as u64)?;
    }
    for start in (0..state.len()).step_by(PAGE) {
        let end = (start + PAGE).min(state.len());
        if now.get(start..end) != Some(&state[start..end]) {
            f.write_all_at(&state[start..end], start as u64)?;
        }
    }
    f.set_len(state.len() as u64)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: u64, old: &[u8], old_size: u64) -> Record {
        Record { offset, old: old.to_vec(), old_size }
    }

    #[test]
    fn undoing_every_record_gives_the_last_fsynced_file() {
        // fsynced: "abcdef"; then pwrite "XY" at 1, append "ghi", truncate to 4.
        let fsynced = b"abcdef".to_vec();
        let mut now = fsynced.clone();
        let mut records = Vec::new();
        records.push(rec(1, &now[1..3], now.len() as u64));
        now[1..3].copy_from_slice(b"XY");
        records.push(rec(6, &[], now.len() as u64));
        now.extend_from_slice(b"ghi");
        records.push(rec(4, &now[4..], now.len() as u64));
        now.truncate(4);
        assert_eq!(now, b"aXYd");
        assert_eq!(undo(&now, &records), fsynced);
    }

    #[test]
    fn a_record_cut_short_is_one_that_never_happened() {
        let mut bytes = Vec::new();
        for (off, old, size) in [(0u64, b"ab".as_slice(), 2u64), (5, b"cdef".as_slice(), 9)] {
            bytes.extend_from_slice(&MAGIC.to_ne_bytes());
            bytes.extend_from_slice(&0u32.to_ne_bytes());
            for w in [off, old.len() as u64, size] {
                bytes.extend_from_slice(&w.to_ne_bytes());
            }
            bytes.extend_from_slice(old);
        }
        assert_eq!(parse(&bytes).unwrap().len(), 2);
        assert_eq!(parse(&bytes[..bytes.len() - 1]).unwrap().len(), 1);
        assert!(parse(&[0u8; 40]).is_err());
    }

    #[test]
    fn a_torn_state_is_made_of_the_two_sides() {
        use rand::SeedableRng;
        let old = vec![1u8; PAGE * 8];
        let new = vec![2u8; PAGE * 10];
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut mixed = false;
        for _ in 0..20 {
            let (t, pages) = tear(&old, &new, &mut rng);
            assert!(t.len() == old.len() || t.len() == new.len());
            for (i, b) in t.iter().enumerate() {
                let o = old.get(i).copied().unwrap_or(0);
                assert!(*b == o || *b == new[i]);
            }
            mixed |= pages > 0 && t.contains(&2);
        }
        assert!(mixed, "some state mixes old and new pages");
    }

    #[test]
    fn a_shrink_that_did_not_persist_cut_nothing() {
        use rand::SeedableRng;
        let old = vec![1u8; PAGE * 10];
        let new = vec![2u8; PAGE * 8];
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for _ in 0..20 {
            let (t, _) = tear(&old, &new, &mut rng);
            assert!(t.len() == old.len() || t.len() == new.len());
            // Past the new end only the old bytes can be there: never zeros.
            assert!(t.iter().enumerate().all(|(i, b)| *b == 1 || (i < new.len() && *b == 2)));
        }
    }

    #[test]
    fn a_record_without_bytes_only_restores_the_size() {
        let now = vec![7u8; 10];
        let records = vec![rec(1 << 40, &[], 4)];
        assert_eq!(undo(&now, &records), vec![7u8; 4]);
    }
}
