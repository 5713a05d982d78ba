//! Which files are sources and when they change: expanding a source's file, folder or glob into
//! spreadsheet paths, telling Excel's and LibreOffice's lock and temp files apart from real
//! spreadsheets, telling from their lock files whether Excel or LibreOffice has a file open
//! ([`open_by`]), fingerprinting files by one `stat` each (size, modification time to the
//! nanosecond, inode), and the file-system event watcher over the sources' folders ([`Watcher`]).
//!
//! This module owns the file system view of the sources. It must not read spreadsheet contents,
//! decide when a file has settled (that is the daemon's loop) or touch the store.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::{Config, SourceConfig, SourcePath};
use crate::workbook::format_of;

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("cannot list {}: {}", path.display(), folder_problem(source))]
    Folder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list {}: the file does not exist", path.display())]
    MissingFile { path: PathBuf },
    #[error("cannot list {pattern}: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
}

/// Whether a file name is one an office program writes while saving or while a file is open,
/// never a source: `~$Name.xlsx` (Excel owner file), `.~lock.Name.xlsx#` (LibreOffice lock),
/// Excel's extension-less temp files such as `A1B2C3D4`, `*.tmp`, and hidden files.
pub fn is_office_temp_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
        return true;
    };
    name.starts_with("~$")
        || name.starts_with(".~lock.")
        || name.starts_with('.')
        || name.ends_with('#')
        || name.ends_with('~')
        || name.to_ascii_lowercase().ends_with(".tmp")
}

/// Whether a path is a spreadsheet this source would sync (ignoring whether it exists).
pub fn is_candidate(path: &Path) -> bool {
    !is_office_temp_file(path) && format_of(path).is_some()
}

/// What a listing of a source found: its files, and the symbolic links that are not sources
/// (with why), for the log and `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovery {
    pub files: Vec<PathBuf>,
    pub not_sources: Vec<(PathBuf, String)>,
}

/// Whether a path the source would sync may be read, decided from one `lstat` (and, for a
/// symbolic link the source follows, where it points).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A regular file.
    File,
    /// A symbolic link the source follows: the file it points to (inside the source's folder).
    Link(PathBuf),
    /// A symbolic link that is not a source, and why.
    NotASource(String),
    /// Gone, or not a file at all.
    Missing,
}

/// Decides whether `path` may be read for `source`. A symbolic link is never followed unless the
/// source sets `follow_symlinks`, and then only to a regular file inside the source's folder.
pub fn admit(source: &SourceConfig, path: &Path) -> Admission {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_symlink() => admit_link(source, path),
        Ok(metadata) if metadata.is_file() => Admission::File,
        _ => Admission::Missing,
    }
}

fn admit_link(source: &SourceConfig, path: &Path) -> Admission {
    if !source.follow_symlinks {
        return Admission::NotASource(
            "is a symbolic link; links are not sources (set follow_symlinks = true for links \
             to files inside the source's folder)"
                .to_string(),
        );
    }
    let folder = source_folder(source);
    let folder = std::fs::canonicalize(&folder).unwrap_or(folder);
    match std::fs::canonicalize(path) {
        Ok(target) if !target.starts_with(&folder) => Admission::NotASource(
            "is a symbolic link to a file outside the source's folder; not a source".to_string(),
        ),
        Ok(target) if target.is_file() => Admission::Link(target),
        _ => Admission::NotASource(
            "is a symbolic link that does not lead to a file; not a source".to_string(),
        ),
    }
}

