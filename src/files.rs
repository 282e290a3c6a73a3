//! Files a run writes, made without following a symbolic link planted at their name: a link at
//! `RUN/metrics.h5.new` or in a checkpoint's folder must not make the run truncate what it
//! points to outside the run. A file is replaced, never rewritten in place: whatever sits at the
//! name (a link, an old file) is removed, and the new file is created with O_CREAT | O_EXCL |
//! O_NOFOLLOW, which fails rather than follow a link that reappears in between. New files take
//! the run's own modes (0666 less the umask), never those of a file they copy.
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A new, empty file at `path` for writing, replacing a file or link there.
pub fn create(path: &Path) -> std::io::Result<File> {
    clear(path)?;
    OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// `bytes` as the new file `path` (see `create`).
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    create(path)?.write_all(bytes)
}

/// The contents of `from` as the new file `to` (see `create`): the copy has the run's modes.
pub fn copy(from: &Path, to: &Path) -> std::io::Result<u64> {
    std::io::copy(&mut File::open(from)?, &mut create(to)?)
}

/// Removes the file or link at `path`, if any, so that a library creating a file there (HDF5, a
/// PNG encoder) makes a new one rather than follow a link. A folder there is left alone: the
/// creation then fails with its name.
pub fn clear(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.is_dir() => std::fs::remove_file(path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_planted_link_is_replaced_never_followed_and_copies_take_the_run_modes() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o666)).unwrap();
        let link = dir.path().join("link");
        for how in ["write", "copy", "clear"] {
            std::os::unix::fs::symlink(&victim, &link).unwrap();
            match how {
                "write" => write(&link, b"new").unwrap(),
                "copy" => {
                    copy(&victim, &link).unwrap();
                    let mode = std::fs::metadata(&link).unwrap().permissions().mode() & 0o777;
                    assert_eq!(mode & 0o002, 0, "the copy of a world-writable file is not world-writable: {mode:o}");
                }
                _ => clear(&link).unwrap(),
            }
            assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "{how}");
            assert!(!std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()), "{how}");
            let _ = std::fs::remove_file(&link);
        }
    }
}
