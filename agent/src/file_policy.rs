//! Which paths file streams may touch (PROTOCOL.md section 11.5): decided from the open
//! parameters and the `[files]` allow-list alone, before anything is opened, so a refusal
//! leaves the device untouched. No I/O here except where noted (symlink resolution is the
//! caller's, see `files.rs`).

use std::path::{Component, Path, PathBuf};

use crate::config::FilesSpec;

/// Longest file name accepted for a put: the partial file's name adds the SHA-256 (64) and
/// a few characters, and a name in most file systems is at most 255 bytes.
const MAX_NAME: usize = 160;

/// Where a `file-put` goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PutTarget {
    /// The receive directory.
    pub(crate) dir: PathBuf,
    /// The file's final path.
    pub(crate) path: PathBuf,
    /// The partial file, named after the file and its SHA-256 so that only a transfer of the
    /// same content resumes from it; hidden, in the same directory so the rename is atomic.
    pub(crate) part: PathBuf,
}

/// The target of `file-put;name=NAME` with content `sha256`, or the reason it is refused.
pub(crate) fn put_target(spec: &FilesSpec, name: &str, sha256: &str) -> Result<PutTarget, String> {
    let Some(default_dir) = spec.receive_dirs.first() else {
        return Err(format!(
            "file-put of {name}: this device receives no files (files.receive_dirs is not on \
             its allow-list)"
        ));
    };
    let (dir, file) = if name.starts_with('/') {
        let path = Path::new(name);
        if !is_clean_absolute(path) {
            return Err(format!(
                "file-put of {name}: an absolute name may not contain . or .. components"
            ));
        }
        let (Some(parent), Some(file)) = (path.parent(), path.file_name()) else {
            return Err(format!("file-put of {name}: names no file"));
        };
        let Some(dir) = spec.receive_dirs.iter().find(|d| d.as_path() == parent) else {
            return Err(format!(
                "file-put to {name}: directory {} is not on this device's allow-list \
                 (files.receive_dirs)",
                parent.display()
            ));
        };
        (dir.clone(), file.to_string_lossy().into_owned())
    } else {
        (default_dir.clone(), name.to_owned())
    };
    if file.is_empty()
        || file == "."
        || file == ".."
        || file.contains('/')
        || file.starts_with('.')
        || file.len() > MAX_NAME
    {
        return Err(format!(
            "file-put of {name}: the file name must be 1-{MAX_NAME} bytes, without '/', and \
             not start with '.'"
        ));
    }
    Ok(PutTarget {
        path: dir.join(&file),
        part: dir.join(format!(".{file}.{sha256}.part")),
        dir,
    })
}

/// Where a `file-put` of `size` bytes starts when the manager allows skipping `offset` and
/// the partial file holds `have`: a partial file longer than the file cannot be of it.
pub(crate) fn put_start(offset: u64, have: u64, size: u64) -> u64 {
    if have > size { 0 } else { offset.min(have) }
}

/// The path of `file-get;path=PATH` if the allow-list has it, else the reason it is
/// refused. The caller checks the path again once symlinks are resolved.
pub(crate) fn get_allowed(spec: &FilesSpec, path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if !is_clean_absolute(p) {
        return Err(format!(
            "file-get of {path}: the path must be absolute, without . or .. components"
        ));
    }
    if allowed_to_send(spec, p) {
        Ok(p.to_owned())
    } else {
        Err(format!(
            "file-get of {path}: the path is not on this device's allow-list (files.send)"
        ))
    }
}

/// Whether `path` (absolute, clean) is a listed file or below a listed directory.
pub(crate) fn allowed_to_send(spec: &FilesSpec, path: &Path) -> bool {
    spec.send.iter().any(|entry| match entry.strip_suffix('/') {
        Some(dir) => path.starts_with(Path::new(dir)) && path != Path::new(dir),
        None => path == Path::new(entry),
    })
}

fn is_clean_absolute(p: &Path) -> bool {
    p.is_absolute()
        && !p.as_os_str().as_encoded_bytes().ends_with(b"/")
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        // `components` hides "a/./b" and "a//b"; the text must be as clean as the result.
        && !p.to_string_lossy().contains("/./")
        && !p.to_string_lossy().contains("//")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn spec() -> FilesSpec {
        FilesSpec {
            receive_dirs: vec!["/srv/in".into(), "/opt/updates".into()],
            send: vec!["/var/log/syslog".into(), "/var/log/app/".into()],
        }
    }

    #[test]
    fn bare_names_go_to_the_first_directory_absolute_ones_to_theirs() {
        let t = put_target(&spec(), "fw.bin", SHA).expect("allowed");
        assert_eq!(t.path, Path::new("/srv/in/fw.bin"));
        assert_eq!(t.part, Path::new(&format!("/srv/in/.fw.bin.{SHA}.part")));
        let t = put_target(&spec(), "/opt/updates/fw.bin", SHA).expect("allowed");
        assert_eq!(t.dir, Path::new("/opt/updates"));
    }

    #[test]
    fn puts_outside_the_receive_directories_are_refused_by_name() {
        for name in [
            "/etc/passwd",
            "/srv/in/sub/x",
            "/srv/in/../etc/x",
            "/srv/in/./x",
            "../x",
            "a/b",
            ".hidden",
            "/srv/in/",
        ] {
            let e = put_target(&spec(), name, SHA).expect_err(name);
            assert!(e.contains(name), "{e}");
        }
        let e = put_target(&spec(), "/etc/passwd", SHA).expect_err("refused");
        assert!(
            e.contains("directory /etc is not on this device's allow-list"),
            "{e}"
        );
        let none = FilesSpec::default();
        assert!(put_target(&none, "x", SHA).is_err());
    }

    #[test]
    fn a_put_resumes_at_what_the_device_holds_if_the_manager_allows_it() {
        assert_eq!(put_start(100, 40, 100), 40, "resume");
        assert_eq!(put_start(0, 40, 100), 0, "the manager starts over");
        assert_eq!(put_start(10, 40, 100), 10, "the manager skips less");
        assert_eq!(
            put_start(100, 100, 100),
            100,
            "all there: only the check is left"
        );
        assert_eq!(
            put_start(100, 150, 100),
            0,
            "longer than the file: not of it"
        );
    }

    #[test]
    fn gets_only_of_listed_files_and_below_listed_directories() {
        assert!(get_allowed(&spec(), "/var/log/syslog").is_ok());
        assert!(get_allowed(&spec(), "/var/log/app/today.log").is_ok());
        assert!(get_allowed(&spec(), "/var/log/app/sub/x.log").is_ok());
        for path in [
            "/etc/shadow",
            "/var/log/app",
            "/var/log/app/../../../etc/shadow",
            "/var/log/syslog.1",
            "var/log/syslog",
            "/var/log//syslog",
        ] {
            let e = get_allowed(&spec(), path).expect_err(path);
            assert!(e.contains(path), "{e}");
        }
    }
}
