//! Streams the managed sheet's XML from the old package to the new one, changing only what the
//! plan asks: the `<c>` elements of changed cells (keeping their style), the cells of new rows
//! (in the styles of the row above), rows that leave, and the ranges that must follow them.
//! Every other event is written back exactly as it was read, so `<cols>`, `<sheetViews>`,
//! `<mergeCells>`, conditional formats, validations, hyperlinks, drawings, comments, tables,
//! page setup and row heights stay the team's.
//!
//! A cell that holds a formula is never replaced. Text goes in as an inline string, so a value
//! can never become a live formula.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};

use chrono::NaiveDate;
use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, Writer};

use super::cellref::{self, Range, RowShift};
use super::styles::Styles;
use super::xml;
use super::PackageError;
use crate::writeback::OutCell;

/// What happens to one existing row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowEdit {
    /// These cells (by 0-based column) get new content.
    Cells(BTreeMap<u32, OutCell>),
    /// Every cell loses its value (formulas and styles stay): a row left blank.
    Clear,
}

/// The niceties of a workbook funnelsync fills from nothing (a sheet with just a header): each is
/// added only where the sheet has none of its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Fresh {
    /// The header row: the pane freezes the rows down to it.
    pub header_row: u32,
    /// Column widths in characters, from column A.
    pub widths: Vec<f64>,
    /// The autofilter's range.
    pub autofilter: Range,
    /// The stage column and its list (`"Lead,Prospect,…"` with the quotes).
    pub stage_list: Option<(u32, String)>,
}

/// Everything the patcher changes in the sheet.
#[derive(Debug, Clone, Default)]
pub struct SheetEdit {
    pub header_row: u32,
    /// Changes to existing rows, by their number in the file as read.
    pub rows: BTreeMap<u32, RowEdit>,
    /// Rows deleted, the rows below moving up (empty when removed rows are cleared instead).
    pub shift: RowShift,
    /// New rows by their number in the written file, ascending.
    pub new_rows: Vec<(u32, BTreeMap<u32, OutCell>)>,
    /// The row (as read) whose cell styles the new rows take.
    pub template_row: Option<u32>,
    /// Rows (as read) whose cell styles are looked at though nothing in them changes: the rows
    /// that show the date style of a column a date is written into.
    pub style_rows: std::collections::BTreeSet<u32>,
    /// New rows go after this row of the written file, down to the second number: ranges that
    /// ended on the first grow to the second.
    pub extend: Option<(u32, u32)>,
    /// The highest 0-based column written, for the sheet's dimension.
    pub max_column: u32,
    pub fresh: Option<Fresh>,
    pub date1904: bool,
}

/// What the patcher did besides writing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EditOutcome {
    /// Cells the plan asked to change that hold a formula, left as they were: (row, column).
    pub kept_formulas: Vec<(u32, u32)>,
    /// Whether any cell's value changed (a formula elsewhere may need recalculating).
    pub values_changed: bool,
}

/// The order of a worksheet's top-level elements (CT_Worksheet), to insert an element where
/// Excel expects it.
const WORKSHEET_ORDER: [&str; 39] = [
    "sheetPr",
    "dimension",
    "sheetViews",
    "sheetFormatPr",
    "cols",
    "sheetData",
    "sheetCalcPr",
    "sheetProtection",
    "protectedRanges",
    "scenarios",
    "autoFilter",
    "sortState",
    "dataConsolidate",
    "customSheetViews",
    "mergeCells",
    "phoneticPr",
    "conditionalFormatting",
    "dataValidations",
    "hyperlinks",
    "printOptions",
    "pageMargins",
    "pageSetup",
    "headerFooter",
    "rowBreaks",
    "colBreaks",
    "customProperties",
    "cellWatches",
    "ignoredErrors",
    "smartTags",
    "drawing",
    "legacyDrawing",
    "legacyDrawingHF",
    "drawingHF",
    "picture",
    "oleObjects",
    "controls",
    "webPublishItems",
    "tableParts",
    "extLst",
];

fn order_of(local_name: &str) -> Option<usize> {
    WORKSHEET_ORDER.iter().position(|name| *name == local_name)
}

/// Top-level elements whose range attribute follows deleted and appended rows, and whether
/// appended rows extend them.
fn range_attribute(local_name: &str) -> Option<(&'static str, bool)> {
    match local_name {
        "autoFilter" => Some(("ref", true)),
        "sortState" => Some(("ref", false)),
        "mergeCell" => Some(("ref", false)),
        "conditionalFormatting" => Some(("sqref", true)),
        "dataValidation" => Some(("sqref", true)),
        "hyperlink" => Some(("ref", false)),
        "ignoredError" => Some(("sqref", false)),
        "protectedRange" => Some(("sqref", false)),
        _ => None,
    }
}

