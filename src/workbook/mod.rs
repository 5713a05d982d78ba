//! Reading spreadsheet files into plain rows of cells: .xlsx/.xlsm/.xls/.ods through calamine and
//! .csv through csv-core (delimiter sniffed, encoding decided per file).
//!
//! Memory is bounded while reading, not after: the file is never held whole (it is hashed and
//! parsed from its open handle), rows are held sparsely, every cell is checked against
//! `[limits]` before it is kept, and the XML parts of a zip are scanned with a fixed budget before
//! calamine sees them ([`xml_guard`]) — an .xlsx's worksheets as calamine reads them, on a thread
//! of their own ([`guarded_zip`]), every other part before calamine opens the file — so a file
//! refused for a limit never costs more than a few buffers.
//!
//! This module owns file formats and nothing else: it knows sheets, rows and cells, and how a
//! half-written or protected file looks, but not what a column means, what a deal is or where the
//! store lives. Errors say whether trying again later can help ([`WorkbookError::is_retryable`]).

pub mod csv_reader;
mod escape;
mod guarded_zip;
mod ods_guard;
pub mod xml_guard;

use guarded_zip::GuardedZip;

pub use escape::{escape_csv_field, unescape_csv_field};

use std::fmt;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use calamine::{Data, DataRef, Reader, SheetType, SheetVisible};
use chrono::NaiveDateTime;
use compact_str::CompactString;
use sha2::{Digest, Sha256};

/// File extensions (lower case) funnelsync reads.
pub const SUPPORTED_EXTENSIONS: [&str; 5] = ["xlsx", "xlsm", "xls", "ods", "csv"];

/// Safe maximums against hostile or broken input (the config's `[limits]`). Beyond them a file is
/// refused, nothing of it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_file_bytes: u64,
    pub max_unzipped_bytes: u64,
    /// The uncompressed size of an .xlsx's shared-strings part: calamine holds every shared
    /// string, used or not, while it reads the sheet.
    pub max_shared_strings_bytes: u64,
    pub max_rows: usize,
    pub max_columns: usize,
    pub max_cell_chars: usize,
}

impl Limits {
    /// No limit at all: for reading again a file already read under the configured ones.
    pub fn unbounded() -> Limits {
        Limits {
            max_file_bytes: u64::MAX,
            max_unzipped_bytes: u64::MAX,
            max_shared_strings_bytes: u64::MAX,
            max_rows: usize::MAX,
            max_columns: usize::MAX,
            max_cell_chars: usize::MAX,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_file_bytes: 100 << 20,
            max_unzipped_bytes: 1 << 30,
            max_shared_strings_bytes: 256 << 20,
            max_rows: 1_048_576,
            max_columns: 1_000,
            max_cell_chars: 32_767,
        }
    }
}

/// The text encoding of a source's .csv files (the config's `encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsvEncoding {
    /// UTF-8 (with or without BOM), UTF-16 with a BOM, else GB18030.
    Auto,
    Fixed(&'static encoding_rs::Encoding),
}

/// One cell's value, independent of the file format.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Empty,
    /// Held inline when at most 24 bytes long, as most cells of a pipeline sheet are: such a
    /// cell is part of its row, not a string of its own to allocate, hand to the other core and
    /// free.
    Text(CompactString),
    Number(f64),
    Bool(bool),
    DateTime(NaiveDateTime),
    /// An error value such as `#N/A` or `#DIV/0!`.
    Error(String),
}

impl Cell {
    pub fn is_empty(&self) -> bool {
        match self {
            Cell::Empty => true,
            // Most texts start with a visible ASCII character: only the others need trimming to
            // tell (a vertical tab is whitespace to `trim`, not to `is_ascii_whitespace`).
            Cell::Text(text) => match text.as_bytes().first() {
                None => true,
                Some(first) if first.is_ascii_graphic() => false,
                Some(_) => text.trim().is_empty(),
            },
            _ => false,
        }
    }

    /// The cell as text, as [`fmt::Display`] writes it: a text cell's own text, borrowed (most
    /// cells of a pipeline sheet are text, and cleaning them should not copy each twice).
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Cell::Text(text) => std::borrow::Cow::Borrowed(text),
            other => std::borrow::Cow::Owned(other.to_string()),
        }
    }
}

impl fmt::Display for Cell {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cell::Empty => Ok(()),
            Cell::Text(text) => formatter.write_str(text),
            Cell::Number(number) => formatter.write_str(&crate::deal::format_amount(*number)),
            Cell::Bool(value) => formatter.write_str(if *value { "TRUE" } else { "FALSE" }),
            Cell::DateTime(datetime) => {
                if datetime.time() == chrono::NaiveTime::MIN {
                    write!(formatter, "{}", datetime.format("%Y-%m-%d"))
                } else {
                    write!(formatter, "{}", datetime.format("%Y-%m-%d %H:%M:%S"))
                }
            }
            Cell::Error(error) => formatter.write_str(error),
        }
    }
}

/// One non-empty row of a sheet, held sparsely: a row with one value at column XFD holds one
/// cell, not 16,384.
#[derive(Debug, Clone, PartialEq)]
pub struct SheetRow {
    /// The row number as Excel shows it (1-based).
    pub row_number: u32,
    /// The non-empty cells by 0-based column index, in column order.
    cells: Vec<(u32, Cell)>,
    /// The columns whose cell holds a formula (only .xlsx/.xlsm say), in column order.
    pub formula_columns: Vec<u32>,
}

impl SheetRow {
    /// A row from its cells in column order (empty ones are not kept).
    #[cfg(test)]
    pub fn new(row_number: u32, cells: Vec<Cell>) -> SheetRow {
        let mut row = SheetRow {
            row_number,
            cells: Vec::new(),
            formula_columns: Vec::new(),
        };
        for (column_idx, cell) in cells.into_iter().enumerate() {
            row.set(u32::try_from(column_idx).unwrap_or(u32::MAX), cell);
        }
        row
    }

    /// The cell in a column (empty when the row has nothing there).
    pub fn cell(&self, column_idx: usize) -> &Cell {
        let Ok(column_idx) = u32::try_from(column_idx) else {
            return &Cell::Empty;
        };
        match self
            .cells
            .binary_search_by_key(&column_idx, |(column, _)| *column)
        {
            Ok(position) => &self.cells[position].1,
            Err(_) => &Cell::Empty,
        }
    }

    /// One past the last column with a value (0 for a row without values).
    pub fn width(&self) -> usize {
        self.cells
            .last()
            .map(|(column_idx, _)| *column_idx as usize + 1)
            .unwrap_or(0)
    }

