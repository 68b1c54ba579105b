//! Files that hold secrets (TLS private keys, API keys, backup keyrings, JWT secrets): read
//! only when no group or other user may read them, written 0600 through a fsynced temp file
//! and a rename, never over an existing file unless asked. Secrets never live in the config.

use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

/// Reads a secret file; refuses one that group or others may access.
pub fn read_private(path: &Path) -> io::Result<Zeroizing<Vec<u8>>> {
    let meta = std::fs::metadata(path).map_err(|e| annotate(path, e))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is accessible by group or others (mode {:o}); run `chmod 600` on it",
                path.display(),
                mode & 0o777
            ),
        ));
    }
    Ok(Zeroizing::new(std::fs::read(path).map_err(|e| annotate(path, e))?))
}

/// Writes `data` to `path` with mode 0600 (temp file, fsync, rename). Refuses to replace an
/// existing file unless `overwrite`.
pub fn write_private(path: &Path, data: &[u8], overwrite: bool) -> io::Result<()> {
    if !overwrite && path.exists() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} already exists", path.display())));
    }
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::now_v7()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| annotate(path, e))
}

fn annotate(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_open_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        write_private(&p, b"s3cret", false).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(&read_private(&p).unwrap()[..], b"s3cret");
        assert_eq!(write_private(&p, b"x", false).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_private(&p).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        write_private(&p, b"new", true).unwrap();
        assert_eq!(&read_private(&p).unwrap()[..], b"new");
    }
}
