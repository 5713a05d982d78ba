//! Reading spreadsheet files into plain rows of cells: .xlsx/.xlsm/.xls/.ods through calamine and
//! .csv through the csv crate (delimiter sniffed, encoding detected).
//!
//! This module owns file formats and nothing else: it knows sheets, rows and cells, and how a
//! half-written or protected file looks, but not what a column means, what a deal is or where the
//! store lives. Errors say whether trying again later can help ([`WorkbookError::is_retryable`]).

use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use calamine::{Data, DataRef, Reader, SheetType, SheetVisible};
use chrono::NaiveDateTime;
use sha2::{Digest, Sha256};

/// File extensions (lower case) funnelsync reads.
pub const SUPPORTED_EXTENSIONS: [&str; 5] = ["xlsx", "xlsm", "xls", "ods", "csv"];

/// How many columns a row may have: Excel's own limit (XFD).
const MAX_COLUMNS: u32 = 16_384;

/// One cell's value, independent of the file format.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Empty,
    Text(String),
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
            Cell::Text(text) => text.trim().is_empty(),
            _ => false,
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

/// One non-empty row of a sheet.
#[derive(Debug, Clone, PartialEq)]
pub struct SheetRow {
    /// The row number as Excel shows it (1-based).
    pub row_number: u32,
    /// Cells by 0-based column index; trailing empty cells are not stored.
    pub cells: Vec<Cell>,
}

