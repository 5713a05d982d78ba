//! Replacing a file on the share safely: the new content goes to a temp file beside the old one,
//! is fsynced, given the old file's owner, group and permissions, the old version is kept as a
//! backup, and the two are swapped atomically only if nobody saved the file meanwhile.
//!
//! Everything here works on directory handles (`openat`, `renameat`, `unlinkat`), never on paths
//! that could lead somewhere else: a file that is a symbolic link is never replaced, and the
//! `.funnelsync` and `.funnelsync/backups` folders are refused when they are links or belong to
//! someone other than the service user. This module owns the file-system side of a write-back.
//! It must not know what the content is: the format writers hand it a closure that writes into
//! the temp file.

use std::collections::HashSet;
use std::ffi::CStr;
use std::io::{Seek, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, RenameFlags, Stat, Uid};
use sha2::{Digest, Sha256};

use super::WriteError;
use crate::watch::Fingerprint;

/// The name of funnelsync's own folder beside the files it writes.
const PRIVATE_FOLDER: &str = ".funnelsync";
const BACKUP_FOLDER: &str = "backups";
/// The time stamp in a backup's name: `20261128T101010.123Z`, always 20 characters.
const STAMP_FORMAT: &str = "%Y%m%dT%H%M%S%.3fZ";
const STAMP_LEN: usize = 20;

/// Why a backup could not be kept (and so the file was not written).
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot create {}: {source}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot inspect {}: {source}", path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is a symbolic link; funnelsync never follows links for files it creates or deletes",
        path.display()
    )]
    Link { path: PathBuf },
    #[error("{} is not a folder", path.display())]
    NotAFolder { path: PathBuf },
    #[error(
        "{} is owned by user id {owner}, not by the service user (user id {service_user}); \
         funnelsync refuses to keep backups in a folder someone else controls",
        path.display()
    )]
    ForeignOwner {
        path: PathBuf,
        owner: u32,
        service_user: u32,
    },
    #[error(
        "{} can be written by other users (mode {mode:04o}) and funnelsync could not restrict it; \
         it refuses to keep backups where someone else could swap or remove them",
        path.display()
    )]
    WritableByOthers { path: PathBuf, mode: u32 },
    #[error("{source}")]
    Write {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove the old backup {name}: {source}")]
    RemoveOld {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// A file created in a folder (by handle) that is removed again unless it was renamed away.
struct TempEntry<'a> {
    folder: &'a OwnedFd,
    name: String,
    file: std::fs::File,
    armed: bool,
}

impl TempEntry<'_> {
    /// Creates a new, empty file readable by the service only, under a fresh random name that
    /// starts with `prefix`. `O_EXCL` and `O_NOFOLLOW`: it never opens something that was there.
    fn create<'a>(folder: &'a OwnedFd, prefix: &str) -> std::io::Result<TempEntry<'a>> {
        let mut attempt = 0u32;
        loop {
            let name = format!("{prefix}{:016x}.tmp", random_suffix(attempt));
            match rustix::fs::openat(
                folder,
                name.as_str(),
                OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            ) {
                Ok(fd) => {
                    return Ok(TempEntry {
                        folder,
                        name,
                        file: std::fs::File::from(fd),
                        armed: true,
                    })
                }
                Err(rustix::io::Errno::EXIST) if attempt < 100 => attempt += 1,
                Err(errno) => return Err(errno.into()),
            }
        }
    }

    /// The entry was renamed or exchanged: whatever is at its name now is not ours to remove.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for TempEntry<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = rustix::fs::unlinkat(self.folder, self.name.as_str(), AtFlags::empty());
        }
    }
}

/// A name part that differs between attempts and between processes.
fn random_suffix(attempt: u32) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(attempt);
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