    /// The non-empty cells with their 0-based column index, in column order.
    pub fn cells(&self) -> impl Iterator<Item = (usize, &Cell)> + '_ {
        self.cells
            .iter()
            .map(|(column_idx, cell)| (*column_idx as usize, cell))
    }

    /// Whether the row holds no value at all.
    pub fn is_blank(&self) -> bool {
        self.cells.is_empty()
    }

    /// A hash of the row's cells as written (each value with its kind and column), leaving out
    /// one column (the key column, which funnelsync itself fills in). Two rows hash alike only
    /// when a spreadsheet shows them alike; the hash is stable across runs and versions.
    pub fn raw_hash(&self, except_column: Option<usize>) -> i64 {
        // The cells are laid out in one buffer and hashed at once: XXH3 over the concatenation is
        // the same value as fed piece by piece, without a copy into the hasher's state per piece.
        let mut bytes: Vec<u8> = Vec::with_capacity(256);
        for (column_idx, cell) in &self.cells {
            if except_column == Some(*column_idx as usize) {
                continue;
            }
            bytes.extend_from_slice(&column_idx.to_le_bytes());
            match cell {
                Cell::Empty => bytes.push(0),
                Cell::Text(text) => {
                    bytes.push(1);
                    bytes.extend_from_slice(&(text.len() as u64).to_le_bytes());
                    bytes.extend_from_slice(text.as_bytes());
                }
                Cell::Number(number) => {
                    bytes.push(2);
                    bytes.extend_from_slice(&number.to_bits().to_le_bytes());
                }
                Cell::Bool(value) => bytes.extend_from_slice(&[3, u8::from(*value)]),
                Cell::DateTime(datetime) => {
                    bytes.push(4);
                    bytes.extend_from_slice(&datetime.and_utc().timestamp_micros().to_le_bytes());
                }
                Cell::Error(error) => {
                    bytes.push(5);
                    bytes.extend_from_slice(&(error.len() as u64).to_le_bytes());
                    bytes.extend_from_slice(error.as_bytes());
                }
            }
        }
        // Stored in an SQLite INTEGER: the same 64 bits, signed.
        xxhash_rust::xxh3::xxh3_64(&bytes) as i64
    }

    fn set(&mut self, column_idx: u32, cell: Cell) {
        if cell.is_empty() {
            return;
        }
        match self.cells.last() {
            Some((last, _)) if *last < column_idx => self.cells.push((column_idx, cell)),
            None => self.cells.push((column_idx, cell)),
            Some(_) => match self
                .cells
                .binary_search_by_key(&column_idx, |(column, _)| *column)
            {
                Ok(position) => self.cells[position].1 = cell,
                Err(position) => self.cells.insert(position, (column_idx, cell)),
            },
        }
    }
}

/// No spreadsheet has more columns than this (XFD): a .csv record with more fields, empty or
/// not, is refused as soon as it gets there.
pub const MOST_COLUMNS: u32 = 16_384;

/// A cell over a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A value in a column at or past `max_columns`.
    Column { column_idx: u32 },
    /// A .csv record with more fields than [`MOST_COLUMNS`].
    TooManyFields,
    /// A text over `max_cell_chars`: its length, when it was counted to the end.
    Text {
        column_idx: u32,
        n_chars: Option<usize>,
    },
}

/// Where a collector puts the rows it completes: nowhere (a check that keeps nothing), or a sink
/// that takes them in batches as the reader goes.
enum Keep<'a> {
    Nothing,
    Batches {
        /// Completed rows not handed over yet, then the row being filled.
        rows: Vec<SheetRow>,
        sink: &'a mut dyn FnMut(Vec<SheetRow>) -> Result<(), WorkbookError>,
        /// How many cells the last completed row has.
        width: usize,
    },
}

/// How many rows a streaming collector hands over at a time.
pub const ROW_BATCH: usize = 512;

/// Takes cells as a reader finds them and checks each against the limits before anything is kept
/// for it: its column, its length, and the number of rows. A counting collector keeps nothing; a
/// streaming one hands the sparse rows to a sink in batches, so that memory does not grow with the
/// sheet.
pub struct RowCollector<'a> {
    path: &'a Path,
    pub(crate) limits: &'a Limits,
    keep: Keep<'a>,
    n_rows: usize,
    last_row: Option<u32>,
}