/// Streams `input` (the sheet part as read) into `output` with the edits applied. The markup
/// around `<sheetData>` goes through an XML parser; the rows are found by their tags and a row
/// nothing happens to is copied as it was, byte for byte, without parsing its cells.
pub fn patch<R: Read, W: Write>(
    input: R,
    output: W,
    edit: SheetEdit,
    styles: &mut Styles,
) -> Result<EditOutcome, PackageError> {
    let mut patcher = Patcher {
        writer: Writer::new(output),
        styles,
        prefix: String::new(),
        column_styles: Vec::new(),
        column_date_styles: HashMap::new(),
        template_cells: BTreeMap::new(),
        template_row_attributes: Vec::new(),
        next_implicit_row: 1,
        pending_inserts: Vec::new(),
        outcome: EditOutcome {
            values_changed: !edit.shift.is_empty(),
            ..EditOutcome::default()
        },
        new_rows: edit.new_rows.clone().into_iter().rev().collect(),
        edit,
        markup: MarkupState::default(),
    };
    let mut chunks = Chunks::new(input);
    match chunks.find_sheet_data_start()? {
        Some(rows_start) => {
            let head = chunks.take(rows_start);
            patcher.markup(&head)?;
            patcher.rows(&mut chunks)?;
            let tail = chunks.rest()?;
            patcher.markup(&tail)?;
        }
        // No rows at all (`<sheetData/>`), or no sheetData: the part is small; parse it whole.
        None => {
            let whole = chunks.rest()?;
            patcher.markup(&whole)?;
        }
    }
    patcher.writer.get_mut().flush()?;
    Ok(patcher.outcome)
}

/// Where the markup walk is, kept between the part before the rows and the part after them.
#[derive(Debug, Default)]
struct MarkupState {
    depth: usize,
    in_sheet_data: bool,
    in_cols: bool,
    in_extension: bool,
    /// Inside a `<sheetView>` of a fresh sheet: the depth of its children, until we know whether
    /// it has a pane of its own.
    pane_wanted_at: Option<usize>,
}

/// The sheet part's bytes, read in chunks as the rows are copied.
struct Chunks<R: Read> {
    reader: R,
    buffer: Vec<u8>,
    /// Bytes of `buffer` before this have been handed out.
    start: usize,
    at_end: bool,
}

const CHUNK: usize = 1 << 18;

impl<R: Read> Chunks<R> {
    fn new(reader: R) -> Chunks<R> {
        Chunks {
            reader,
            buffer: Vec::with_capacity(CHUNK * 2),
            start: 0,
            at_end: false,
        }
    }

    fn available(&self) -> &[u8] {
        &self.buffer[self.start..]
    }

