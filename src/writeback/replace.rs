//! Replacing a file on the share safely: the new content goes to a temp file beside the old one,
//! is fsynced, the old version is kept as a backup, and the two are swapped atomically only if
//! nobody saved the file meanwhile.
//!
//! This module owns the file-system side of a write-back. It must not know what the content is:
//! the format writers hand it a closure that writes into the temp file.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::WriteError;
use crate::watch::Fingerprint;

/// Writes new content for `path` through `build` into a temp file in the same folder, fsyncs it,
/// keeps a backup of `original` (the bytes the sync read), and swaps it in — unless the file
/// changed since `fingerprint_before` or is open now. Returns the SHA-256 of the new content
/// (hex) and what `build` returned.
pub(super) fn replace_file<T>(
    path: &Path,
    original: &[u8],
    fingerprint_before: Option<Fingerprint>,
    n_backups: usize,
    build: impl FnOnce(&mut dyn super::WriteSeek) -> Result<T, WriteError>,
) -> Result<(String, T), WriteError> {
    let io_error = |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    };
    let folder = path.parent().unwrap_or(Path::new("."));
    let temp = tempfile::Builder::new()
        .prefix(".~funnelsync-")
        .suffix(".tmp")
        .tempfile_in(folder)
        .map_err(io_error)?;
    let built = {
        let mut writer = std::io::BufWriter::with_capacity(1 << 16, temp.as_file());
        let built = build(&mut writer)?;
        writer.flush().map_err(io_error)?;
        built
    };
    // The new content's hash, read back from the temp file: the zip writer seeks, so the bytes
    // cannot be hashed on their way out.
    let content_hash = {
        let mut file = temp.reopen().map_err(io_error)?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher).map_err(io_error)?;
        hasher
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    };
    if let Ok(metadata) = std::fs::metadata(path) {
        // The new file keeps the old one's permissions, so the team can still open it.
        std::fs::set_permissions(temp.path(), metadata.permissions()).map_err(io_error)?;
    }
    temp.as_file().sync_all().map_err(io_error)?;
    if n_backups > 0 {
        keep_backup(path, original, n_backups).map_err(io_error)?;
    }
    // A save that happened while we built the new content wins; we read it again next time.
    if crate::watch::fingerprint(path) != fingerprint_before || super::open_by(path).is_some() {
        return Err(WriteError::ChangedMeanwhile {
            path: path.to_path_buf(),
        });
    }
    // Swap the new file in atomically and look at what came out: if it is not the file we read
    // (someone saved in the last instant), swap back, so their save is never lost. Where the file
    // system cannot exchange (network shares), a plain rename is the fallback.
    let temp_path = temp.into_temp_path();
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        &*temp_path,
        rustix::fs::CWD,
        path,
        rustix::fs::RenameFlags::EXCHANGE,
    ) {
        Ok(()) => {
            if crate::watch::fingerprint(&temp_path) != fingerprint_before {
                let _ = rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &*temp_path,
                    rustix::fs::CWD,
                    path,
                    rustix::fs::RenameFlags::EXCHANGE,
                );
                return Err(WriteError::ChangedMeanwhile {
                    path: path.to_path_buf(),
                });
            }
            // The old version, now at the temp path, is removed when `temp_path` is dropped.
        }
        Err(_) => {
            temp_path
                .persist(path)
                .map_err(|error| io_error(error.error))?;
        }
    }
    if let Ok(folder_handle) = std::fs::File::open(folder) {
        let _ = folder_handle.sync_all();
    }
    Ok((content_hash, built))
}

/// Copies the old content to `.funnelsync/backups/NAME.YYYYmmddTHHMMSS.ext` and keeps the newest
/// `n_backups` of that file.
pub(super) fn keep_backup(path: &Path, original: &[u8], n_backups: usize) -> std::io::Result<()> {
    let folder = path
        .parent()
        .unwrap_or(Path::new("."))
        .join(".funnelsync")
        .join("backups");
    std::fs::create_dir_all(&folder)?;
    let stem = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    let extension = path
        .extension()
        .map(|extension| extension.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    std::fs::write(folder.join(format!("{stem}.{stamp}.{extension}")), original)?;
    let prefix = format!("{stem}.");
    let mut backups: Vec<PathBuf> = std::fs::read_dir(&folder)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|backup| {
            backup
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| {
                    name.starts_with(&prefix)
                        && name.ends_with(&format!(".{extension}"))
                        && name[prefix.len()..].starts_with(|c: char| c.is_ascii_digit())
                })
        })
        .collect();
    backups.sort();
    let excess = backups.len().saturating_sub(n_backups);
    for old in &backups[..excess] {
        std::fs::remove_file(old)?;
    }
    Ok(())
}