impl SheetRow {
    pub fn cell(&self, column_idx: usize) -> &Cell {
        self.cells.get(column_idx).unwrap_or(&Cell::Empty)
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

impl SheetData {
    /// Whether the cell at this Excel row number and 0-based column holds a formula.
    pub fn is_formula(&self, row_number: u32, column_idx: usize) -> bool {
        let Ok(column_idx) = u32::try_from(column_idx) else {
            return false;
        };
        self.formula_cells
            .binary_search(&(row_number, column_idx))
            .is_ok()
    }
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
    /// locked or half-written by the program saving it.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            WorkbookError::Io { .. }
                | WorkbookError::Incomplete { .. }
                | WorkbookError::Malformed { .. }
        )
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
/// The file is read into memory once so that its content hash and its rows describe the same bytes.
pub fn read_sheet(
    path: &Path,
    sheet: Option<&str>,
    csv_encoding: crate::config::CsvEncoding,
    limits: &crate::config::Limits,
) -> Result<SheetData, WorkbookError> {
    let bytes = read_bytes(path, limits)?;
    let content_hash = hash_bytes(&bytes);
    parse_sheet(path, bytes, content_hash, sheet, csv_encoding, limits)
}

/// A file's bytes, refused beyond `max_file_mb`.
pub fn read_bytes(path: &Path, limits: &crate::config::Limits) -> Result<Vec<u8>, WorkbookError> {
    let size = std::fs::metadata(path)
        .map_err(|source| WorkbookError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if size > limits.max_file_bytes {
        return Err(WorkbookError::OverLimit {
            path: path.to_path_buf(),
            what: format!("the file size ({} MB)", size >> 20),
            limit: format!("{} MB", limits.max_file_bytes >> 20),
        });
    }
    // Never through a link: the caller resolved an admitted link to its target already, so a
    // link here was put in place since, and is not read.
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(|source| WorkbookError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(bytes)
}

/// Parses a file's bytes (from [`read_bytes`], with their [`hash_bytes`]) into the managed sheet.
pub fn parse_sheet(
    path: &Path,
    bytes: Vec<u8>,
    content_hash: String,
    sheet: Option<&str>,
    csv_encoding: crate::config::CsvEncoding,
    limits: &crate::config::Limits,
) -> Result<SheetData, WorkbookError> {
    let format = format_of(path).ok_or_else(|| WorkbookError::Unsupported {
        path: path.to_path_buf(),
    })?;
    let over = |what: String, limit: String| WorkbookError::OverLimit {
        path: path.to_path_buf(),
        what,
        limit,
    };
    if matches!(format, FileFormat::Xlsx | FileFormat::Ods) {
        // A zip bomb: a small file that unpacks to gigabytes. The sizes its directory declares are
        // summed before anything is unpacked.
        if let Ok(mut archive) = zip::ZipArchive::new(Cursor::new(&bytes)) {
            let mut unzipped: u128 = 0;
            for entry_idx in 0..archive.len() {
                if let Ok(entry) = archive.by_index_raw(entry_idx) {
                    unzipped += u128::from(entry.size());
                }
            }
            if unzipped > u128::from(limits.max_unzipped_bytes) {
                return Err(over(
                    format!("the uncompressed size ({} MB)", unzipped >> 20),
                    format!("{} MB", limits.max_unzipped_bytes >> 20),
                ));
            }
        }
    }
    let modified = std::fs::metadata(path)
        .and_then(|metadata| metadata.modified())
        .ok()
        .map(chrono::DateTime::<chrono::Utc>::from);
    let mut formula_cells = Vec::new();
    let (sheet_name, rows, csv_format) = match format {
        FileFormat::Csv => {
            let (rows, csv_format) = crate::workbook::csv_reader::read(path, &bytes, csv_encoding)?;
            let sheet_name = path
                .file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .unwrap_or_default();
            (sheet_name, rows, Some(csv_format))
        }
        FileFormat::Xlsx => {
            let (name, rows, formulas) = read_xlsx(path, bytes, sheet)?;
            formula_cells = formulas;
            (name, rows, None)
        }
        FileFormat::Xls | FileFormat::Ods => {
            let (name, rows) = read_with_range(path, bytes, format, sheet)?;
            (name, rows, None)
        }
    };
    check_limits(path, &rows, limits)?;
    Ok(SheetData {
        path: path.to_path_buf(),
        format,
        sheet_name,
        rows,
        content_hash,
        modified,
        csv_format,
        formula_cells,
    })
}

fn check_limits(
    path: &Path,
    rows: &[SheetRow],
    limits: &crate::config::Limits,
) -> Result<(), WorkbookError> {
    let over = |what: String, limit: String| WorkbookError::OverLimit {
        path: path.to_path_buf(),
        what,
        limit,
    };
    if rows.len() > limits.max_rows {
        return Err(over(
            format!("the number of rows ({})", rows.len()),
            format!("{} rows", limits.max_rows),
        ));
    }
    for row in rows {
        if row.cells.len() > limits.max_columns {
            return Err(over(
                format!("row {} with {} columns", row.row_number, row.cells.len()),
                format!("{} columns", limits.max_columns),
            ));
        }
        for (column_idx, cell) in row.cells.iter().enumerate() {
            if let Cell::Text(text) = cell {
                let n_chars = text.chars().count();
                if n_chars > limits.max_cell_chars {
                    return Err(over(
                        format!(
                            "the text in row {}, column {} ({n_chars} characters)",
                            row.row_number,
                            column_letters(column_idx)
                        ),
                        format!("{} characters", limits.max_cell_chars),
                    ));
                }
            }
        }
    }
    Ok(())
}

pub fn hash_bytes(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
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
        XlsxError::Zip(zip_error) => WorkbookError::Incomplete {
            path: path.to_path_buf(),
            detail: zip_error.to_string(),
        },
        XlsxError::Io(io_error) => WorkbookError::Incomplete {
            path: path.to_path_buf(),
            detail: io_error.to_string(),
        },
        other => WorkbookError::Malformed {
            path: path.to_path_buf(),
            expected: "valid .xlsx",
            detail: other.to_string(),
        },
    }
}

/// Streams the cells of an .xlsx sheet: memory grows with the cells present, never with the
/// sheet's declared dimension (a stray cell at XFD1048576 must not allocate a dense grid).
fn read_xlsx(
    path: &Path,
    bytes: Vec<u8>,
    wanted: Option<&str>,
) -> Result<(String, Vec<SheetRow>, Vec<(u32, u32)>), WorkbookError> {
    let mut workbook: calamine::Xlsx<_> = calamine::open_workbook_from_rs(Cursor::new(bytes))
        .map_err(|error| xlsx_error(path, error))?;
    let sheet_name = choose_sheet(path, workbook.sheets_metadata(), wanted)?;
    let mut reader = workbook
        .worksheet_cells_reader(&sheet_name)
        .map_err(|error| xlsx_error(path, error))?;
    let mut rows: Vec<SheetRow> = Vec::new();
    let mut formula_cells = Vec::new();
    // The formula metadata reader reports shared formulas without expanding their text, so
    // knowing where the formulas are costs next to nothing.
    while let Some(cell) = reader
        .next_cell_with_formula_metadata()
        .map_err(|error| xlsx_error(path, error))?
    {
        let (row_idx, column_idx) = cell.pos;
        if cell.formula.is_some() && column_idx < MAX_COLUMNS {
            formula_cells.push((row_idx.saturating_add(1), column_idx));
        }
        let value = match &cell.value {
            DataRef::Empty => continue,
            DataRef::Int(value) => Cell::Number(*value as f64),
            DataRef::Float(value) => Cell::Number(*value),
            DataRef::String(text) => Cell::Text(text.clone()),
            DataRef::SharedString(text) => Cell::Text((*text).to_string()),
            DataRef::Bool(value) => Cell::Bool(*value),
            DataRef::DateTime(datetime) => match datetime.as_datetime() {
                Some(datetime) => Cell::DateTime(datetime),
                None => Cell::Number(datetime.as_f64()),
            },
            DataRef::DateTimeIso(text) | DataRef::DurationIso(text) => iso_cell(text),
            DataRef::Error(error) => Cell::Error(error.to_string()),
        };
        push_cell(&mut rows, row_idx, column_idx, value);
    }
    formula_cells.sort_unstable();
    Ok((sheet_name, rows, formula_cells))
}

fn iso_cell(text: &str) -> Cell {
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| {
            chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .map(|date| date.and_time(chrono::NaiveTime::MIN))
        })
        .map(Cell::DateTime)
        .unwrap_or_else(|_| Cell::Text(text.to_string()))
}

fn push_cell(rows: &mut Vec<SheetRow>, row_idx: u32, column_idx: u32, value: Cell) {
    if value.is_empty() || column_idx >= MAX_COLUMNS {
        return;
    }
    let row_number = row_idx.saturating_add(1);
    if rows.last().map(|row| row.row_number) != Some(row_number) {
        rows.push(SheetRow {
            row_number,
            cells: Vec::new(),
        });
    }
    let Some(row) = rows.last_mut() else { return };
    let column_idx = column_idx as usize;
    if row.cells.len() <= column_idx {
        row.cells.resize(column_idx + 1, Cell::Empty);
    }
    row.cells[column_idx] = value;
}

/// Reads .xls and .ods through calamine's range API (those formats have no streaming reader).
fn read_with_range(
    path: &Path,
    bytes: Vec<u8>,
    format: FileFormat,
    wanted: Option<&str>,
) -> Result<(String, Vec<SheetRow>), WorkbookError> {
    let cursor = Cursor::new(bytes);
    let (sheet_name, range) = match format {
        FileFormat::Xls => {
            let mut workbook: calamine::Xls<_> =
                calamine::open_workbook_from_rs(cursor).map_err(|error| match error {
                    calamine::XlsError::Password => WorkbookError::Encrypted {
                        path: path.to_path_buf(),
                    },
                    other => WorkbookError::Malformed {
                        path: path.to_path_buf(),
                        expected: "valid .xls",
                        detail: other.to_string(),
                    },
                })?;
            let sheet_name = choose_sheet(path, workbook.sheets_metadata(), wanted)?;
            let range = workbook.worksheet_range(&sheet_name).map_err(|error| {
                WorkbookError::Malformed {
                    path: path.to_path_buf(),
                    expected: "valid .xls",
                    detail: error.to_string(),
                }
            })?;
            (sheet_name, range)
        }
        _ => {
            let mut workbook: calamine::Ods<_> =
                calamine::open_workbook_from_rs(cursor).map_err(|error| match error {
                    calamine::OdsError::Password => WorkbookError::Encrypted {
                        path: path.to_path_buf(),
                    },
                    calamine::OdsError::Zip(zip_error) => WorkbookError::Incomplete {
                        path: path.to_path_buf(),
                        detail: zip_error.to_string(),
                    },
                    other => WorkbookError::Malformed {
                        path: path.to_path_buf(),
                        expected: "valid .ods",
                        detail: other.to_string(),
                    },
                })?;
            let sheet_name = choose_sheet(path, workbook.sheets_metadata(), wanted)?;
            let range = workbook.worksheet_range(&sheet_name).map_err(|error| {
                WorkbookError::Malformed {
                    path: path.to_path_buf(),
                    expected: "valid .ods",
                    detail: error.to_string(),
                }
            })?;
            (sheet_name, range)
        }
    };
    let mut rows = Vec::new();
    for (row_idx, column_idx, value) in range.used_cells() {
        let cell = match value {
            Data::Empty => continue,
            Data::Int(value) => Cell::Number(*value as f64),
            Data::Float(value) => Cell::Number(*value),
            Data::String(text) => Cell::Text(text.clone()),
            Data::Bool(value) => Cell::Bool(*value),
            Data::DateTime(datetime) => match datetime.as_datetime() {
                Some(datetime) => Cell::DateTime(datetime),
                None => Cell::Number(datetime.as_f64()),
            },
            Data::DateTimeIso(text) | Data::DurationIso(text) => iso_cell(text),
            Data::Error(error) => Cell::Error(error.to_string()),
        };
        // used_cells() yields positions relative to the range's start.
        let (start_row, start_column) = range.start().unwrap_or((0, 0));
        push_cell(
            &mut rows,
            start_row + row_idx as u32,
            start_column + column_idx as u32,
            cell,
        );
    }
    Ok((sheet_name, rows))
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

pub mod csv_reader {
    //! .csv files: encoding detection, delimiter sniffing and row numbering as Excel shows it.

    use super::{Cell, CsvFormat, SheetRow, WorkbookError};
    use crate::config::CsvEncoding;
    use std::path::Path;

    pub fn read(
        path: &Path,
        bytes: &[u8],
        encoding: CsvEncoding,
    ) -> Result<(Vec<SheetRow>, CsvFormat), WorkbookError> {
        let (text, used_encoding, has_bom) = decode(path, bytes, encoding)?;
        if text.contains('\0') {
            return Err(WorkbookError::Malformed {
                path: path.to_path_buf(),
                expected: "text (.csv)",
                detail: "it contains binary data (NUL bytes)".to_string(),
            });
        }
        let delimiter = sniff_delimiter(&text);
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(delimiter)
            .from_reader(text.as_bytes());
        let mut rows = Vec::new();
        let mut embedded_newlines: u64 = 0;
        let mut record = csv::StringRecord::new();
        let text_bytes = text.as_bytes();
        loop {
            let more =
                reader
                    .read_record(&mut record)
                    .map_err(|error| WorkbookError::Malformed {
                        path: path.to_path_buf(),
                        expected: "valid .csv",
                        detail: error.to_string(),
                    })?;
            if !more {
                break;
            }
            // Excel numbers every line (blank ones too) but counts a quoted field spanning several
            // lines as one row. The reader's position is now just past this record's end.
            let position = reader.position();
            let end_offset = position.byte() as usize;
            let ended_with_newline =
                end_offset > 0 && text_bytes.get(end_offset - 1) == Some(&b'\n');
            let end_line = position.line() - u64::from(ended_with_newline);
            let newlines_inside: u64 = record
                .iter()
                .map(|field| field.matches('\n').count() as u64)
                .sum();
            let row_number =
                u32::try_from(end_line.saturating_sub(newlines_inside + embedded_newlines))
                    .unwrap_or(u32::MAX);
            embedded_newlines += newlines_inside;
            let cells: Vec<Cell> = record
                .iter()
                .map(|field| {
                    if field.trim().is_empty() {
                        Cell::Empty
                    } else {
                        // A leading apostrophe marks text that could be taken for a formula
                        // (funnelsync writes values that way); the value is what follows it.
                        Cell::Text(crate::writeback::unescape_csv_field(field).to_string())
                    }
                })
                .collect();
            if cells.iter().all(Cell::is_empty) {
                continue;
            }
            let mut cells = cells;
            while cells.last().is_some_and(Cell::is_empty) {
                cells.pop();
            }
            rows.push(SheetRow { row_number, cells });
        }
        let line_ending_crlf = text.contains("\r\n") || !text.contains('\n');
        Ok((
            rows,
            CsvFormat {
                delimiter,
                encoding: used_encoding,
                has_bom,
                line_ending_crlf,
            },
        ))
    }

    fn decode(
        path: &Path,
        bytes: &[u8],
        encoding: CsvEncoding,
    ) -> Result<(String, &'static encoding_rs::Encoding, bool), WorkbookError> {
        let bom = encoding_rs::Encoding::for_bom(bytes);
        let (encoding, has_bom) = match (encoding, bom) {
            (_, Some((bom_encoding, _))) => (bom_encoding, true),
            (CsvEncoding::Fixed(fixed), None) => (fixed, false),
            (CsvEncoding::Auto, None) => {
                if std::str::from_utf8(bytes).is_ok() {
                    (encoding_rs::UTF_8, false)
                } else {
                    // Chinese Excel saves "CSV" in the ANSI code page, which is GBK; GB18030 is
                    // its superset.
                    (encoding_rs::GB18030, false)
                }
            }
        };
        let (text, had_errors) = encoding.decode_with_bom_removal(bytes);
        if had_errors {
            return Err(WorkbookError::Malformed {
                path: path.to_path_buf(),
                expected: "text (.csv)",
                detail: format!(
                    "it is not valid {} text; set `encoding` for this source",
                    encoding.name()
                ),
            });
        }
        Ok((text.into_owned(), encoding, has_bom))
    }

    /// Picks `,`, `;` or tab: the one that splits the first lines into the same, largest number of
    /// fields. Quoted text is skipped so commas inside quotes do not count.
    pub fn sniff_delimiter(text: &str) -> u8 {
        let lines: Vec<&str> = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .take(20)
            .collect();
        let mut best = (b',', 0usize, 0usize);
        for candidate in [b',', b';', b'\t'] {
            let counts: Vec<usize> = lines
                .iter()
                .map(|line| count_outside_quotes(line, candidate))
                .collect();
            let Some(&first) = counts.first() else {
                continue;
            };
            if first == 0 {
                continue;
            }
            let consistent = counts.iter().filter(|count| **count == first).count();
            if (consistent, first) > (best.1, best.2) {
                best = (candidate, consistent, first);
            }
        }
        best.0
    }

    fn count_outside_quotes(line: &str, delimiter: u8) -> usize {
        let mut in_quotes = false;
        let mut count = 0;
        for byte in line.bytes() {
            if byte == b'"' {
                in_quotes = !in_quotes;
            } else if byte == delimiter && !in_quotes {
                count += 1;
            }
        }
        count
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn delimiters_are_sniffed() {
            let cases = [
                ("a,b,c\n1,2,3\n", b','),
                ("a;b;c\n1;\"2,5\";3\n", b';'),
                ("a\tb\tc\n1\t2\t3\n", b'\t'),
                ("\"x,y\";b\n1;2\n", b';'),
                ("single\nvalue\n", b','),
            ];
            for (text, expected) in cases {
                assert_eq!(sniff_delimiter(text) as char, expected as char, "{text:?}");
            }
        }

        #[test]
        fn gb18030_is_detected_and_rows_numbered_like_excel() {
            let (bytes, _, _) =
                encoding_rs::GB18030.encode("公司,阶段\n\"甲\n公司\",机会\n\n乙,成交\n");
            let (rows, format) =
                read(Path::new("x.csv"), &bytes, CsvEncoding::Auto).expect("reads");
            assert_eq!(format.encoding, encoding_rs::GB18030);
            assert_eq!(rows.len(), 3);
            assert_eq!(rows[1].cells[0], Cell::Text("甲\n公司".to_string()));
            assert_eq!(rows[1].row_number, 2);
            assert_eq!(rows[2].row_number, 4);
            assert_eq!(rows[2].cells[1], Cell::Text("成交".to_string()));
        }

        proptest::proptest! {
            /// Any bytes at all: a CSV reader result or an error, never a panic.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
                let _ = read(Path::new("x.csv"), &bytes, CsvEncoding::Auto);
                let _ = read(Path::new("x.csv"), &bytes, CsvEncoding::Fixed(encoding_rs::SHIFT_JIS));
            }

            /// Text that is a valid CSV keeps its cells.
            #[test]
            fn cells_survive_quoting(cells in proptest::collection::vec("[a-zA-Z0-9 ,;\"éü中]{1,8}", 2..5)) {
                let mut writer = csv::Writer::from_writer(Vec::new());
                writer.write_record(["Company", "Stage", "A", "B", "C"].iter().take(cells.len())).expect("write");
                writer.write_record(&cells).expect("write");
                let bytes = writer.into_inner().expect("bytes");
                let (rows, _) = read(Path::new("x.csv"), &bytes, CsvEncoding::Auto).expect("reads");
                let expected: Vec<Cell> = cells.iter().map(|cell| if cell.trim().is_empty() { Cell::Empty } else { Cell::Text(cell.clone()) }).collect();
                let mut expected = expected;
                while expected.last().is_some_and(Cell::is_empty) {
                    expected.pop();
                }
                if !expected.is_empty() {
                    proptest::prop_assert_eq!(&rows[1].cells, &expected);
                }
            }
        }

        #[test]
        fn bom_is_remembered() {
            let bytes = b"\xEF\xBB\xBFCompany;Stage\r\nAcme;Lead\r\n";
            let (rows, format) = read(Path::new("x.csv"), bytes, CsvEncoding::Auto).expect("reads");
            assert!(format.has_bom);
            assert_eq!(format.delimiter, b';');
            assert_eq!(rows[0].cells[0], Cell::Text("Company".to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::column_letters;

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