    /// Reads more; `false` at the end of the part.
    fn fill(&mut self) -> Result<bool, PackageError> {
        if self.at_end {
            return Ok(false);
        }
        if self.start > 0 && self.start >= self.buffer.len() / 2 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        let old_len = self.buffer.len();
        self.buffer.resize(old_len + CHUNK, 0);
        let n_read = loop {
            match self.reader.read(&mut self.buffer[old_len..]) {
                Ok(n_read) => break n_read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    self.buffer.truncate(old_len);
                    return Err(error.into());
                }
            }
        };
        self.buffer.truncate(old_len + n_read);
        if n_read == 0 {
            self.at_end = true;
        }
        Ok(n_read > 0)
    }

    /// The position (from `start`) of `needle` at or after `from`, reading as far as needed.
    fn find(&mut self, needle: &[u8], from: usize) -> Result<Option<usize>, PackageError> {
        let mut searched = from;
        loop {
            if let Some(found) = memchr::memmem::find(&self.available()[searched..], needle) {
                return Ok(Some(searched + found));
            }
            searched = self
                .available()
                .len()
                .saturating_sub(needle.len())
                .max(from);
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// Makes at least `n` bytes available if the part has them.
    fn want(&mut self, n: usize) -> Result<bool, PackageError> {
        while self.available().len() < n {
            if !self.fill()? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let taken = self.available()[..n].to_vec();
        self.start += n;
        taken
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
    }

    fn rest(&mut self) -> Result<Vec<u8>, PackageError> {
        while self.fill()? {}
        let rest = self.available().to_vec();
        self.start = self.buffer.len();
        Ok(rest)
    }

    /// The end of the `<sheetData>` start tag (from `start`), or `None` for `<sheetData/>` or a
    /// part without one.
    fn find_sheet_data_start(&mut self) -> Result<Option<usize>, PackageError> {
        let mut from = 0;
        loop {
            let Some(found) = self.find(b"sheetData", from)? else {
                return Ok(None);
            };
            self.want(found + 64)?;
            let bytes = self.available();
            // `<sheetData` or `<x:sheetData`, a whole name.
            let name_start = bytes[..found].iter().rposition(|byte| {
                !(byte.is_ascii_alphanumeric() || *byte == b':' || *byte == b'_')
            });
            let opens = name_start.is_some_and(|position| bytes[position] == b'<');
            let whole = bytes
                .get(found + 9)
                .is_some_and(|byte| byte.is_ascii_whitespace() || *byte == b'>' || *byte == b'/');
            if opens && whole {
                let Some(tag_end) = self.find(b">", found)? else {
                    return Ok(None);
                };
                if self.available()[tag_end - 1] == b'/' {
                    return Ok(None);
                }
                return Ok(Some(tag_end + 1));
            }
            from = found + 9;
        }
    }
}

struct Patcher<'s, W: Write> {
    writer: Writer<W>,
    styles: &'s mut Styles,
    edit: SheetEdit,
    markup: MarkupState,
    /// The namespace prefix the sheet uses for its elements (`x:` or none).
    prefix: String,
    /// `<col min max style>` of the sheet: (first column, last column, style), 0-based.
    column_styles: Vec<(u32, u32, u32)>,
    /// The last date style seen in each column below the header.
    column_date_styles: HashMap<u32, u32>,
    /// The template row's cell styles by column.
    template_cells: BTreeMap<u32, Option<u32>>,
    template_row_attributes: Vec<(String, String)>,
    next_implicit_row: u32,
    /// Elements to insert before the first top-level element of a later kind: (order, XML).
    pending_inserts: Vec<(usize, Vec<u8>)>,
    /// New rows still to write, the next one last.
    new_rows: Vec<(u32, BTreeMap<u32, OutCell>)>,
    outcome: EditOutcome,
}

/// Where a cell being written gets its style.
#[derive(Debug, Clone, Copy)]
struct RowStyles {
    row_number: u32,
    /// The row's own style, when it applies to its empty cells (`customFormat`).
    row_style: Option<u32>,
    is_header: bool,
    /// A new row (or a new row merged into an empty one): cells take the template row's styles.
    from_template: bool,
}

impl<W: Write> Patcher<'_, W> {
    /// Walks markup outside the rows (the part before `<sheetData>`'s rows, or after them).
    fn markup(&mut self, bytes: &[u8]) -> Result<(), PackageError> {
        let mut reader = Reader::from_reader(bytes);
        // The part after the rows closes elements the part before them opened.
        reader.config_mut().check_end_names = false;
        reader.config_mut().allow_unmatched_ends = true;
        let mut state = std::mem::take(&mut self.markup);
        let result = self.walk_markup(&mut reader, &mut state);
        self.markup = state;
        result
    }

    fn walk_markup(
        &mut self,
        reader: &mut Reader<&[u8]>,
        state: &mut MarkupState,
    ) -> Result<(), PackageError> {
        let MarkupState {
            depth,
            in_sheet_data,
            in_cols,
            in_extension,
            pane_wanted_at,
        } = state;
        loop {
            let event = reader.read_event()?;
            let (element, is_empty) = match event {
                Event::Eof => return Ok(()),
                Event::Start(element) => (element, false),
                Event::Empty(element) => (element, true),
                Event::End(element) => {
                    *depth = depth.saturating_sub(1);
                    let local = element.local_name();
                    if *pane_wanted_at == Some(*depth + 1) {
                        *pane_wanted_at = None;
                        self.write_pane()?;
                    }
                    match (*depth, local.as_ref()) {
                        (1, "sheetData") => {
                            self.write_missing_rows_before(u32::MAX)?;
                            self.write_new_rows_before(u32::MAX)?;
                            *in_sheet_data = false;
                        }
                        (1, "cols") => *in_cols = false,
                        (1, "extLst") => *in_extension = false,
                        (0, _) => self.write_inserts_before(usize::MAX)?,
                        _ => {}
                    }
                    self.writer.write_event(Event::End(element))?;
                    continue;
                }
                other => {
                    self.writer.write_event(other)?;
                    continue;
                }
            };
            let local = element.local_name().as_ref().to_string();
            if *depth == 0 {
                self.prefix = xml::prefix_of(element.name().as_ref());
                self.queue_fresh_inserts();
            }
            if *in_sheet_data && *depth == 2 && local == "row" {
                return Err(PackageError::Malformed(
                    "a row outside the sheet's data".to_string(),
                ));
            }
            if *depth == 1 {
                if let Some(order) = order_of(&local) {
                    self.write_inserts_before(order)?;
                    // The sheet has one of its own: ours is not added.
                    self.pending_inserts
                        .retain(|(insert_order, _)| *insert_order != order);
                }
                if local == "extLst" {
                    *in_extension = true;
                }
            }
            if *pane_wanted_at == Some(*depth) {
                *pane_wanted_at = None;
                if local != "pane" {
                    self.write_pane()?;
                }
            }
            let edited = if *in_extension {
                None
            } else {
                self.edited_element(&element, &local, *depth)
            };
            let element = edited.unwrap_or_else(|| element.into_owned());
            match (*depth, local.as_str()) {
                (1, "sheetData") if is_empty => {
                    // A sheet without rows: open it so new rows have somewhere to go.
                    self.writer.write_event(Event::Start(element.borrow()))?;
                    self.write_missing_rows_before(u32::MAX)?;
                    self.write_new_rows_before(u32::MAX)?;
                    self.writer.write_event(Event::End(element.to_end()))?;
                    continue;
                }
                (1, "sheetData") => *in_sheet_data = true,
                (1, "cols") => *in_cols = !is_empty,
                (2, "col") if *in_cols => self.record_column_style(&element),
                (2, "sheetView") if self.edit.fresh.is_some() => {
                    if is_empty {
                        self.writer.write_event(Event::Start(element.borrow()))?;
                        self.write_pane()?;
                        self.writer.write_event(Event::End(element.to_end()))?;
                        continue;
                    }
                    *pane_wanted_at = Some(*depth + 1);
                }
                _ => {}
            }
            if is_empty {
                self.writer.write_event(Event::Empty(element))?;
            } else {
                self.writer.write_event(Event::Start(element))?;
                *depth += 1;
            }
        }
    }

    /// The element with its range attribute moved with deleted rows and grown over appended
    /// ones, or the sheet's dimension updated; `None` when it stays as it is.
    fn edited_element(
        &self,
        element: &BytesStart<'_>,
        local: &str,
        depth: usize,
    ) -> Option<BytesStart<'static>> {
        if depth == 1 && local == "dimension" {
            let text = xml::attribute(element, "ref")?;
            let range = Range::parse(&text)?;
            let mut range = if self.edit.shift.is_empty() {
                range
            } else {
                self.edit.shift.range(range).unwrap_or(range)
            };
            if let Some((_, last_row)) = self.edit.extend {
                range.last_row = range.last_row.max(last_row);
            }
            if let Some((last_row, _)) = self.edit.new_rows.last() {
                range.last_row = range.last_row.max(*last_row);
            }
            range.last_column = range.last_column.max(self.edit.max_column);
            let formatted = range.format();
            return (formatted != text)
                .then(|| xml::with_attributes(element, &[("ref", Some(&formatted))]));
        }
        if depth > 2 {
            return None;
        }
        let (attribute_name, extends) = range_attribute(local)?;
        let text = xml::attribute(element, attribute_name)?;
        let shift = &self.edit.shift;
        let extend = self.edit.extend.filter(|_| extends);
        if shift.is_empty() && extend.is_none() {
            return None;
        }
        let edited = cellref::edit_ranges(&text, |range| {
            let range = if shift.is_empty() {
                range
            } else {
                shift.range(range)?
            };
            Some(match extend {
                Some((after, last_row)) => cellref::extend_range(range, after, last_row),
                None => range,
            })
        })?;
        let name = attribute_name;
        (edited != text).then(|| xml::with_attributes(element, &[(name, Some(&edited))]))
    }

    fn record_column_style(&mut self, element: &BytesStart<'_>) {
        let number =
            |name: &str| xml::attribute(element, name).and_then(|value| value.parse::<u32>().ok());
        if let (Some(min), Some(max), Some(style)) = (number("min"), number("max"), number("style"))
        {
            if min >= 1 && max >= min {
                self.column_styles.push((min - 1, max - 1, style));
            }
        }
    }

    /// One `<row>` of `<sheetData>`, read through its end.
    /// The rows of `<sheetData>`, up to its end tag (left for the markup walk).
    fn rows<R: Read>(&mut self, chunks: &mut Chunks<R>) -> Result<(), PackageError> {
        let malformed =
            |what: &str| PackageError::Malformed(format!("the sheet's rows end {what}"));
        let row_tag = format!("<{}row", self.prefix);
        let row_end_tag = format!("</{}row>", self.prefix);
        loop {
            // Whitespace between rows is copied as it is.
            let Some(open) = chunks.find(b"<", 0)? else {
                return Err(malformed("without closing the sheet's data"));
            };
            self.writer
                .get_mut()
                .write_all(&chunks.available()[..open])?;
            chunks.consume(open);
            chunks.want(4)?;
            let bytes = chunks.available();
            if bytes.starts_with(b"</") {
                // The end of `<sheetData>`: the markup walk takes it from here.
                return Ok(());
            }
            if bytes.starts_with(b"<!--") || bytes.starts_with(b"<?") {
                let closing: &[u8] = if bytes.starts_with(b"<!--") {
                    b"-->"
                } else {
                    b"?>"
                };
                let Some(end) = chunks.find(closing, 2)? else {
                    return Err(malformed("inside a comment"));
                };
                let end = end + closing.len();
                self.writer
                    .get_mut()
                    .write_all(&chunks.available()[..end])?;
                chunks.consume(end);
                continue;
            }
            chunks.want(row_tag.len() + 1)?;
            let bytes = chunks.available();
            let is_row = bytes.starts_with(row_tag.as_bytes())
                && bytes.get(row_tag.len()).is_some_and(|byte| {
                    byte.is_ascii_whitespace() || *byte == b'>' || *byte == b'/'
                });
            if !is_row {
                return Err(PackageError::Malformed(
                    "the sheet's data holds something other than rows".to_string(),
                ));
            }
            let Some(tag_end) = chunks.find(b">", 0)? else {
                return Err(malformed("inside a row's tag"));
            };
            let row_end = if chunks.available()[tag_end - 1] == b'/' {
                tag_end + 1
            } else {
                match chunks.find(row_end_tag.as_bytes(), tag_end)? {
                    Some(end) => end + row_end_tag.len(),
                    None => return Err(malformed("inside a row")),
                }
            };
            let row_bytes = &chunks.available()[..row_end];
            let row_bytes: &[u8] = row_bytes;
            // The row's bytes live in `chunks` until it is consumed below.
            self.row(row_bytes)?;
            chunks.consume(row_end);
        }
    }

    /// One `<row>` element, whole. A row nothing happens to is written back as it was read.
    fn row(&mut self, row_bytes: &[u8]) -> Result<(), PackageError> {
        let mut reader = Reader::from_reader(row_bytes);
        reader.config_mut().check_end_names = false;
        let (element, is_empty) = match reader.read_event()? {
            Event::Start(element) => (element, false),
            Event::Empty(element) => (element, true),
            _ => return Err(PackageError::Malformed("a row without its tag".to_string())),
        };
        let has_number = xml::attribute(&element, "r");
        let number_as_read = has_number
            .as_deref()
            .and_then(|number| number.parse::<u32>().ok())
            .unwrap_or(self.next_implicit_row);
        self.next_implicit_row = number_as_read.saturating_add(1);
        let is_template = self.edit.template_row == Some(number_as_read);
        let untouched = has_number.is_some()
            && !is_template
            && !self.edit.style_rows.contains(&number_as_read)
            && self.edit.shift.map(number_as_read) == Some(number_as_read)
            && self
                .edit
                .rows
                .first_key_value()
                .is_none_or(|(first, _)| *first > number_as_read)
            && self
                .new_rows
                .last()
                .is_none_or(|(first_new, _)| *first_new > number_as_read);
        if untouched {
            self.writer.get_mut().write_all(row_bytes)?;
            return Ok(());
        }
        let element = element.into_owned();
        self.edited_row(&element, is_empty, &mut reader)
    }

    fn edited_row(
        &mut self,
        element: &BytesStart<'static>,
        is_empty: bool,
        reader: &mut Reader<&[u8]>,
    ) -> Result<(), PackageError> {
        let number_as_read = xml::attribute(element, "r")
            .and_then(|number| number.parse::<u32>().ok())
            .unwrap_or(self.next_implicit_row.saturating_sub(1));
        let is_template = self.edit.template_row == Some(number_as_read);
        if is_template {
            self.template_row_attributes = ["s", "customFormat", "ht", "customHeight"]
                .into_iter()
                .filter_map(|name| {
                    xml::attribute(element, name).map(|value| (name.to_string(), value))
                })
                .collect();
        }
        self.write_missing_rows_before(number_as_read)?;
        let Some(number) = self.edit.shift.map(number_as_read) else {
            // A deleted row: nothing of it is written, but it may still lend its styles.
            if !is_empty {
                self.skip_row(is_template, reader)?;
            }
            self.outcome.values_changed = true;
            return Ok(());
        };
        self.write_new_rows_before(number)?;
        let mut clear = false;
        let mut cells = match self.edit.rows.remove(&number_as_read) {
            Some(RowEdit::Cells(cells)) => cells,
            Some(RowEdit::Clear) => {
                clear = true;
                BTreeMap::new()
            }
            None => BTreeMap::new(),
        };
        // A new row that lands on an existing row (one with formatting only) is merged into it.
        let mut from_template = false;
        if self
            .new_rows
            .last()
            .is_some_and(|(new_number, _)| *new_number == number)
        {
            if let Some((_, new_cells)) = self.new_rows.pop() {
                cells.extend(new_cells);
                from_template = true;
            }
        }
        let custom_format = matches!(
            xml::attribute(element, "customFormat").as_deref(),
            Some("1" | "true")
        );
        let context = RowStyles {
            row_number: number,
            row_style: xml::attribute(element, "s")
                .and_then(|style| style.parse().ok())
                .filter(|_| custom_format),
            is_header: number_as_read == self.edit.header_row,
            from_template,
        };
        let renumber = number != number_as_read || xml::attribute(element, "r").is_none();
        let inserting = !cells.is_empty();
        let start = if renumber || inserting {
            let number_text = number.to_string();
            let spans = xml::attribute(element, "spans");
            xml::with_attributes(
                element,
                &[
                    ("r", Some(&number_text)),
                    ("spans", spans.as_deref().filter(|_| !inserting)),
                ],
            )
        } else {
            element.clone()
        };
        if is_empty {
            if cells.is_empty() {
                self.writer.write_event(Event::Empty(start))?;
            } else {
                self.writer.write_event(Event::Start(start.borrow()))?;
                self.write_cells_before(u32::MAX, &mut cells, context, None)?;
                self.writer.write_event(Event::End(start.to_end()))?;
            }
            return Ok(());
        }
        self.writer.write_event(Event::Start(start.borrow()))?;
        let mut next_column = 0u32;
        let mut left_style: Option<u32> = None;
        let mut depth_in_row = 0usize;
        loop {
            let event = reader.read_event()?;
            let cell_event = match event {
                Event::Start(cell) if depth_in_row == 0 && cell.local_name().as_ref() == "c" => {
                    Ok((cell, false))
                }
                Event::Empty(cell) if depth_in_row == 0 && cell.local_name().as_ref() == "c" => {
                    Ok((cell, true))
                }
                other => Err(other),
            };
            match cell_event {
                Ok((cell, is_empty_cell)) => {
                    let column = xml::attribute(&cell, "r")
                        .and_then(|reference| cellref::parse_cell(reference.as_bytes()))
                        .map(|(_, column)| column)
                        .unwrap_or(next_column);
                    next_column = column.saturating_add(1);
                    let style: Option<u32> =
                        xml::attribute(&cell, "s").and_then(|style| style.parse().ok());
                    if is_template {
                        self.template_cells.insert(column, style);
                    }
                    if let Some(style) = style.filter(|style| {
                        number_as_read > self.edit.header_row && self.styles.is_date(*style)
                    }) {
                        self.column_date_styles.insert(column, style);
                    }
                    let cell = cell.into_owned();
                    self.write_cells_before(column, &mut cells, context, left_style)?;
                    left_style = style;
                    if cells.contains_key(&column) || clear {
                        let content = if is_empty_cell {
                            Vec::new()
                        } else {
                            read_cell_content(reader)?
                        };
                        let has_formula = content.iter().any(|event| {
                            matches!(event, Event::Start(inner) | Event::Empty(inner) if inner.local_name().as_ref() == "f")
                        });
                        if has_formula {
                            if cells.remove(&column).is_some() {
                                self.outcome.kept_formulas.push((number, column));
                            }
                            self.write_cell_as_read(
                                &cell,
                                is_empty_cell,
                                &content,
                                renumber.then_some((number, column)),
                            )?;
                        } else if let Some(new_cell) = cells.remove(&column) {
                            self.write_cell(number, column, &new_cell, style)?;
                        } else {
                            // A cleared cell keeps its style, so the row keeps its look.
                            let had_value = content.iter().any(|event| matches!(event, Event::Start(inner) if matches!(inner.local_name().as_ref(), "v" | "is")));
                            self.outcome.values_changed |= had_value;
                            self.write_cell(number, column, &OutCell::Empty, style)?;
                        }
                        continue;
                    }
                    let cell = if renumber {
                        let name = cellref::cell_name(number, column);
                        xml::with_attributes(&cell, &[("r", Some(&name))])
                    } else {
                        cell
                    };
                    if is_empty_cell {
                        self.writer.write_event(Event::Empty(cell))?;
                    } else {
                        self.writer.write_event(Event::Start(cell))?;
                        depth_in_row += 1;
                    }
                }
                Err(Event::Start(other)) => {
                    self.writer.write_event(Event::Start(other))?;
                    depth_in_row += 1;
                }
                Err(Event::End(end)) if depth_in_row == 0 => {
                    self.write_cells_before(u32::MAX, &mut cells, context, left_style)?;
                    self.writer.write_event(Event::End(end))?;
                    return Ok(());
                }
                Err(Event::End(end)) => {
                    depth_in_row -= 1;
                    self.writer.write_event(Event::End(end))?;
                }
                Err(Event::Eof) => {
                    return Err(PackageError::Malformed(
                        "the sheet ends inside a row".to_string(),
                    ))
                }
                Err(other) => self.writer.write_event(other)?,
            }
        }
    }

    /// Writes a cell as it was read (its content including its end tag), renumbered if asked.
    fn write_cell_as_read(
        &mut self,
        cell: &BytesStart<'static>,
        is_empty: bool,
        content: &[Event<'static>],
        renumber: Option<(u32, u32)>,
    ) -> Result<(), PackageError> {
        let cell = match renumber {
            Some((row_number, column)) => {
                let name = cellref::cell_name(row_number, column);
                xml::with_attributes(cell, &[("r", Some(&name))])
            }
            None => cell.clone(),
        };
        if is_empty {
            self.writer.write_event(Event::Empty(cell))?;
            return Ok(());
        }
        self.writer.write_event(Event::Start(cell))?;
        for event in content {
            self.writer.write_event(event.borrow())?;
        }
        Ok(())
    }

    /// Skips a deleted row's content, remembering its cell styles if new rows copy them.
    fn skip_row(
        &mut self,
        is_template: bool,
        reader: &mut Reader<&[u8]>,
    ) -> Result<(), PackageError> {
        let mut depth = 0usize;
        let mut next_column = 0u32;
        loop {
            let event = reader.read_event()?;
            let is_start = matches!(event, Event::Start(_));
            match event {
                Event::Start(element) | Event::Empty(element)
                    if depth == 0 && element.local_name().as_ref() == "c" =>
                {
                    let column = xml::attribute(&element, "r")
                        .and_then(|reference| cellref::parse_cell(reference.as_bytes()))
                        .map(|(_, column)| column)
                        .unwrap_or(next_column);
                    next_column = column.saturating_add(1);
                    if is_template {
                        let style =
                            xml::attribute(&element, "s").and_then(|style| style.parse().ok());
                        self.template_cells.insert(column, style);
                    }
                    if is_start {
                        depth += 1;
                    }
                }
                Event::Start(_) => depth += 1,
                Event::End(_) if depth == 0 => return Ok(()),
                Event::End(_) => depth -= 1,
                Event::Eof => {
                    return Err(PackageError::Malformed(
                        "the sheet ends inside a row".to_string(),
                    ))
                }
                _ => {}
            }
        }
    }

    /// Writes the cells of `cells` whose column comes before `column`, taking them out.
    fn write_cells_before(
        &mut self,
        column: u32,
        cells: &mut BTreeMap<u32, OutCell>,
        context: RowStyles,
        left_style: Option<u32>,
    ) -> Result<(), PackageError> {
        while let Some(entry) = cells.first_entry() {
            if *entry.key() >= column {
                break;
            }
            let (cell_column, cell) = entry.remove_entry();
            let style = self.inserted_style(context, cell_column, left_style);
            self.write_cell(context.row_number, cell_column, &cell, style)?;
        }
        Ok(())
    }

    /// The style of a cell that did not exist: the template row's for a new row, the cell to its
    /// left for a header, else the row's or the column's own style.
    fn inserted_style(
        &self,
        context: RowStyles,
        column: u32,
        left_style: Option<u32>,
    ) -> Option<u32> {
        if context.from_template {
            if let Some(style) = self.template_cells.get(&column) {
                return *style;
            }
        }
        if context.is_header {
            return left_style;
        }
        context.row_style.or_else(|| {
            self.column_styles
                .iter()
                .find(|(first, last, _)| (*first..=*last).contains(&column))
                .map(|(_, _, style)| *style)
        })
    }

    /// Writes the edits of rows (as read) before `number_as_read` that the sheet has no `<row>`
    /// element for: rows whose cells were all empty.
    fn write_missing_rows_before(&mut self, number_as_read: u32) -> Result<(), PackageError> {
        while let Some(entry) = self.edit.rows.first_entry() {
            if *entry.key() >= number_as_read {
                break;
            }
            let (row_as_read, row_edit) = entry.remove_entry();
            let (Some(number), RowEdit::Cells(mut cells)) =
                (self.edit.shift.map(row_as_read), row_edit)
            else {
                continue;
            };
            self.write_new_rows_before(number)?;
            if cells.values().all(|cell| *cell == OutCell::Empty) {
                continue;
            }
            let start = BytesStart::new(format!("{}row", self.prefix))
                .with_attributes([("r", number.to_string().as_str())]);
            self.writer.write_event(Event::Start(start.borrow()))?;
            let context = RowStyles {
                row_number: number,
                row_style: None,
                is_header: false,
                from_template: false,
            };
            self.write_cells_before(u32::MAX, &mut cells, context, None)?;
            self.writer.write_event(Event::End(start.to_end()))?;
        }
        Ok(())
    }

    fn write_new_rows_before(&mut self, row_number: u32) -> Result<(), PackageError> {
        while self
            .new_rows
            .last()
            .is_some_and(|(number, _)| *number < row_number)
        {
            let Some((number, mut cells)) = self.new_rows.pop() else {
                break;
            };
            let mut start = BytesStart::new(format!("{}row", self.prefix));
            let number_text = number.to_string();
            start.push_attribute(("r", number_text.as_str()));
            for (name, value) in &self.template_row_attributes {
                start.push_attribute((name.as_str(), value.as_str()));
            }
            self.writer.write_event(Event::Start(start.borrow()))?;
            // Every styled cell of the template row, so that fills and borders run on.
            let styled: Vec<u32> = self
                .template_cells
                .iter()
                .filter(|(_, style)| style.is_some())
                .map(|(column, _)| *column)
                .collect();
            for column in styled {
                cells.entry(column).or_insert(OutCell::Empty);
            }
            let row_style = self
                .template_row_attributes
                .iter()
                .any(|(name, value)| name == "customFormat" && (value == "1" || value == "true"))
                .then(|| {
                    self.template_row_attributes
                        .iter()
                        .find(|(name, _)| name == "s")
                        .and_then(|(_, value)| value.parse().ok())
                })
                .flatten();
            let context = RowStyles {
                row_number: number,
                row_style,
                is_header: false,
                from_template: true,
            };
            self.write_cells_before(u32::MAX, &mut cells, context, None)?;
            self.writer.write_event(Event::End(start.to_end()))?;
            self.outcome.values_changed = true;
        }
        Ok(())
    }

    /// Writes one cell with new content in the given style (a date in a date style).
    fn write_cell(
        &mut self,
        row_number: u32,
        column: u32,
        cell: &OutCell,
        style: Option<u32>,
    ) -> Result<(), PackageError> {
        let prefix = self.prefix.clone();
        let name = cellref::cell_name(row_number, column);
        let style = match cell {
            OutCell::Date(_) if !style.is_some_and(|style| self.styles.is_date(style)) => self
                .column_date_styles
                .get(&column)
                .copied()
                .or_else(|| self.styles.date_variant(style.unwrap_or(0)))
                .or(style),
            _ => style,
        };
        let style_attribute = style
            .filter(|style| *style != 0)
            .map(|style| format!(" s=\"{style}\""))
            .unwrap_or_default();
        let xml = match cell {
            OutCell::Empty => {
                if style_attribute.is_empty() {
                    return Ok(());
                }
                format!("<{prefix}c r=\"{name}\"{style_attribute}/>")
            }
            OutCell::Text(text) => {
                let escaped = xml::escape(text);
                let space = if text.trim() != text || text.contains('\n') {
                    " xml:space=\"preserve\""
                } else {
                    ""
                };
                self.outcome.values_changed = true;
                format!("<{prefix}c r=\"{name}\"{style_attribute} t=\"inlineStr\"><{prefix}is><{prefix}t{space}>{escaped}</{prefix}t></{prefix}is></{prefix}c>")
            }
            OutCell::Number(number) if number.is_finite() => {
                self.outcome.values_changed = true;
                format!("<{prefix}c r=\"{name}\"{style_attribute}><{prefix}v>{number}</{prefix}v></{prefix}c>")
            }
            OutCell::Number(_) => return Ok(()),
            OutCell::Date(date) => match date_serial(*date, self.edit.date1904) {
                Some(serial) => {
                    self.outcome.values_changed = true;
                    format!("<{prefix}c r=\"{name}\"{style_attribute}><{prefix}v>{serial}</{prefix}v></{prefix}c>")
                }
                // A date Excel cannot hold as a number stays text.
                None => {
                    let text = date.format("%Y-%m-%d").to_string();
                    return self.write_cell(row_number, column, &OutCell::Text(text), style);
                }
            },
        };
        self.writer.get_mut().write_all(xml.as_bytes())?;
        Ok(())
    }

    fn write_pane(&mut self) -> Result<(), PackageError> {
        let Some(fresh) = &self.edit.fresh else {
            return Ok(());
        };
        let xml = pane_xml(&self.prefix, fresh.header_row);
        self.writer.get_mut().write_all(xml.as_bytes())?;
        Ok(())
    }

    fn write_inserts_before(&mut self, order: usize) -> Result<(), PackageError> {
        let mut remaining = Vec::new();
        for (insert_order, xml) in std::mem::take(&mut self.pending_inserts) {
            if insert_order < order {
                self.writer.get_mut().write_all(&xml)?;
            } else {
                remaining.push((insert_order, xml));
            }
        }
        self.pending_inserts = remaining;
        Ok(())
    }

    /// The elements a fresh sheet gets where it has none of its own, in the sheet's prefix.
    fn queue_fresh_inserts(&mut self) {
        let Some(fresh) = &self.edit.fresh else {
            return;
        };
        let prefix = &self.prefix;
        let mut inserts = vec![(
            2,
            format!(
                "<{prefix}sheetViews><{prefix}sheetView workbookViewId=\"0\">{}</{prefix}sheetView></{prefix}sheetViews>",
                pane_xml(prefix, fresh.header_row)
            ),
        )];
        let mut cols = format!("<{prefix}cols>");
        for (column_idx, width) in fresh.widths.iter().enumerate() {
            cols.push_str(&format!(
                "<{prefix}col min=\"{column}\" max=\"{column}\" width=\"{width:.2}\" customWidth=\"1\"/>",
                column = column_idx + 1
            ));
        }
        cols.push_str(&format!("</{prefix}cols>"));
        if !fresh.widths.is_empty() {
            inserts.push((4, cols));
        }
        inserts.push((
            10,
            format!(
                "<{prefix}autoFilter ref=\"{}\"/>",
                fresh.autofilter.format()
            ),
        ));
        if let Some((column, list)) = &fresh.stage_list {
            let letters = cellref::column_letters(*column);
            inserts.push((
                17,
                format!(
                    "<{prefix}dataValidations count=\"1\"><{prefix}dataValidation type=\"list\" errorStyle=\"warning\" allowBlank=\"1\" showErrorMessage=\"1\" sqref=\"{letters}{}:{letters}{}\"><{prefix}formula1>{}</{prefix}formula1></{prefix}dataValidation></{prefix}dataValidations>",
                    fresh.header_row + 1,
                    cellref::MAX_ROW,
                    xml::escape(list)
                ),
            ));
        }
        self.pending_inserts = inserts
            .into_iter()
            .map(|(order, xml)| (order, xml.into_bytes()))
            .collect();
    }
}