impl<'a> RowCollector<'a> {
    pub fn counting(path: &'a Path, limits: &'a Limits) -> RowCollector<'a> {
        RowCollector {
            path,
            limits,
            keep: Keep::Nothing,
            n_rows: 0,
            last_row: None,
        }
    }

    pub fn streaming(
        path: &'a Path,
        limits: &'a Limits,
        sink: &'a mut dyn FnMut(Vec<SheetRow>) -> Result<(), WorkbookError>,
    ) -> RowCollector<'a> {
        RowCollector {
            keep: Keep::Batches {
                rows: Vec::with_capacity(ROW_BATCH + 1),
                sink,
                width: 0,
            },
            ..RowCollector::counting(path, limits)
        }
    }

    /// Hands the last rows to a streaming collector's sink.
    pub fn finish(&mut self) -> Result<(), WorkbookError> {
        if let Keep::Batches { rows, sink, .. } = &mut self.keep {
            if !rows.is_empty() {
                sink(std::mem::take(rows))?;
            }
        }
        Ok(())
    }

    pub fn keeps_cells(&self) -> bool {
        !matches!(self.keep, Keep::Nothing)
    }

    /// Whether a non-empty cell in this column (with this text) goes past a limit.
    pub fn violation(&self, column_idx: u32, text: Option<&str>) -> Option<Violation> {
        if column_idx as usize >= self.limits.max_columns {
            return Some(Violation::Column { column_idx });
        }
        let text = text?;
        // A cheap bound first: a text of n bytes has at most n characters.
        if text.len() <= self.limits.max_cell_chars {
            return None;
        }
        let n_chars = text.chars().count();
        (n_chars > self.limits.max_cell_chars).then_some(Violation::Text {
            column_idx,
            n_chars: Some(n_chars),
        })
    }

    /// The error for a cell over a limit in the row at `row_idx` (0-based).
    pub fn refusal(&self, row_idx: u32, violation: Violation) -> WorkbookError {
        let row_number = u64::from(row_idx) + 1;
        let (what, limit) = match violation {
            Violation::Column { column_idx } => (
                format!(
                    "row {row_number} with a value in column {} (column {})",
                    column_letters(column_idx as usize),
                    u64::from(column_idx) + 1
                ),
                format!("{} columns", self.limits.max_columns),
            ),
            Violation::TooManyFields => (
                format!(
                    "row {row_number} with more than {MOST_COLUMNS} fields (no spreadsheet has \
                     that many columns)"
                ),
                format!("{MOST_COLUMNS} columns"),
            ),
            Violation::Text {
                column_idx,
                n_chars,
            } => (
                format!(
                    "the text in row {row_number}, column {} ({} characters)",
                    column_letters(column_idx as usize),
                    match n_chars {
                        Some(n_chars) => n_chars.to_string(),
                        None => format!("more than {}", self.limits.max_cell_chars),
                    }
                ),
                format!("{} characters", self.limits.max_cell_chars),
            ),
        };
        WorkbookError::OverLimit {
            path: self.path.to_path_buf(),
            what,
            limit,
        }
    }

    /// Takes one cell at (row, column), both 0-based.
    pub fn push(
        &mut self,
        row_idx: u32,
        column_idx: u32,
        value: Cell,
    ) -> Result<(), WorkbookError> {
        if value.is_empty() {
            return Ok(());
        }
        let text = match &value {
            Cell::Text(text) => Some(text.as_str()),
            _ => None,
        };
        if let Some(violation) = self.violation(column_idx, text) {
            return Err(self.refusal(row_idx, violation));
        }
        self.start_row(row_idx)?;
        let row = match &mut self.keep {
            Keep::Nothing => None,
            Keep::Batches { rows, .. } => rows.last_mut(),
        };
        if let Some(row) = row {
            row.set(column_idx, value);
        }
        Ok(())
    }

    /// Notes that the cell at (row, column), both 0-based, holds a formula.
    pub fn mark_formula(&mut self, row_idx: u32, column_idx: u32) -> Result<(), WorkbookError> {
        if column_idx as usize >= self.limits.max_columns {
            return Ok(());
        }
        self.start_row(row_idx)?;
        let row = match &mut self.keep {
            Keep::Nothing => None,
            Keep::Batches { rows, .. } => rows.last_mut(),
        };
        if let Some(row) = row {
            if row
                .formula_columns
                .last()
                .is_none_or(|last| *last < column_idx)
            {
                row.formula_columns.push(column_idx);
            } else if !row.formula_columns.contains(&column_idx) {
                row.formula_columns.push(column_idx);
                row.formula_columns.sort_unstable();
            }
        }
        Ok(())
    }

    /// Makes the row at `row_idx` (0-based) the current one, counting it against the limits.
    fn start_row(&mut self, row_idx: u32) -> Result<(), WorkbookError> {
        let row_number = row_idx.saturating_add(1);
        if self.last_row != Some(row_number) {
            self.n_rows += 1;
            if self.n_rows > self.limits.max_rows {
                return Err(WorkbookError::OverLimit {
                    path: self.path.to_path_buf(),
                    what: format!("the number of rows (more than {})", self.limits.max_rows),
                    limit: format!("{} rows", self.limits.max_rows),
                });
            }
            self.last_row = Some(row_number);
            match &mut self.keep {
                Keep::Nothing => {}
                Keep::Batches { rows, sink, width } => {
                    // Rows of a sheet are mostly as wide as the one before: sized so, a row's
                    // cells are gathered in one allocation instead of four growing ones.
                    if let Some(row) = rows.last() {
                        *width = row.cells.len();
                    }
                    // The rows before the new one are complete.
                    if rows.len() >= ROW_BATCH {
                        sink(std::mem::take(rows))?;
                    }
                    rows.push(SheetRow {
                        row_number,
                        cells: Vec::with_capacity(*width),
                        formula_columns: Vec::new(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Xlsx,
    Xls,
    Ods,
    Csv,
}

/// How a .csv file was written, so that it can be written back the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvFormat {
    pub delimiter: u8,
    pub encoding: &'static encoding_rs::Encoding,
    pub has_bom: bool,
    /// Lines end with CR LF (as Excel writes them) rather than LF.
    pub line_ending_crlf: bool,
}

/// The sheet of a file that funnelsync manages, read whole.
#[derive(Debug, Clone)]
pub struct SheetData {
    pub path: PathBuf,
    pub format: FileFormat,
    pub sheet_name: String,
    /// Non-empty rows in order.
    pub rows: Vec<SheetRow>,
    /// SHA-256 of the file's bytes, hex.
    pub content_hash: String,
    /// The file's modification time.
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
    pub csv_format: Option<CsvFormat>,
    /// The cells of the sheet that hold a formula, as (Excel row number, 0-based column), in
    /// sheet order. Only .xlsx/.xlsm report them; the write-back never overwrites them.
    pub formula_cells: Vec<(u32, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkbookError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a complete workbook yet (it may still be being saved): {detail}")]
    Incomplete { path: PathBuf, detail: String },
    /// As [`WorkbookError::Incomplete`], for the archive's own error (ZIP or I/O), kept whole.
    #[error("{path} is not a complete workbook yet (it may still be being saved): {source}")]
    IncompleteRead {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{path} is password-protected; funnelsync cannot read encrypted workbooks")]
    Encrypted { path: PathBuf },
    #[error("{path}: sheet \"{sheet}\" not found (sheets: {})", available.join(", "))]
    SheetNotFound {
        path: PathBuf,
        sheet: String,
        available: Vec<String>,
    },
    #[error("{path} has no visible worksheet")]
    NoVisibleSheet { path: PathBuf },
    #[error("{path} is not a {expected} file: {detail}")]
    Malformed {
        path: PathBuf,
        expected: &'static str,
        detail: String,
    },
    /// As [`WorkbookError::Malformed`], for the reader's own error, kept whole.
    #[error("{path} is not a {expected} file: {source}")]
    Rejected {
        path: PathBuf,
        expected: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{path}: unsupported file type (funnelsync reads .xlsx .xlsm .xls .ods .csv)")]
    Unsupported { path: PathBuf },
    #[error("{path}: {what} is over the limit of {limit}; nothing was read (raise [limits] if the file is genuine)")]
    OverLimit {
        path: PathBuf,
        what: String,
        limit: String,
    },
}

impl WorkbookError {
    /// Whether reading the same file again later may succeed without anyone fixing it: it may be
    /// locked or half-written by the program saving it. A file that is malformed (an XML entity
    /// attack, NUL bytes, text in no known encoding), over a limit, encrypted or without its sheet
    /// stays so until someone saves a new version.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            WorkbookError::Io { .. }
                | WorkbookError::Incomplete { .. }
                | WorkbookError::IncompleteRead { .. }
        )
    }

    /// The archive could not be read whole: see [`WorkbookError::IncompleteRead`].
    fn incomplete_read(
        path: &Path,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> WorkbookError {
        WorkbookError::IncompleteRead {
            path: path.to_path_buf(),
            source: Box::new(source),
        }
    }

    /// The reader (or the write-back re-reading the file) refused it: see
    /// [`WorkbookError::Rejected`].
    pub(crate) fn rejected(
        path: &Path,
        expected: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> WorkbookError {
        WorkbookError::Rejected {
            path: path.to_path_buf(),
            expected,
            source: Box::new(source),
        }
    }
}

/// The format a path's extension names, if funnelsync reads it.
pub fn format_of(path: &Path) -> Option<FileFormat> {
    let extension = path.extension()?.to_str()?.to_ascii_lowercase();
    match extension.as_str() {
        "xlsx" | "xlsm" => Some(FileFormat::Xlsx),
        "xls" => Some(FileFormat::Xls),
        "ods" => Some(FileFormat::Ods),
        "csv" => Some(FileFormat::Csv),
        _ => None,
    }
}

/// Reads the managed sheet of a file: the named sheet, or the first visible worksheet.
pub fn read_sheet(
    path: &Path,
    sheet: Option<&str>,
    csv_encoding: CsvEncoding,
    limits: &Limits,
) -> Result<SheetData, WorkbookError> {
    let opened = open_file(path, limits)?;
    let mut stream = SheetStream::start(opened, sheet, csv_encoding, limits)?;
    let mut rows = Vec::new();
    while let Some(batch) = stream.next_rows()? {
        rows.extend(batch);
    }
    let formula_cells = rows
        .iter()
        .flat_map(|row: &SheetRow| {
            row.formula_columns
                .iter()
                .map(move |column_idx| (row.row_number, *column_idx))
        })
        .collect();
    Ok(SheetData {
        path: stream.path.clone(),
        format: stream.format,
        sheet_name: stream.sheet_name.clone(),
        rows,
        content_hash: stream.content_hash.clone(),
        modified: stream.modified,
        csv_format: stream.end().and_then(|end| end.csv_format.clone()),
        formula_cells,
    })
}

/// What one `fstat` says about an open file: enough to notice it changed while being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    size: u64,
    modified_seconds: i64,
    modified_nanoseconds: i64,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path, file: &std::fs::File) -> Result<FileStamp, WorkbookError> {
        use std::os::unix::fs::MetadataExt;
        let metadata = file.metadata().map_err(|source| WorkbookError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(FileStamp {
            size: metadata.size(),
            modified_seconds: metadata.mtime(),
            modified_nanoseconds: metadata.mtime_nsec(),
            inode: metadata.ino(),
        })
    }
}

/// A file opened for one sync: its handle (opened without following a link), the SHA-256 of its
/// bytes, read once in a streaming pass, and (for a .csv) what that pass learnt about its
/// encoding. Parsing reads the same handle again, so the hash and the rows describe the same
/// file; a file written to meanwhile is noticed and read again later.
pub struct OpenedFile {
    path: PathBuf,
    file: std::fs::File,
    stamp: FileStamp,
    content_hash: String,
    census: Option<csv_reader::Utf8Census>,
}

impl OpenedFile {
    /// SHA-256 of the file's bytes, hex.
    pub fn content_hash(&self) -> &str {
        &self.content_hash
    }
}

fn open_no_follow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// Opens a file for reading — never through a symbolic link: the caller resolved a followed link
/// to its target already, so a link here was put in place since — refuses it beyond
/// `max_file_mb`, and hashes it in one streaming pass.
pub fn open_file(path: &Path, limits: &Limits) -> Result<OpenedFile, WorkbookError> {
    let io_error = |source| WorkbookError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = open_no_follow(path).map_err(io_error)?;
    let stamp = FileStamp::of(path, &file)?;
    if stamp.size > limits.max_file_bytes {
        return Err(WorkbookError::OverLimit {
            path: path.to_path_buf(),
            what: format!("the file size ({} MB)", stamp.size >> 20),
            limit: format!("{} MB", limits.max_file_bytes >> 20),
        });
    }
    let mut census =
        (format_of(path) == Some(FileFormat::Csv)).then(csv_reader::Utf8Census::default);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 << 10];
    let mut n_total: u64 = 0;
    loop {
        let n_read = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n_read) => n_read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(io_error(error)),
        };
        n_total += n_read as u64;
        if n_total > limits.max_file_bytes {
            // It grew past the limit while being read.
            return Err(WorkbookError::Incomplete {
                path: path.to_path_buf(),
                detail: "the file changed while it was being read".to_string(),
            });
        }
        hasher.update(&buffer[..n_read]);
        if let Some(census) = &mut census {
            census.feed(&buffer[..n_read]);
        }
    }
    if let Some(census) = &mut census {
        census.finish();
    }
    Ok(OpenedFile {
        path: path.to_path_buf(),
        file,
        stamp,
        content_hash: hex(&hasher.finalize()),
        census,
    })
}

/// The managed sheet of a file, read on a thread of its own while the caller works on the rows
/// already read: parsing uses one core, mapping and applying the other. Rows come in batches
/// through a bounded channel, so no more than a few batches are ever held.
pub struct SheetStream {
    pub path: PathBuf,
    pub format: FileFormat,
    pub sheet_name: String,
    /// SHA-256 of the file's bytes, hex.
    pub content_hash: String,
    /// The file's modification time.
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
    receiver: std::sync::mpsc::Receiver<Message>,
    /// Rows the reader of the stream is done with, on their way back to the reading thread.
    spent: std::sync::mpsc::Sender<Vec<SheetRow>>,
    end: Option<StreamEnd>,
}

enum Message {
    Piece(Piece),
    End(Result<StreamEnd, WorkbookError>),
}

/// How many batches of rows may wait between the reading thread and the caller.
const BATCHES_IN_FLIGHT: usize = 4;

impl SheetStream {
    /// Starts reading an opened file (from [`open_file`]). Returns once the managed sheet is
    /// known, or with the error that stopped the read before it got there.
    pub fn start(
        opened: OpenedFile,
        sheet: Option<&str>,
        csv_encoding: CsvEncoding,
        limits: &Limits,
    ) -> Result<SheetStream, WorkbookError> {
        let path = opened.path.clone();
        let format = format_of(&path).ok_or_else(|| WorkbookError::Unsupported {
            path: path.to_path_buf(),
        })?;
        let content_hash = opened.content_hash.clone();
        let stamp = opened.stamp;
        let modified = std::time::UNIX_EPOCH
            .checked_add(std::time::Duration::new(
                u64::try_from(stamp.modified_seconds).unwrap_or(0),
                u32::try_from(stamp.modified_nanoseconds).unwrap_or(0),
            ))
            .map(chrono::DateTime::<chrono::Utc>::from);
        let (sender, receiver) = std::sync::mpsc::sync_channel(BATCHES_IN_FLIGHT);
        let (spent, spent_receiver) = std::sync::mpsc::channel::<Vec<SheetRow>>();
        let wanted = sheet.map(str::to_string);
        let limits = *limits;
        let spawned = std::thread::Builder::new()
            .name("funnelsync-read".to_string())
            .spawn(move || {
                let OpenedFile {
                    path,
                    mut file,
                    stamp,
                    census,
                    ..
                } = opened;
                let mut emit = |piece: Piece| {
                    // The rows given back are freed here, before the next are made: the
                    // allocator serves this thread's next cells from what it frees itself.
                    while let Ok(rows) = spent_receiver.try_recv() {
                        drop(rows);
                    }
                    sender.send(Message::Piece(piece)).map_err(|_| {
                        // The caller stopped listening: nothing more to read for.
                        WorkbookError::Incomplete {
                            path: path.clone(),
                            detail: "the read was stopped".to_string(),
                        }
                    })
                };
                let read = guarded(&path, || {
                    stream_format(
                        &path,
                        &mut file,
                        format,
                        wanted.as_deref(),
                        csv_encoding,
                        census.as_ref(),
                        &limits,
                        &mut emit,
                    )
                });
                // The rows must describe the bytes that were hashed.
                let read = read.and_then(|end| {
                    if FileStamp::of(&path, &file)? != stamp {
                        return Err(WorkbookError::Incomplete {
                            path: path.to_path_buf(),
                            detail: "the file changed while it was being read".to_string(),
                        });
                    }
                    Ok(end)
                });
                let _ = sender.send(Message::End(read));
            });
        if let Err(source) = spawned {
            return Err(WorkbookError::Io { path, source });
        }
        let mut stream = SheetStream {
            path,
            format,
            sheet_name: String::new(),
            content_hash,
            modified,
            receiver,
            spent,
            end: None,
        };
        match stream.receive()? {
            Some(Piece::Sheet(name)) => stream.sheet_name = name,
            Some(Piece::Rows(_)) | None => {
                return Err(WorkbookError::Malformed {
                    path: stream.path.clone(),
                    expected: "readable workbook",
                    detail: "the reader gave rows before the sheet".to_string(),
                })
            }
        }
        Ok(stream)
    }

    fn receive(&mut self) -> Result<Option<Piece>, WorkbookError> {
        if self.end.is_some() {
            return Ok(None);
        }
        match self.receiver.recv() {
            Ok(Message::Piece(piece)) => Ok(Some(piece)),
            Ok(Message::End(Ok(end))) => {
                self.end = Some(end);
                Ok(None)
            }
            Ok(Message::End(Err(error))) => Err(error),
            Err(_) => Err(WorkbookError::Malformed {
                path: self.path.clone(),
                expected: "readable workbook",
                detail: "the reader stopped without a word".to_string(),
            }),
        }
    }

    /// The next batch of rows, or `None` once the whole sheet was read (then [`Self::end`] says
    /// what was learnt at the end).
    pub fn next_rows(&mut self) -> Result<Option<Vec<SheetRow>>, WorkbookError> {
        loop {
            match self.receive()? {
                Some(Piece::Rows(rows)) => return Ok(Some(rows)),
                Some(Piece::Sheet(_)) => continue,
                None => return Ok(None),
            }
        }
    }

    /// Hands rows the caller is done with back to the reading thread, which frees them. Memory
    /// freed by the thread that got it is quickest to free and to get again (the allocator keeps
    /// a cache per thread); freed on the other core, every cell of a sheet cost both threads a
    /// trip through the allocator's shared, locked lists.
    pub fn give_back(&self, rows: Vec<SheetRow>) {
        // Once the reading thread is gone, the rows are simply dropped here.
        let _ = self.spent.send(rows);
    }

    /// What the read learnt at the end; `None` until [`Self::next_rows`] returned `None`.
    pub fn end(&self) -> Option<&StreamEnd> {
        self.end.as_ref()
    }
}

/// Runs a parser over hostile bytes: should it panic, the file is refused like any malformed
/// file rather than taking the daemon down.
fn guarded<T>(
    path: &Path,
    parse: impl FnOnce() -> Result<T, WorkbookError>,
) -> Result<T, WorkbookError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)) {
        Ok(parsed) => parsed,
        Err(_) => Err(WorkbookError::Malformed {
            path: path.to_path_buf(),
            expected: "readable workbook",
            detail: "the reader stopped on an internal error reading it".to_string(),
        }),
    }
}

/// What a streaming read hands over as it goes: first the managed sheet's name, then its rows in
/// batches.
pub enum Piece {
    Sheet(String),
    Rows(Vec<SheetRow>),
}

/// What a streaming read knows once it got to the end.
#[derive(Debug, Clone, Default)]
pub struct StreamEnd {
    pub csv_format: Option<CsvFormat>,
}

/// Reads the managed sheet in one pass, handing its name and then its rows to `emit` as they come.
#[allow(clippy::too_many_arguments)]
fn stream_format(
    path: &Path,
    file: &mut std::fs::File,
    format: FileFormat,
    sheet: Option<&str>,
    csv_encoding: CsvEncoding,
    census: Option<&csv_reader::Utf8Census>,
    limits: &Limits,
    emit: &mut dyn FnMut(Piece) -> Result<(), WorkbookError>,
) -> Result<StreamEnd, WorkbookError> {
    let guarded = match format {
        FileFormat::Xlsx => guard_xlsx(path, file, limits)?,
        FileFormat::Ods => {
            check_zip(path, file, limits, &[])?;
            None
        }
        FileFormat::Csv | FileFormat::Xls => None,
    };
    match format {
        FileFormat::Csv => {
            let sheet_name = path
                .file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .unwrap_or_default();
            emit(Piece::Sheet(sheet_name))?;
            let mut sink = |batch: Vec<SheetRow>| emit(Piece::Rows(batch));
            let csv_format =
                csv_reader::stream(path, file, csv_encoding, census, limits, &mut sink)?;
            Ok(StreamEnd {
                csv_format: Some(csv_format),
            })
        }
        FileFormat::Xlsx => {
            match guarded {
                Some(archive) => read_guarded(path, archive, |archive| {
                    stream_xlsx(path, archive, sheet, limits, emit)
                })?,
                None => stream_xlsx(path, BufReader::new(file), sheet, limits, emit)?,
            }
            Ok(StreamEnd::default())
        }
        FileFormat::Xls | FileFormat::Ods => {
            read_with_range(path, file, format, sheet, limits, emit)?;
            Ok(StreamEnd::default())
        }
    }
}

/// An .xlsx as calamine should see it: its worksheets checked as calamine reads them, on the
/// other core, when the archive is plain enough to present that way ([`GuardedZip`]); every other
/// part (every part, for an archive that is not plain: then `None`) checked here, before.
fn guard_xlsx(
    path: &Path,
    file: &std::fs::File,
    limits: &Limits,
) -> Result<Option<GuardedZip>, WorkbookError> {
    let guarded = GuardedZip::over(file, xml_guard::Bounds::for_cells(limits.max_cell_chars))
        .map_err(|source| WorkbookError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let checked_later: &[String] = guarded.as_ref().map_or(&[], |(_, names)| names);
    check_zip(path, file, limits, checked_later)?;
    Ok(guarded.map(|(archive, _)| archive))
}

/// Runs `read` over the guarded archive. When the guard stopped a worksheet, calamine only saw
/// its stream end: the guard's reason is the one to give.
fn read_guarded<T>(
    path: &Path,
    archive: GuardedZip,
    read: impl FnOnce(GuardedZip) -> Result<T, WorkbookError>,
) -> Result<T, WorkbookError> {
    let refusal = archive.refusal_slot();
    let read = read(archive);
    let refused = refusal.lock().ok().and_then(|mut slot| slot.take());
    match refused {
        Some(refused) => Err(refusal_error(path, refused)),
        None => read,
    }
}

/// The checks on a zip (.xlsx, .ods) before calamine opens it. A zip bomb: a small file that
/// unpacks to gigabytes; the sizes its directory declares are summed before anything is unpacked
/// (the zip reader stops any entry at its declared size). Then every XML part is scanned with a
/// fixed budget ([`xml_guard`]). A file that is not a zip at all is left to calamine to report.
fn check_zip(
    path: &Path,
    file: &std::fs::File,
    limits: &Limits,
    checked_later: &[String],
) -> Result<(), WorkbookError> {
    let mut reader = BufReader::new(file);
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|source| WorkbookError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let Ok(mut archive) = zip::ZipArchive::new(reader) else {
        return Ok(());
    };
    let mut unzipped: u128 = 0;
    let mut shared_strings: u128 = 0;
    for entry_idx in 0..archive.len() {
        if let Ok(entry) = archive.by_index_raw(entry_idx) {
            unzipped += u128::from(entry.size());
            // calamine keeps every shared string in memory, used or not: a small file whose
            // strings unpack to hundreds of megabytes is refused before they are read.
            let is_shared_strings = entry
                .name()
                .is_ok_and(|name| name.to_lowercase().ends_with("sharedstrings.xml"));
            if is_shared_strings {
                shared_strings += u128::from(entry.size());
            }
        }
    }
    if shared_strings > u128::from(limits.max_shared_strings_bytes) {
        return Err(WorkbookError::OverLimit {
            path: path.to_path_buf(),
            what: format!(
                "the size of the shared strings ({} MB uncompressed)",
                shared_strings >> 20
            ),
            limit: format!("{} MB", limits.max_shared_strings_bytes >> 20),
        });
    }
    if unzipped > u128::from(limits.max_unzipped_bytes) {
        return Err(WorkbookError::OverLimit {
            path: path.to_path_buf(),
            what: format!("the uncompressed size ({} MB)", unzipped >> 20),
            limit: format!("{} MB", limits.max_unzipped_bytes >> 20),
        });
    }
    let bounds = xml_guard::Bounds::for_cells(limits.max_cell_chars);
    for entry_idx in 0..archive.len() {
        let entry = match archive.by_index(entry_idx) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::UnsupportedArchive(_)) => continue,
            Err(error) => return Err(WorkbookError::incomplete_read(path, error)),
        };
        let Ok(name) = entry.name().map(|name| name.into_owned()) else {
            continue;
        };
        if !xml_guard::is_scanned(&name) || checked_later.contains(&name) {
            continue;
        }
        xml_guard::check_part(&name, entry, bounds)
            .map_err(|refusal| refusal_error(path, refusal))?;
        if name == "content.xml" {
            // An .ods: calamine expands its repeated cells and rows into a grid when it opens.
            let entry = archive
                .by_index(entry_idx)
                .map_err(|error| WorkbookError::incomplete_read(path, error))?;
            ods_guard::check_content(entry, limits)
                .map_err(|refusal| refusal_error(path, refusal))?;
        }
    }
    Ok(())
}