/// The source's files that exist now, sorted, and the links in its folder that are not sources.
/// A single-file source whose file is missing is an error (about its folder when that is missing
/// too); a folder or glob matching nothing is an empty list. A followed link whose target is itself one of the files is left to that file.
fn list_source(source: &SourceConfig) -> Result<Discovery, DiscoverError> {
    let mut discovery = Discovery::default();
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut take = |path: PathBuf, admission: Admission, discovery: &mut Discovery| match admission
    {
        Admission::File => discovery.files.push(path),
        Admission::Link(target) => links.push((path, target)),
        Admission::NotASource(reason) => discovery.not_sources.push((path, reason)),
        Admission::Missing => {}
    };
    match &source.path {
        SourcePath::File(path) => match admit(source, path) {
            Admission::Missing => {
                // A file whose folder is not there is a share that is not mounted, not a file
                // being saved.
                let folder = source_folder(source);
                if let Err(error) = std::fs::metadata(&folder) {
                    return Err(DiscoverError::Folder {
                        path: folder,
                        source: error,
                    });
                }
                return Err(DiscoverError::MissingFile { path: path.clone() });
            }
            admission => take(path.clone(), admission, &mut discovery),
        },
        SourcePath::Folder(folder) => {
            let entries = std::fs::read_dir(folder).map_err(|source| DiscoverError::Folder {
                path: folder.clone(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| DiscoverError::Folder {
                    path: folder.clone(),
                    source,
                })?;
                let path = entry.path();
                if !is_candidate(&path) {
                    continue;
                }
                // The entry's type comes with the directory listing: no extra stat per file.
                let admission = match entry.file_type() {
                    Ok(file_type) if file_type.is_file() => Admission::File,
                    Ok(file_type) if file_type.is_symlink() => admit_link(source, &path),
                    _ => Admission::Missing,
                };
                take(path, admission, &mut discovery);
            }
        }
        SourcePath::Glob(pattern) => {
            // A pattern over a folder that is not there matches nothing, which is not "no
            // files": the share may not be mounted.
            let folder = source_folder(source);
            if let Err(error) = std::fs::metadata(&folder) {
                return Err(DiscoverError::Folder {
                    path: folder,
                    source: error,
                });
            }
            let paths = glob::glob(pattern).map_err(|source| DiscoverError::Pattern {
                pattern: pattern.clone(),
                source,
            })?;
            let folder = source_folder(source);
            let folder = std::fs::canonicalize(&folder).unwrap_or(folder);
            let mut checked_parents: std::collections::HashMap<PathBuf, bool> =
                std::collections::HashMap::new();
            for path in paths
                .filter_map(Result::ok)
                .filter(|path| is_candidate(path))
            {
                let mut admission = admit(source, &path);
                // A glob that walks folders could walk through a linked folder out of the share.
                if admission == Admission::File {
                    let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
                    let inside = *checked_parents.entry(parent.clone()).or_insert_with(|| {
                        std::fs::canonicalize(&parent)
                            .is_ok_and(|parent| parent.starts_with(&folder))
                    });
                    if !inside {
                        admission = Admission::NotASource(
                            "is reached through a symbolic link to a folder outside the source's \
                             folder; not a source"
                                .to_string(),
                        );
                    }
                }
                take(path, admission, &mut discovery);
            }
        }
    }
    for (link, target) in links {
        if discovery.files.contains(&target) {
            discovery.not_sources.push((
                link,
                format!(
                    "is a symbolic link to {}, which is synced under its own name",
                    target
                        .file_name()
                        .map(|name| name.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ),
            ));
        } else {
            discovery.files.push(link);
        }
    }
    discovery.files.sort();
    discovery.not_sources.sort();
    Ok(discovery)
}

/// A source's files as they are now, without the report file, and the symbolic links beside
/// them that are not sources (one listing of the folder).
pub fn discover(config: &Config, source: &SourceConfig) -> Result<Discovery, DiscoverError> {
    let mut discovery = list_source(source)?;
    discovery.files.retain(|file| !config.is_report(file));
    Ok(discovery)
}

/// A source's files as they are now, without the report file (see [`discover`]).
pub fn source_files(config: &Config, source: &SourceConfig) -> Result<Vec<PathBuf>, DiscoverError> {
    discover(config, source).map(|discovery| discovery.files)
}

impl DiscoverError {
    /// The file, folder or pattern that could not be listed.
    pub fn path(&self) -> PathBuf {
        match self {
            DiscoverError::Folder { path, .. } | DiscoverError::MissingFile { path } => {
                path.clone()
            }
            DiscoverError::Pattern { pattern, .. } => PathBuf::from(pattern),
        }
    }
}

/// Why a source folder cannot be listed, in words an admin can act on.
fn folder_problem(error: &std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::NotFound {
        "the folder does not exist (is the share mounted?)".to_string()
    } else {
        error.to_string()
    }
}

/// Removes funnelsync's own temp files (`.~funnelsync-*.tmp`) left in a source's folder by a
/// write that was killed before its rename. Returns how many were removed.
pub fn remove_stale_temp_files(source: &SourceConfig) -> usize {
    let folder = source_folder(source);
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return 0;
    };
    let mut n_removed = 0;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".~funnelsync-")
            && name.ends_with(".tmp")
            && std::fs::remove_file(entry.path()).is_ok()
        {
            n_removed += 1;
        }
    }
    n_removed
}