/// Opens the folder a source file lives in. The folder itself is configured by the admin and may
/// be reached through links; everything below it is opened relative to this handle.
fn open_folder(folder: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        rustix::fs::CWD,
        folder,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// One `lstat` of an entry of a folder: a link is reported as a link, never followed.
fn stat_entry(folder: &OwnedFd, name: &str) -> std::io::Result<Stat> {
    Ok(rustix::fs::statat(folder, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

fn fingerprint_of(stat: &Stat) -> Option<Fingerprint> {
    (FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile).then_some(Fingerprint {
        size: stat.st_size as u64,
        modified_seconds: stat.st_mtime,
        modified_nanoseconds: stat.st_mtime_nsec as i64,
        inode: stat.st_ino,
    })
}

/// The fingerprint of a folder's entry, or `None` when it is gone or is not a regular file (a
/// link included).
fn fingerprint_at(folder: &OwnedFd, name: &str) -> Option<Fingerprint> {
    stat_entry(folder, name)
        .ok()
        .and_then(|stat| fingerprint_of(&stat))
}

/// Files whose owner could not be kept, so the warning is logged once per file and process.
fn warned_ownership() -> &'static Mutex<HashSet<PathBuf>> {
    static WARNED: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    WARNED.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Gives a new file the owner, group and permission bits of `original`, as far as the service is
/// allowed to: owner and group when it may (it runs as root, or owns the file already), else the
/// group at least (when the service user is a member), else neither — with one warning per file.
/// Set-user-ID, set-group-ID and sticky bits are never copied: the file now comes from the
/// service. A file whose group could not be kept loses its group permissions, so it is never
/// more readable than the original.
fn copy_ownership(
    file: &std::fs::File,
    original: &Stat,
    path_for_messages: &Path,
) -> std::io::Result<()> {
    let uid = Uid::from_raw(original.st_uid);
    let gid = Gid::from_raw(original.st_gid);
    let mut mode = original.st_mode & 0o777;
    let owner_kept = rustix::fs::fchown(file, Some(uid), Some(gid)).is_ok();
    if !owner_kept {
        let group_kept = rustix::fs::fchown(file, None, Some(gid)).is_ok();
        if !group_kept {
            mode &= !0o070;
        }
        let first_time = warned_ownership()
            .lock()
            .map(|mut warned| warned.insert(path_for_messages.to_path_buf()))
            .unwrap_or(true);
        if first_time {
            tracing::warn!(
                file = %path_for_messages.display(),
                owner = original.st_uid,
                group = original.st_gid,
                "the service may not give the rewritten file its owner{}; {}",
                if group_kept { "" } else { " or its group" },
                if group_kept {
                    "it keeps its group and permissions but is now owned by the service user"
                } else {
                    "it is now owned by the service user and its group permissions were removed"
                }
            );
        }
    }
    rustix::fs::fchmod(file, Mode::from_raw_mode(mode))?;
    Ok(())
}

/// Writes new content for `path` through `build` into a temp file in the same folder, fsyncs it,
/// gives it the old file's owner, group and permissions, keeps a backup of `original` (the bytes
/// the sync read), and swaps it in — unless the file changed since `fingerprint_before`, is open
/// now, or is a symbolic link. Returns the SHA-256 of the new content (hex) and what `build`
/// returned.
pub(super) fn replace_file<T>(
    path: &Path,
    original: &std::fs::File,
    fingerprint_before: Option<Fingerprint>,
    n_backups: usize,
    build: impl FnOnce(&mut dyn super::WriteSeek) -> Result<T, WriteError>,
) -> Result<(String, T), WriteError> {
    let io_error = |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    };
    let folder_path = path
        .parent()
        .filter(|folder| !folder.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
        return Err(WriteError::Unsupported {
            path: path.to_path_buf(),
            reason: "its name is not valid UTF-8".to_string(),
        });
    };
    let folder = open_folder(folder_path).map_err(io_error)?;
    let current = stat_entry(&folder, name).map_err(io_error)?;
    match FileType::from_raw_mode(current.st_mode) {
        FileType::RegularFile => {}
        FileType::Symlink => {
            return Err(super::WriteError::Unsupported {
                path: path.to_path_buf(),
                reason: "it is a symbolic link; funnelsync never replaces a link with a file"
                    .to_string(),
            })
        }
        _ => {
            return Err(WriteError::Unsupported {
                path: path.to_path_buf(),
                reason: "it is not a regular file".to_string(),
            })
        }
    }
    if fingerprint_of(&current) != fingerprint_before {
        return Err(WriteError::ChangedMeanwhile {
            path: path.to_path_buf(),
        });
    }
    let mut temp = TempEntry::create(&folder, ".~funnelsync-").map_err(io_error)?;
    let built = {
        let mut writer = std::io::BufWriter::with_capacity(1 << 16, &temp.file);
        let built = build(&mut writer)?;
        writer.flush().map_err(io_error)?;
        built
    };
    // The new content's hash, read back from the temp file: the zip writer seeks, so the bytes
    // cannot be hashed on their way out.
    let content_hash = {
        let mut file = &temp.file;
        file.seek(std::io::SeekFrom::Start(0)).map_err(io_error)?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher).map_err(io_error)?;
        hasher
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    };
    // The new file keeps the old one's owner, group and permissions, so the team can still open
    // it and nobody else can.
    copy_ownership(&temp.file, &current, path).map_err(io_error)?;
    temp.file.sync_all().map_err(io_error)?;
    if n_backups > 0 {
        keep_backup(&folder, folder_path, name, original, &current, n_backups).map_err(
            |source| WriteError::Backup {
                path: path.to_path_buf(),
                folder: folder_path.join(PRIVATE_FOLDER).join(BACKUP_FOLDER),
                source,
            },
        )?;
    }
    // A save that happened while we built the new content wins; we read it again next time.
    if fingerprint_at(&folder, name) != fingerprint_before || crate::watch::open_by(path).is_some()
    {
        return Err(WriteError::ChangedMeanwhile {
            path: path.to_path_buf(),
        });
    }
    // Swap the new file in atomically and look at what came out: if it is not the file we read
    // (someone saved in the last instant), swap back, so their save is never lost. Where the file
    // system cannot exchange (network shares), a plain rename is the fallback.
    match rustix::fs::renameat_with(
        &folder,
        temp.name.as_str(),
        &folder,
        name,
        RenameFlags::EXCHANGE,
    ) {
        Ok(()) => {
            if fingerprint_at(&folder, &temp.name) != fingerprint_before {
                let swapped_back = rustix::fs::renameat_with(
                    &folder,
                    temp.name.as_str(),
                    &folder,
                    name,
                    RenameFlags::EXCHANGE,
                );
                if swapped_back.is_err() {
                    // Their save now sits at the temp name: it must not be removed.
                    temp.disarm();
                }
                return Err(WriteError::ChangedMeanwhile {
                    path: path.to_path_buf(),
                });
            }
            // The old version, now at the temp name, is removed when `temp` is dropped.
        }
        Err(_) => {
            rustix::fs::renameat(&folder, temp.name.as_str(), &folder, name)
                .map_err(|errno| io_error(errno.into()))?;
            temp.disarm();
        }
    }
    drop(temp);
    let _ = rustix::fs::fsync(&folder);
    Ok((content_hash, built))
}

/// Opens (creating it if needed) a folder funnelsync keeps its own files in, refusing one that
/// is a symbolic link, not a folder, or not owned by the service user: someone else could make
/// it point anywhere, or swap what is inside.
fn open_private_folder(
    parent: &OwnedFd,
    name: &str,
    shown_as: &Path,
) -> Result<OwnedFd, BackupError> {
    let open = || {
        rustix::fs::openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let folder = match open() {
        Ok(folder) => folder,
        Err(rustix::io::Errno::NOENT) => {
            match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o750)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(errno) => {
                    return Err(BackupError::Create {
                        path: shown_as.to_path_buf(),
                        source: errno.into(),
                    })
                }
            }
            open().map_err(|errno| describe_open_failure(parent, name, shown_as, errno))?
        }
        Err(errno) => return Err(describe_open_failure(parent, name, shown_as, errno)),
    };
    let stat = rustix::fs::fstat(&folder).map_err(|errno| BackupError::Inspect {
        path: shown_as.to_path_buf(),
        source: errno.into(),
    })?;
    let service_user = rustix::process::geteuid().as_raw();
    if stat.st_uid != service_user {
        return Err(BackupError::ForeignOwner {
            path: shown_as.to_path_buf(),
            owner: stat.st_uid,
            service_user,
        });
    }
    // A folder others may write to lets them remove or replace the backups in it (links inside
    // are never followed, but a backup could be swapped for another file). The service owns the
    // folder, so it takes write access from group and others; a mount that ignores modes keeps
    // it open, and such a folder is refused.
    const WRITABLE_BY_OTHERS: u32 = 0o022;
    let mode = stat.st_mode & 0o7777;
    if mode & WRITABLE_BY_OTHERS != 0 {
        let restricted = mode & !WRITABLE_BY_OTHERS;
        let _ = rustix::fs::fchmod(&folder, Mode::from_raw_mode(restricted));
        let now = rustix::fs::fstat(&folder)
            .map(|stat| stat.st_mode & 0o7777)
            .unwrap_or(mode);
        if now & WRITABLE_BY_OTHERS != 0 {
            return Err(BackupError::WritableByOthers {
                path: shown_as.to_path_buf(),
                mode: now,
            });
        }
        tracing::warn!(
            "{} could be written by other users (mode {mode:04o}); funnelsync took that away \
             (mode {now:04o}) because it keeps backups there",
            shown_as.display()
        );
    }
    Ok(folder)
}

fn describe_open_failure(
    parent: &OwnedFd,
    name: &str,
    shown_as: &Path,
    errno: rustix::io::Errno,
) -> BackupError {
    let path = shown_as.to_path_buf();
    let is_link = stat_entry(parent, name)
        .is_ok_and(|stat| FileType::from_raw_mode(stat.st_mode) == FileType::Symlink);
    if is_link {
        BackupError::Link { path }
    } else if errno == rustix::io::Errno::NOTDIR {
        BackupError::NotAFolder { path }
    } else {
        BackupError::Open {
            path,
            source: errno.into(),
        }
    }
}

/// The backup name of `file_name` at `stamp`: `NAME.STAMP.EXT` (`q.xlsx` → `q.20261128T101010.123Z.xlsx`),
/// so a backup still opens in Excel.
fn backup_name(file_name: &str, stamp: &str) -> String {
    match file_name.rsplit_once('.') {
        Some((stem, extension)) if !stem.is_empty() => format!("{stem}.{stamp}.{extension}"),
        _ => format!("{file_name}.{stamp}"),
    }
}

/// Whether `entry` is a backup of `file_name`: exactly [`backup_name`] with a well-formed stamp.
/// Exactly, so the backups of `q.2025.xlsx` are never taken for those of `q.xlsx`.
fn is_backup_of(entry: &str, file_name: &str) -> bool {
    let (head, tail) = match file_name.rsplit_once('.') {
        Some((stem, extension)) if !stem.is_empty() => {
            (format!("{stem}."), format!(".{extension}"))
        }
        _ => (format!("{file_name}."), String::new()),
    };
    let Some(stamp) = entry
        .strip_prefix(head.as_str())
        .and_then(|rest| rest.strip_suffix(tail.as_str()))
    else {
        return false;
    };
    stamp.len() == STAMP_LEN && chrono::NaiveDateTime::parse_from_str(stamp, STAMP_FORMAT).is_ok()
}

/// Copies the old content to `.funnelsync/backups/NAME.YYYYmmddTHHMMSS.fffZ.EXT` beside the file
/// and keeps the newest `n_backups` of that file. The backup gets the file's owner, group and
/// permissions, is written under a temp name and renamed only once complete and fsynced, so a
/// failed write never leaves a partial backup that counts in the rotation.
fn keep_backup(
    source_folder: &OwnedFd,
    source_folder_path: &Path,
    file_name: &str,
    original: &std::fs::File,
    original_stat: &Stat,
    n_backups: usize,
) -> Result<(), BackupError> {
    let private_path = source_folder_path.join(PRIVATE_FOLDER);
    let backups_path = private_path.join(BACKUP_FOLDER);
    let private = open_private_folder(source_folder, PRIVATE_FOLDER, &private_path)?;
    let backups = open_private_folder(&private, BACKUP_FOLDER, &backups_path)?;
    let io_text = |source: std::io::Error| BackupError::Write { source };
    let stamp = chrono::Utc::now().format(STAMP_FORMAT).to_string();
    let final_name = backup_name(file_name, &stamp);
    let mut temp =
        TempEntry::create(&backups, &format!(".~funnelsync-{file_name}.")).map_err(io_text)?;
    {
        let mut reader = original;
        reader.rewind().map_err(io_text)?;
        let mut writer = std::io::BufWriter::with_capacity(1 << 16, &temp.file);
        std::io::copy(&mut reader, &mut writer).map_err(io_text)?;
        writer.flush().map_err(io_text)?;
    }
    copy_ownership(
        &temp.file,
        original_stat,
        &source_folder_path.join(file_name),
    )
    .map_err(io_text)?;
    temp.file.sync_all().map_err(io_text)?;
    rustix::fs::renameat(&backups, temp.name.as_str(), &backups, final_name.as_str())
        .map_err(|errno| io_text(errno.into()))?;
    temp.disarm();
    drop(temp);
    let _ = rustix::fs::fsync(&backups);

    let mut kept: Vec<String> = Vec::new();
    let listing = rustix::fs::Dir::read_from(&backups).map_err(|errno| io_text(errno.into()))?;
    for entry in listing {
        let entry = entry.map_err(|errno| io_text(errno.into()))?;
        let Some(entry_name) = c_name(entry.file_name()) else {
            continue;
        };
        if !is_backup_of(&entry_name, file_name) {
            continue;
        }
        // Only regular files are backups; anything else with such a name is left alone.
        let is_file = stat_entry(&backups, &entry_name)
            .is_ok_and(|stat| FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile);
        if is_file {
            kept.push(entry_name);
        }
    }
    // The stamp sorts by time, and all names of one file differ only in the stamp.
    kept.sort();
    let excess = kept.len().saturating_sub(n_backups);
    for old in &kept[..excess] {
        rustix::fs::unlinkat(&backups, old.as_str(), AtFlags::empty()).map_err(|errno| {
            BackupError::RemoveOld {
                name: old.clone(),
                source: errno.into(),
            }
        })?;
    }
    Ok(())
}

fn c_name(name: &CStr) -> Option<String> {
    name.to_str().ok().map(str::to_string)
}

/// Whether funnelsync's own folders beside `path` are safe to use: used by tests and by callers
/// that want to report a bad backup folder before writing. Kept private to the module's tests.
#[cfg(test)]
fn private_folder_problem(folder: &Path) -> Option<BackupError> {
    let handle = open_folder(folder).ok()?;
    open_private_folder(&handle, PRIVATE_FOLDER, &folder.join(PRIVATE_FOLDER))
        .and_then(|private| {
            open_private_folder(
                &private,
                BACKUP_FOLDER,
                &folder.join(PRIVATE_FOLDER).join(BACKUP_FOLDER),
            )
        })
        .err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backups_of_one_file_never_match_another() {
        let stamp = "20261128T101010.123Z";
        let cases = [
            ("q.xlsx", "q.20261128T101010.123Z.xlsx", true),
            ("q.2025.xlsx", "q.2025.20261128T101010.123Z.xlsx", true),
            ("q.xlsx", "q.2025.20261128T101010.123Z.xlsx", false),
            ("q.2025.xlsx", "q.20261128T101010.123Z.xlsx", false),
            ("a.csv", "a.1-important.csv", false),
            ("a.csv", "a.20261128T101010.123Z.xlsx", false),
            ("a.csv", "a.20261128T101010.123Z.csv.tmp", false),
            ("a.csv", ".~funnelsync-a.csv.0123456789abcdef.tmp", false),
        ];
        for (file_name, entry, expected) in cases {
            assert_eq!(
                is_backup_of(entry, file_name),
                expected,
                "{file_name} / {entry}"
            );
        }
        assert!(is_backup_of(&backup_name("q.xlsx", stamp), "q.xlsx"));
        assert!(is_backup_of(
            &backup_name("noextension", stamp),
            "noextension"
        ));
    }

    #[test]
    fn a_symlinked_backup_folder_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let victim = dir.path().join("victim");
        std::fs::create_dir_all(&victim).expect("victim");
        std::fs::create_dir_all(dir.path().join("share/.funnelsync")).expect("share");
        std::os::unix::fs::symlink(&victim, dir.path().join("share/.funnelsync/backups"))
            .expect("link");
        let problem = private_folder_problem(&dir.path().join("share")).expect("refused");
        assert!(
            matches!(&problem, BackupError::Link { path } if path.ends_with("share/.funnelsync/backups")),
            "{problem}"
        );
    }
}