/// The error for a part the XML guard refused.
fn refusal_error(path: &Path, refusal: xml_guard::Refusal) -> WorkbookError {
    match refusal {
        xml_guard::Refusal::OverLimit { what, limit } => WorkbookError::OverLimit {
            path: path.to_path_buf(),
            what,
            limit,
        },
        xml_guard::Refusal::Malformed(detail) => WorkbookError::Malformed {
            path: path.to_path_buf(),
            expected: "valid workbook",
            detail,
        },
        xml_guard::Refusal::Unreadable(detail) => WorkbookError::Incomplete {
            path: path.to_path_buf(),
            detail,
        },
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

pub fn hash_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn choose_sheet(
    path: &Path,
    sheets: &[calamine::Sheet],
    wanted: Option<&str>,
) -> Result<String, WorkbookError> {
    match wanted {
        Some(wanted) => {
            if let Some(sheet) = sheets.iter().find(|sheet| sheet.name == wanted) {
                return Ok(sheet.name.clone());
            }
            // People retype sheet names with other case or spacing; accept those too.
            let folded = crate::deal::normalize_label(wanted);
            sheets
                .iter()
                .find(|sheet| crate::deal::normalize_label(&sheet.name) == folded)
                .map(|sheet| sheet.name.clone())
                .ok_or_else(|| WorkbookError::SheetNotFound {
                    path: path.to_path_buf(),
                    sheet: wanted.to_string(),
                    available: sheets.iter().map(|sheet| sheet.name.clone()).collect(),
                })
        }
        None => sheets
            .iter()
            .find(|sheet| {
                sheet.visible == SheetVisible::Visible && sheet.typ == SheetType::WorkSheet
            })
            .map(|sheet| sheet.name.clone())
            .ok_or_else(|| WorkbookError::NoVisibleSheet {
                path: path.to_path_buf(),
            }),
    }
}

fn xlsx_error(path: &Path, error: calamine::XlsxError) -> WorkbookError {
    use calamine::XlsxError;
    match error {
        XlsxError::Password => WorkbookError::Encrypted {
            path: path.to_path_buf(),
        },
        XlsxError::Zip(zip_error) => WorkbookError::incomplete_read(path, zip_error),
        XlsxError::Io(io_error) => WorkbookError::incomplete_read(path, io_error),
        other => WorkbookError::rejected(path, "valid .xlsx", other),
    }
}

/// Streams the cells of an .xlsx sheet from `archive` (the file, or the [`GuardedZip`] over it),
/// checking each cell against the limits before anything is made of it. Memory grows with the
/// cells of a batch, never with the sheet's declared dimension.
fn stream_xlsx<RS: Read + Seek>(
    path: &Path,
    archive: RS,
    wanted: Option<&str>,
    limits: &Limits,
    emit: &mut dyn FnMut(Piece) -> Result<(), WorkbookError>,
) -> Result<(), WorkbookError> {
    let mut workbook: calamine::Xlsx<RS> =
        calamine::open_workbook_from_rs(archive).map_err(|error| xlsx_error(path, error))?;
    let sheet_name = choose_sheet(path, workbook.sheets_metadata(), wanted)?;
    emit(Piece::Sheet(sheet_name.clone()))?;
    let mut sink = |batch: Vec<SheetRow>| emit(Piece::Rows(batch));
    let mut collector = RowCollector::streaming(path, limits, &mut sink);
    collect_xlsx_cells(path, &mut workbook, &sheet_name, &mut collector)?;
    collector.finish()
}

fn collect_xlsx_cells<RS: Read + Seek>(
    path: &Path,
    workbook: &mut calamine::Xlsx<RS>,
    sheet_name: &str,
    collector: &mut RowCollector<'_>,
) -> Result<(), WorkbookError> {
    let mut reader = workbook
        .worksheet_cells_reader(sheet_name)
        .map_err(|error| xlsx_error(path, error))?;
    // The formula metadata reader reports shared formulas without expanding their text, so
    // knowing where the formulas are costs next to nothing.
    while let Some(cell) = reader
        .next_cell_with_formula_metadata()
        .map_err(|error| xlsx_error(path, error))?
    {
        let (row_idx, column_idx) = cell.pos;
        // The column is checked before anything is made of the value.
        if let Some(violation) = collector.violation(column_idx, None) {
            if !matches!(cell.value, DataRef::Empty) {
                return Err(collector.refusal(row_idx, violation));
            }
            continue;
        }
        if cell.formula.is_some() {
            collector.mark_formula(row_idx, column_idx)?;
        }
        let value = match cell.value {
            DataRef::Empty => continue,
            DataRef::Int(value) => Cell::Number(value as f64),
            DataRef::Float(value) => Cell::Number(value),
            DataRef::String(text) => Cell::Text(text.into()),
            DataRef::SharedString(text) => Cell::Text(text.into()),
            DataRef::Bool(value) => Cell::Bool(value),
            DataRef::DateTime(datetime) => match datetime.as_datetime() {
                Some(datetime) => Cell::DateTime(datetime),
                None => Cell::Number(datetime.as_f64()),
            },
            DataRef::DateTimeIso(text) | DataRef::DurationIso(text) => iso_cell(&text),
            DataRef::Error(error) => Cell::Error(error.to_string()),
        };
        collector.push(row_idx, column_idx, value)?;
    }
    Ok(())
}

fn iso_cell(text: &str) -> Cell {
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| {
            chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .map(|date| date.and_time(chrono::NaiveTime::MIN))
        })
        .map(Cell::DateTime)
        .unwrap_or_else(|_| Cell::Text(text.into()))
}

/// Streams every cell of an .xlsx's first visible sheet through the same guard as a sync's read
/// (the zip's parts checked, the worksheet inflated and scanned on the other core as calamine
/// reads it) and makes nothing of the cells: the least a read that honours `[limits]` on a
/// hostile share costs. The benchmark's floor for a sync; returns the number of non-empty cells.
pub fn count_guarded_cells(path: &Path, limits: &Limits) -> Result<u64, WorkbookError> {
    let file = std::fs::File::open(path).map_err(|source| WorkbookError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let Some(archive) = guard_xlsx(path, &file, limits)? else {
        return Err(WorkbookError::Malformed {
            path: path.to_path_buf(),
            expected: "plain .xlsx archive",
            detail: "the guard cannot present this archive as it reads".to_string(),
        });
    };
    read_guarded(path, archive, |archive| {
        let mut workbook: calamine::Xlsx<GuardedZip> =
            calamine::open_workbook_from_rs(archive).map_err(|error| xlsx_error(path, error))?;
        let sheet_name = choose_sheet(path, workbook.sheets_metadata(), None)?;
        let mut reader = workbook
            .worksheet_cells_reader(&sheet_name)
            .map_err(|error| xlsx_error(path, error))?;
        let mut n_cells = 0u64;
        while let Some(cell) = reader
            .next_cell_with_formula_metadata()
            .map_err(|error| xlsx_error(path, error))?
        {
            if !matches!(cell.value, DataRef::Empty) {
                n_cells += 1;
            }
        }
        Ok(n_cells)
    })
}

/// Reads .xls and .ods through calamine's range API (those formats have no streaming reader).
fn read_with_range(
    path: &Path,
    file: &std::fs::File,
    format: FileFormat,
    wanted: Option<&str>,
    limits: &Limits,
    emit: &mut dyn FnMut(Piece) -> Result<(), WorkbookError>,
) -> Result<(), WorkbookError> {
    let mut cursor = BufReader::new(file);
    cursor
        .seek(SeekFrom::Start(0))
        .map_err(|source| WorkbookError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let (sheet_name, range) = match format {
        FileFormat::Xls => {
            let mut workbook: calamine::Xls<_> =
                calamine::open_workbook_from_rs(cursor).map_err(|error| match error {
                    calamine::XlsError::Password => WorkbookError::Encrypted {
                        path: path.to_path_buf(),
                    },
                    other => WorkbookError::rejected(path, "valid .xls", other),
                })?;
            let sheet_name = choose_sheet(path, workbook.sheets_metadata(), wanted)?;
            let range = workbook
                .worksheet_range(&sheet_name)
                .map_err(|error| WorkbookError::rejected(path, "valid .xls", error))?;
            (sheet_name, range)
        }
        _ => {
            let mut workbook: calamine::Ods<_> =
                calamine::open_workbook_from_rs(cursor).map_err(|error| match error {
                    calamine::OdsError::Password => WorkbookError::Encrypted {
                        path: path.to_path_buf(),
                    },
                    calamine::OdsError::Zip(zip_error) => {
                        WorkbookError::incomplete_read(path, zip_error)
                    }
                    other => WorkbookError::rejected(path, "valid .ods", other),
                })?;
            let sheet_name = choose_sheet(path, workbook.sheets_metadata(), wanted)?;
            let range = workbook
                .worksheet_range(&sheet_name)
                .map_err(|error| WorkbookError::rejected(path, "valid .ods", error))?;
            (sheet_name, range)
        }
    };
    emit(Piece::Sheet(sheet_name))?;
    // used_cells() yields positions relative to the range's start.
    let (start_row, start_column) = range.start().unwrap_or((0, 0));
    let mut sink = |batch: Vec<SheetRow>| emit(Piece::Rows(batch));
    let mut collector = RowCollector::streaming(path, limits, &mut sink);
    for (row_idx, column_idx, value) in range.used_cells() {
        let cell = match value {
            Data::Empty => continue,
            Data::Int(value) => Cell::Number(*value as f64),
            Data::Float(value) => Cell::Number(*value),
            Data::String(text) => Cell::Text(text.as_str().into()),
            Data::Bool(value) => Cell::Bool(*value),
            Data::DateTime(datetime) => match datetime.as_datetime() {
                Some(datetime) => Cell::DateTime(datetime),
                None => Cell::Number(datetime.as_f64()),
            },
            Data::DateTimeIso(text) | Data::DurationIso(text) => iso_cell(text),
            Data::Error(error) => Cell::Error(error.to_string()),
        };
        collector.push(
            start_row.saturating_add(u32::try_from(row_idx).unwrap_or(u32::MAX)),
            start_column.saturating_add(u32::try_from(column_idx).unwrap_or(u32::MAX)),
            cell,
        )?;
    }
    collector.finish()
}

/// The column letters Excel shows for a 0-based column index (0 → A, 26 → AA).
pub fn column_letters(column_idx: usize) -> String {
    let mut letters = Vec::new();
    let mut remaining = column_idx + 1;
    while remaining > 0 {
        let digit = (remaining - 1) % 26;
        letters.push(b'A' + digit as u8);
        remaining = (remaining - 1) / 26;
    }
    letters.reverse();
    String::from_utf8(letters).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mirror rows store the raw hash of their cells; the hash of the same cells must stay the
    /// value the hasher gave when fed cell by cell, or every quiet row would be cleaned again.
    #[test]
    fn the_raw_hash_of_a_row_is_the_value_stored_before() {
        let day = chrono::NaiveDate::from_ymd_opt(2026, 3, 9)
            .and_then(|day| day.and_hms_opt(0, 0, 0))
            .expect("a real day");
        let row = SheetRow::new(
            7,
            vec![
                Cell::Text("Acme 东".into()),
                Cell::Empty,
                Cell::Number(12.5),
                Cell::Bool(true),
                Cell::DateTime(day),
                Cell::Error("#N/A".to_string()),
            ],
        );
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for (column_idx, cell) in &row.cells {
            if *column_idx == 2 {
                continue;
            }
            hasher.update(&column_idx.to_le_bytes());
            match cell {
                Cell::Empty => hasher.update(&[0]),
                Cell::Text(text) => {
                    hasher.update(&[1]);
                    hasher.update(&(text.len() as u64).to_le_bytes());
                    hasher.update(text.as_bytes());
                }
                Cell::Error(text) => {
                    hasher.update(&[5]);
                    hasher.update(&(text.len() as u64).to_le_bytes());
                    hasher.update(text.as_bytes());
                }
                Cell::Number(number) => {
                    hasher.update(&[2]);
                    hasher.update(&number.to_bits().to_le_bytes());
                }
                Cell::Bool(value) => hasher.update(&[3, u8::from(*value)]),
                Cell::DateTime(datetime) => {
                    hasher.update(&[4]);
                    hasher.update(&datetime.and_utc().timestamp_micros().to_le_bytes());
                }
            }
        }
        assert_eq!(row.raw_hash(Some(2)), hasher.digest() as i64);
        assert_ne!(row.raw_hash(Some(2)), row.raw_hash(None));
    }

    #[test]
    fn a_workbook_saved_with_a_password_is_encrypted_not_half_saved() {
        // Office agile encryption, as Excel writes it (tests/fixtures/make_encrypted.py).
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("locked.xlsx");
        std::fs::write(&path, include_bytes!("../../tests/fixtures/encrypted.xlsx"))
            .expect("write");
        let error = read_sheet(&path, None, CsvEncoding::Auto, &Limits::default())
            .expect_err("an encrypted workbook cannot be read");
        assert!(
            matches!(&error, WorkbookError::Encrypted { path: refused } if *refused == path),
            "{error:?}"
        );
        assert!(!error.is_retryable(), "waiting does not decrypt it");
    }

    /// A small real workbook, its parts stored uncompressed so that changed bytes reach the XML.
    fn stored_workbook() -> Vec<u8> {
        use std::io::Write;
        let mut workbook = rust_xlsxwriter::Workbook::new();
        let sheet = workbook.add_worksheet();
        for (column, header) in ["Company", "Stage", "Amount"].into_iter().enumerate() {
            sheet.write_string(0, column as u16, header).expect("write");
        }
        sheet.write_string(1, 0, "Acme").expect("write");
        sheet.write_string(1, 1, "Lead").expect("write");
        sheet.write_number(1, 2, 1200.0).expect("write");
        let bytes = workbook.save_to_buffer().expect("bytes");
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).expect("zip");
        let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for entry_idx in 0..archive.len() {
            let mut entry = archive.by_index(entry_idx).expect("entry");
            let name = entry.name().expect("name").into_owned();
            let mut content = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut content).expect("read");
            writer.start_file(name.as_str(), options).expect("start");
            writer.write_all(&content).expect("write");
        }
        writer.finish().expect("finish").into_inner()
    }

    #[test]
    fn a_text_of_whitespace_alone_is_an_empty_cell() {
        for (text, empty) in [
            ("", true),
            (" \t\r\n", true),
            ("\u{b}\u{c}", true),
            ("\u{b}x", false),
            ("\u{3000}", true),
            ("\u{a0} ", true),
            ("a", false),
            ("  a ", false),
            ("中", false),
            ("\u{3000}中", false),
            ("\u{a0}1", false),
        ] {
            assert_eq!(Cell::Text(text.into()).is_empty(), empty, "{text:?}");
        }
    }

    #[test]
    fn a_real_workbook_reads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("p.xlsx");
        std::fs::write(&path, stored_workbook()).expect("write");
        let sheet = read_sheet(&path, None, CsvEncoding::Auto, &Limits::default()).expect("reads");
        assert_eq!(sheet.rows.len(), 2);
        assert_eq!(sheet.rows[1].cell(2), &Cell::Number(1200.0));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Changed bytes anywhere in a real workbook: rows or an error, never a panic (the
        /// parsers are called directly here, without the guard that turns a panic into an error).
        #[test]
        fn changed_workbook_bytes_never_panic(
            changes in proptest::collection::vec((proptest::num::usize::ANY, proptest::num::u8::ANY), 1..8),
            cut in proptest::option::of(proptest::num::usize::ANY),
        ) {
            let mut bytes = stored_workbook();
            for (at, value) in changes {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut % bytes.len());
            }
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("p.xlsx");
            std::fs::write(&path, &bytes).expect("write");
            let mut file = std::fs::File::open(&path).expect("open");
            let _ = stream_format(
                &path,
                &mut file,
                FileFormat::Xlsx,
                None,
                CsvEncoding::Auto,
                None,
                &Limits::default(),
                &mut |_| Ok(()),
            );
        }
    }

    #[test]
    fn column_letters_match_excel() {
        let cases = [
            (0, "A"),
            (5, "F"),
            (25, "Z"),
            (26, "AA"),
            (701, "ZZ"),
            (702, "AAA"),
            (16_383, "XFD"),
        ];
        for (column_idx, expected) in cases {
            assert_eq!(column_letters(column_idx), expected);
        }
    }
}