/// The folder a source lives in: where to watch for it.
pub fn source_folder(source: &SourceConfig) -> PathBuf {
    match &source.path {
        SourcePath::File(path) => path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
        SourcePath::Folder(folder) => folder.clone(),
        SourcePath::Glob(pattern) => {
            // The longest leading part of the pattern without wildcards.
            let mut folder = PathBuf::new();
            for component in Path::new(pattern).components() {
                let text = component.as_os_str().to_string_lossy();
                if text.contains(['*', '?', '[']) {
                    break;
                }
                folder.push(component);
            }
            folder
        }
    }
}

/// Whether `path` belongs to the source (it may not exist any more).
pub fn source_matches(source: &SourceConfig, path: &Path) -> bool {
    if !is_candidate(path) {
        return false;
    }
    match &source.path {
        SourcePath::File(file) => file == path,
        SourcePath::Folder(folder) => path.parent() == Some(folder.as_path()),
        SourcePath::Glob(pattern) => {
            glob::Pattern::new(pattern).is_ok_and(|pattern| pattern.matches_path(path))
        }
    }
}

/// The lock file that says a program has `path` open, if there is one: Excel's `~$NAME` owner
/// file (Excel drops the first two characters of long names) or LibreOffice's `.~lock.NAME#`.
pub fn open_by(path: &Path) -> Option<(&'static str, PathBuf)> {
    let folder = path.parent()?;
    let name = path.file_name()?.to_str()?;
    let libreoffice = folder.join(format!(".~lock.{name}#"));
    if libreoffice.exists() {
        return Some(("LibreOffice", libreoffice));
    }
    let mut excel_names = vec![format!("~${name}")];
    let characters: Vec<char> = name.chars().collect();
    if characters.len() > 2 {
        excel_names.push(format!("~${}", characters[2..].iter().collect::<String>()));
    }
    if characters.len() > 1 {
        excel_names.push(format!("~${}", characters[1..].iter().collect::<String>()));
    }
    excel_names
        .into_iter()
        .map(|owner| folder.join(owner))
        .find(|owner| owner.exists())
        .map(|owner| ("Excel", owner))
}

/// What one `stat` says about a file: enough to tell that it changed without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub size: u64,
    pub modified_seconds: i64,
    pub modified_nanoseconds: i64,
    pub inode: u64,
}

impl Fingerprint {
    /// How long ago (by this machine's clock) the file was last modified; zero for a time in the
    /// future, as a server with a skewed clock may report.
    pub fn age(&self) -> std::time::Duration {
        let modified = std::time::UNIX_EPOCH
            + std::time::Duration::new(
                self.modified_seconds.max(0) as u64,
                self.modified_nanoseconds.clamp(0, 999_999_999) as u32,
            );
        std::time::SystemTime::now()
            .duration_since(modified)
            .unwrap_or_default()
    }
}

/// The fingerprint of a file, or `None` when it is gone (or is not a regular file).
pub fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let metadata = std::fs::metadata(path).ok()?;
    if !metadata.is_file() {
        return None;
    }
    Some(Fingerprint {
        size: metadata.size(),
        modified_seconds: metadata.mtime(),
        modified_nanoseconds: metadata.mtime_nsec(),
        inode: metadata.ino(),
    })
}