/// Reads a `<c>`'s content through its end tag.
fn read_cell_content(reader: &mut Reader<&[u8]>) -> Result<Vec<Event<'static>>, PackageError> {
    let mut content = Vec::new();
    let mut depth = 0usize;
    loop {
        let event = reader.read_event()?;
        match &event {
            Event::Start(_) => depth += 1,
            Event::End(_) if depth == 0 => {
                content.push(event.into_owned());
                return Ok(content);
            }
            Event::End(_) => depth -= 1,
            Event::Eof => {
                return Err(PackageError::Malformed(
                    "the sheet ends inside a cell".to_string(),
                ))
            }
            _ => {}
        }
        content.push(event.into_owned());
    }
}

fn pane_xml(prefix: &str, header_row: u32) -> String {
    format!(
        "<{prefix}pane ySplit=\"{header_row}\" topLeftCell=\"A{}\" activePane=\"bottomLeft\" state=\"frozen\"/>",
        header_row + 1
    )
}

/// Excel's serial number of a date: days since 1899-12-30 (or 1904-01-01 in the 1904 system),
/// counting Excel's phantom 29 February 1900. `None` before the system's first day.
pub fn date_serial(date: NaiveDate, date1904: bool) -> Option<i64> {
    if date1904 {
        let epoch = NaiveDate::from_ymd_opt(1904, 1, 1)?;
        let days = (date - epoch).num_days();
        return (days >= 0).then_some(days);
    }
    let epoch = NaiveDate::from_ymd_opt(1899, 12, 30)?;
    let days = (date - epoch).num_days();
    let first_of_march_1900 = NaiveDate::from_ymd_opt(1900, 3, 1)?;
    if date >= first_of_march_1900 {
        Some(days)
    } else if days >= 2 {
        Some(days - 1)
    } else {
        None
    }
}