/// A file-system watcher over the sources' folders (inotify on Linux). Dropping it stops it.
pub struct Watcher {
    _inner: notify::RecommendedWatcher,
    /// The folders it could not watch, with why (their files are seen by rescans only).
    unwatched: Vec<String>,
}

/// What the watcher tells.
#[derive(Debug)]
pub enum WatchEvent {
    /// Something happened to a path that may be a source and may have new content.
    Changed(PathBuf),
    /// The watcher failed (an event queue overflowed, a watched folder went away).
    Failed(notify::Error),
}

impl Watcher {
    /// Starts watching every source's folder, handing each event to `deliver` (on the watcher's
    /// own thread). Returns `None`, after saying why, when no watcher can start; a folder that
    /// cannot be watched is left to polling and said so.
    pub fn start(
        config: &Config,
        deliver: impl Fn(WatchEvent) + Send + 'static,
    ) -> Option<Watcher> {
        use notify::Watcher as _;
        let handler = move |result: notify::Result<notify::Event>| match result {
            Ok(event) if is_change(&event.kind) => {
                for path in event.paths {
                    if is_candidate(&path) {
                        deliver(WatchEvent::Changed(path));
                    } else {
                        tracing::debug!(file = %path.display(), "not a source (a lock, temp or other file)");
                    }
                }
            }
            Ok(_) => {}
            Err(error) => deliver(WatchEvent::Failed(error)),
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(watcher) => watcher,
            Err(error) => {
                tracing::warn!(
                    "cannot start the file watcher, polling every {:?} instead: {error}",
                    config.watch.poll_interval
                );
                return None;
            }
        };
        let mut unwatched = Vec::new();
        for (folder, mode) in watch_roots(&config.sources) {
            match watcher.watch(&folder, mode) {
                Ok(()) => tracing::debug!(folder = %folder.display(), "watching"),
                Err(error) => {
                    tracing::warn!(
                        folder = %folder.display(),
                        "cannot watch this folder for events; it is polled every {:?} instead: {error}",
                        config.watch.poll_interval
                    );
                    unwatched.push(format!("cannot watch {}: {error}", folder.display()));
                }
            }
        }
        Some(Watcher {
            _inner: watcher,
            unwatched,
        })
    }

    /// The folders it could not watch, with why.
    pub fn unwatched(&self) -> &[String] {
        &self.unwatched
    }
}

/// Whether a file-system event may mean new content. Opening and reading (funnelsync's own reads
/// among them) do not; closing after writing does.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    use notify::EventKind;
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// The folders to watch for a set of sources, and whether each needs its subfolders too (a glob
/// with a wildcard in a folder part).
fn watch_roots(sources: &[SourceConfig]) -> Vec<(PathBuf, notify::RecursiveMode)> {
    let mut roots: Vec<(PathBuf, notify::RecursiveMode)> = Vec::new();
    for source in sources {
        let folder = source_folder(source);
        let recursive = match &source.path {
            SourcePath::Glob(pattern) => Path::new(pattern)
                .parent()
                .is_some_and(|parent| parent.to_string_lossy().contains(['*', '?', '['])),
            _ => false,
        };
        let mode = if recursive {
            notify::RecursiveMode::Recursive
        } else {
            notify::RecursiveMode::NonRecursive
        };
        match roots.iter_mut().find(|(root, _)| *root == folder) {
            Some(existing) if recursive => existing.1 = mode,
            Some(_) => {}
            None => roots.push((folder, mode)),
        }
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn office_temp_files_are_not_sources() {
        for name in [
            "~$Pipeline.xlsx",
            ".~lock.Pipeline.xlsx#",
            "A1B2C3D4",
            "Pipeline.xlsx.tmp",
            "~WRL0001.tmp",
            ".hidden.xlsx",
            "notes.txt",
        ] {
            assert!(!is_candidate(Path::new(name)), "{name} must be ignored");
        }
        for name in [
            "Pipeline.xlsx",
            "销售管道.XLSX",
            "leads.csv",
            "old.xls",
            "team.ods",
            "macro.xlsm",
        ] {
            assert!(is_candidate(Path::new(name)), "{name} must be a candidate");
        }
    }
}
