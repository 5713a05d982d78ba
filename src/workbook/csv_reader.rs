//! .csv files: encoding decided per file, delimiter sniffing, and row numbering as Excel shows
//! it — all streamed from the open file, so memory never follows the length of a line or a field.
//!
//! A file is read twice: once to check it (every limit, the encoding, NUL bytes) holding at most
//! one field, then once to keep its cells. Whatever refuses a file does so in the first pass.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::{Cell, CsvFormat, RowCollector, SheetRow, Violation, WorkbookError};
use super::{CsvEncoding, Limits};

/// How much of the file is read at a time.
const CHUNK: usize = 64 << 10;

/// Counts Excel rows over raw or decoded bytes: a newline outside quotes starts a new row.
/// Quotes and newlines are ASCII and never part of a multi-byte character in UTF-8 or GB18030.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowTracker {
    newlines: u64,
    in_quotes: bool,
}

impl RowTracker {
    fn feed(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            match byte {
                b'"' => self.in_quotes = !self.in_quotes,
                b'\n' if !self.in_quotes => self.newlines += 1,
                _ => {}
            }
        }
    }

    fn row(&self) -> u64 {
        self.newlines + 1
    }
}

/// What the hashing pass learns about whether a file is UTF-8, without holding it.
#[derive(Debug, Clone, Default)]
pub struct Utf8Census {
    /// Valid multi-byte UTF-8 characters.
    n_valid_multibyte: u64,
    /// Invalid byte sequences.
    n_invalid: u64,
    /// Where the first invalid sequence starts: byte offset and Excel row.
    first_invalid: Option<(u64, u64)>,
    /// Where the first row that reads as Chinese (or other) text in UTF-8 starts: byte offset and
    /// Excel row. Such a row in a file that is otherwise not UTF-8 was pasted from another file.
    first_utf8_text_row: Option<(u64, u64)>,
    /// Bytes of an incomplete character at the end of the previous chunk.
    carry: Vec<u8>,
    offset: u64,
    rows: RowTracker,
    /// The row being read: where it starts, and what its bytes were so far.
    row_start: u64,
    row_has_invalid: bool,
    /// Its valid UTF-8 characters of two bytes, and of three or four.
    row_n_two_byte: u32,
    row_n_longer: u32,
}

impl Utf8Census {
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(chunk);
        let mut start = 0;
        while start < bytes.len() {
            match std::str::from_utf8(&bytes[start..]) {
                Ok(valid) => {
                    self.count_valid(valid.as_bytes());
                    start = bytes.len();
                }
                Err(error) => {
                    let valid_end = start + error.valid_up_to();
                    self.count_valid(&bytes[start..valid_end]);
                    match error.error_len() {
                        Some(n_bad) => {
                            self.n_invalid += 1;
                            if self.first_invalid.is_none() {
                                self.first_invalid = Some((self.offset, self.rows.row()));
                            }
                            self.row_has_invalid = true;
                            // The bad bytes are never ASCII, so they hold no quote or newline.
                            self.offset += n_bad as u64;
                            start = valid_end + n_bad;
                        }
                        None => {
                            // A character cut by the chunk boundary: finish it with the next one.
                            self.carry = bytes[valid_end..].to_vec();
                            return;
                        }
                    }
                }
            }
        }
    }

    /// The file is complete: a character still cut is invalid.
    pub fn finish(&mut self) {
        if !self.carry.is_empty() {
            self.n_invalid += 1;
            if self.first_invalid.is_none() {
                self.first_invalid = Some((self.offset, self.rows.row()));
            }
            self.row_has_invalid = true;
            self.carry.clear();
        }
        self.end_row(false);
    }

    fn count_valid(&mut self, valid: &[u8]) {
        for &byte in valid {
            match byte {
                0xC0..=0xDF => {
                    self.n_valid_multibyte += 1;
                    self.row_n_two_byte += 1;
                }
                0xE0.. => {
                    self.n_valid_multibyte += 1;
                    self.row_n_longer += 1;
                }
                b'\n' => {
                    let was_in_quotes = self.rows.in_quotes;
                    self.rows.feed(&[byte]);
                    if !was_in_quotes {
                        self.offset += 1;
                        self.end_row(true);
                        continue;
                    }
                }
                _ => self.rows.feed(&[byte]),
            }
            self.offset += 1;
        }
    }

    /// A row ended (or the file did). Text that happens to be valid UTF-8 in a GB18030 file
    /// decodes to two-byte characters almost always, and to whole rows of three-byte characters
    /// next to never; a row of at least two such characters, more than it has of two bytes and
    /// none invalid, was written as UTF-8.
    fn end_row(&mut self, newline_counted: bool) {
        let is_utf8_text = !self.row_has_invalid
            && self.row_n_longer >= 2
            && self.row_n_longer > self.row_n_two_byte;
        if is_utf8_text && self.first_utf8_text_row.is_none() {
            // Once the tracker has counted the row's newline, its number is one less.
            let row = if newline_counted {
                self.rows.row() - 1
            } else {
                self.rows.row()
            };
            self.first_utf8_text_row = Some((self.row_start, row));
        }
        self.row_start = self.offset;
        self.row_has_invalid = false;
        self.row_n_two_byte = 0;
        self.row_n_longer = 0;
    }
}

/// Decides the file's encoding: a BOM wins; else the configured one; else UTF-8 when the whole
/// file is UTF-8, GB18030 (what Chinese Excel saves as "CSV") when it is not UTF-8 at all, and a
/// refusal when it is mostly UTF-8 with some bytes that are not: such a file mixes encodings,
/// and decoding it either way would store mojibake.
fn decide_encoding(
    path: &Path,
    head: &[u8],
    configured: CsvEncoding,
    census: Option<&Utf8Census>,
) -> Result<(&'static encoding_rs::Encoding, usize), WorkbookError> {
    if let Some((encoding, bom_length)) = encoding_rs::Encoding::for_bom(head) {
        return Ok((encoding, bom_length));
    }
    let census = match (configured, census) {
        (CsvEncoding::Fixed(fixed), _) => return Ok((fixed, 0)),
        (CsvEncoding::Auto, Some(census)) => census,
        (CsvEncoding::Auto, None) => return Ok((encoding_rs::UTF_8, 0)),
    };
    let Some((offset, row)) = census.first_invalid else {
        return Ok((encoding_rs::UTF_8, 0));
    };
    if census.n_valid_multibyte > census.n_invalid {
        return Err(WorkbookError::Malformed {
            path: path.to_path_buf(),
            expected: "text in one encoding (.csv)",
            detail: format!(
                "row {row} (byte {offset}) is not valid UTF-8 though the rest of the file is \
                 UTF-8: the file mixes encodings; save it again as UTF-8 (or set `encoding` for \
                 this source)"
            ),
        });
    }
    if let Some((offset, row)) = census.first_utf8_text_row {
        return Err(WorkbookError::Malformed {
            path: path.to_path_buf(),
            expected: "text in one encoding (.csv)",
            detail: format!(
                "row {row} (byte {offset}) is UTF-8 though the rest of the file is not (it reads \
                 as GB18030): the file mixes encodings; save it again in one encoding (or set \
                 `encoding` for this source)"
            ),
        });
    }
    Ok((encoding_rs::GB18030, 0))
}

/// Reads a .csv file in one pass, handing its rows to `sink` in batches as they are complete;
/// every cell is checked against the limits before it is kept. Returns how the file was written.
pub fn stream(
    path: &Path,
    file: &mut (impl Read + Seek),
    encoding: CsvEncoding,
    census: Option<&Utf8Census>,
    limits: &Limits,
    sink: &mut dyn FnMut(Vec<SheetRow>) -> Result<(), WorkbookError>,
) -> Result<CsvFormat, WorkbookError> {
    let io_error = |source| WorkbookError::Io {
        path: path.to_path_buf(),
        source,
    };
    file.seek(SeekFrom::Start(0)).map_err(io_error)?;
    let mut head = Vec::with_capacity(CHUNK);
    file.by_ref()
        .take(CHUNK as u64)
        .read_to_end(&mut head)
        .map_err(io_error)?;
    let (used_encoding, bom_length) = decide_encoding(path, &head, encoding, census)?;
    let delimiter = {
        let (text, _) = used_encoding.decode_without_bom_handling(&head[bom_length..]);
        // Only whole lines: the last one may be cut by the end of the sample.
        let whole = match text.rfind('\n') {
            Some(end) if head.len() == CHUNK => &text[..end],
            _ => &text[..],
        };
        sniff_delimiter(whole)
    };
    let mut format = CsvFormat {
        delimiter,
        encoding: used_encoding,
        has_bom: bom_length > 0,
        line_ending_crlf: false,
    };
    let mut collector = RowCollector::streaming(path, limits, sink);
    let endings = scan(path, file, &format, bom_length, &mut collector)?;
    collector.finish()?;
    format.line_ending_crlf = endings.crlf || !endings.lf;
    Ok(format)
}

#[derive(Debug, Clone, Copy, Default)]
struct LineEndings {
    crlf: bool,
    lf: bool,
}

/// One field being read: its first bytes (up to what a cell may hold) and its length.
struct FieldBuffer {
    bytes: Vec<u8>,
    cap: usize,
    n_chars: usize,
    /// Whether any byte was not ASCII white space.
    has_content: bool,
    overflowed: bool,
    newlines: u64,
}

impl FieldBuffer {
    fn push(&mut self, output: &[u8]) {
        if output.is_empty() {
            return;
        }
        self.n_chars += output.iter().filter(|byte| **byte & 0xC0 != 0x80).count();
        self.newlines += output.iter().filter(|byte| **byte == b'\n').count() as u64;
        self.has_content |= !output.iter().all(u8::is_ascii_whitespace);
        let room = self.cap.saturating_sub(self.bytes.len());
        let kept = &output[..room.min(output.len())];
        self.bytes.extend_from_slice(kept);
        self.overflowed |= kept.len() < output.len();
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.n_chars = 0;
        self.has_content = false;
        self.overflowed = false;
        self.newlines = 0;
    }
}

/// Streams the file through the decoder and the CSV parser once, handing every non-empty cell to
/// `collector` with its Excel row number.
fn scan(
    path: &Path,
    file: &mut (impl Read + Seek),
    format: &CsvFormat,
    bom_length: usize,
    collector: &mut RowCollector<'_>,
) -> Result<LineEndings, WorkbookError> {
    let io_error = |source| WorkbookError::Io {
        path: path.to_path_buf(),
        source,
    };
    let malformed = |detail: String| WorkbookError::Malformed {
        path: path.to_path_buf(),
        expected: "text (.csv)",
        detail,
    };
    file.seek(SeekFrom::Start(bom_length as u64))
        .map_err(io_error)?;
    let mut decoder = format.encoding.new_decoder_without_bom_handling();
    let mut raw = vec![0u8; CHUNK];
    let mut decoded = vec![0u8; CHUNK * 3 + 16];
    let mut records = RecordParser::new(format.delimiter, collector.limits.max_cell_chars);
    let mut raw_offset = bom_length as u64;
    let mut at_end = false;
    let mut endings = LineEndings::default();
    let mut previous_byte = 0u8;
    loop {
        let n_raw = if at_end {
            0
        } else {
            loop {
                match file.read(&mut raw) {
                    Ok(n_read) => break n_read,
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(error) => return Err(io_error(error)),
                }
            }
        };
        at_end = n_raw == 0;
        let mut raw_done = 0;
        loop {
            let (result, n_read, n_written) = decoder.decode_to_utf8_without_replacement(
                &raw[raw_done..n_raw],
                &mut decoded,
                at_end,
            );
            let text = &decoded[..n_written];
            if let Some(nul_at) = text.iter().position(|byte| *byte == 0) {
                let mut rows = records.state.rows;
                rows.feed(&text[..nul_at]);
                return Err(malformed(format!(
                    "row {} contains binary data (NUL bytes)",
                    rows.row()
                )));
            }
            for &byte in text {
                match byte {
                    b'\n' if previous_byte == b'\r' => endings.crlf = true,
                    b'\n' => endings.lf = true,
                    _ => {}
                }
                previous_byte = byte;
            }
            records.feed(text, collector)?;
            raw_done += n_read;
            match result {
                encoding_rs::DecoderResult::InputEmpty => break,
                encoding_rs::DecoderResult::OutputFull => continue,
                encoding_rs::DecoderResult::Malformed(n_bad, n_after) => {
                    let offset =
                        raw_offset + raw_done as u64 - u64::from(n_after) - u64::from(n_bad);
                    return Err(malformed(format!(
                        "row {} (byte {offset}) is not valid {} text; set `encoding` for this source",
                        records.state.rows.row(),
                        format.encoding.name()
                    )));
                }
            }
        }
        raw_offset += n_raw as u64;
        if at_end {
            // Let the parser finish the last record.
            records.end(collector)?;
            return Ok(endings);
        }
    }
}

/// Where the parse stands: what it consumed (for Excel row numbers) and rows seen.
#[derive(Debug, Clone, Default)]
struct ScanState {
    /// Newlines in the input the parser consumed.
    consumed_newlines: u64,
    /// Whether the parser is between records (skipping the line ends of blank lines).
    between_records: bool,
    /// `consumed_newlines` when the current record's first byte was consumed.
    record_start_newlines: u64,
    /// Newlines inside quoted fields of the records before this one.
    embedded_newlines: u64,
    /// Newlines inside fields of the current record.
    record_newlines: u64,
    /// The Excel row where the decoded text stands (for messages about bytes).
    rows: RowTracker,
    finished: bool,
}

impl ScanState {
    /// The current record's row, 0-based: Excel numbers every line (blank ones too) but counts a
    /// quoted field spanning several lines as one row.
    fn row_idx(&self) -> u32 {
        u32::try_from(
            self.record_start_newlines
                .saturating_sub(self.embedded_newlines),
        )
        .unwrap_or(u32::MAX)
    }

    fn consume(&mut self, consumed: &[u8]) {
        let mut rest = consumed;
        if self.between_records {
            if let Some(start) = rest.iter().position(|byte| !matches!(byte, b'\r' | b'\n')) {
                self.consumed_newlines +=
                    rest[..start].iter().filter(|byte| **byte == b'\n').count() as u64;
                self.record_start_newlines = self.consumed_newlines;
                self.between_records = false;
                rest = &rest[start..];
            }
        }
        self.consumed_newlines += rest.iter().filter(|byte| **byte == b'\n').count() as u64;
        self.rows.feed(consumed);
    }
}

use super::MOST_COLUMNS as MOST_FIELDS;

/// The CSV parser and what it holds of the record it is in: at most one field, cut at what a cell
/// may hold, and (when cells are kept) the record's cells.
struct RecordParser {
    parser: csv_core::Reader,
    scratch: Vec<u8>,
    field: FieldBuffer,
    record: Vec<(u32, Cell)>,
    column_idx: u32,
    state: ScanState,
}

impl RecordParser {
    fn new(delimiter: u8, max_cell_chars: usize) -> RecordParser {
        RecordParser {
            parser: csv_core::ReaderBuilder::new().delimiter(delimiter).build(),
            scratch: vec![0u8; CHUNK],
            // A cell over `max_cell_chars` is refused; no more than that is held of one field.
            field: FieldBuffer {
                bytes: Vec::new(),
                cap: max_cell_chars.saturating_mul(4).saturating_add(4),
                n_chars: 0,
                has_content: false,
                overflowed: false,
                newlines: 0,
            },
            record: Vec::new(),
            column_idx: 0,
            state: ScanState {
                between_records: true,
                ..ScanState::default()
            },
        }
    }

    /// Parses decoded text, handing each finished record's cells to `collector`. The text may
    /// end anywhere, in a field or between two.
    fn feed(
        &mut self,
        input: &[u8],
        collector: &mut RowCollector<'_>,
    ) -> Result<(), WorkbookError> {
        if input.is_empty() {
            // csv-core takes empty input for the end of the file: a chunk that decoded to
            // nothing (a character cut by the chunk's end) must not end the parse.
            return Ok(());
        }
        self.parse(input, collector)
    }

    /// The file ended: finishes the last record.
    fn end(&mut self, collector: &mut RowCollector<'_>) -> Result<(), WorkbookError> {
        self.parse(&[], collector)
    }

    /// Parses `input`; empty input means the end of the file.
    fn parse(
        &mut self,
        mut input: &[u8],
        collector: &mut RowCollector<'_>,
    ) -> Result<(), WorkbookError> {
        if self.state.finished {
            return Ok(());
        }
        let is_end = input.is_empty();
        let max_chars = collector.limits.max_cell_chars;
        loop {
            if input.is_empty() && !is_end {
                // All of this text is parsed; calling csv-core with nothing left would tell it
                // the file ended (and drop every row after this chunk).
                return Ok(());
            }
            let (result, n_in, n_out) = self.parser.read_field(input, &mut self.scratch);
            self.state.consume(&input[..n_in]);
            input = &input[n_in..];
            self.field.push(&self.scratch[..n_out]);
            if self.field.overflowed && self.field.has_content && self.field.n_chars > max_chars {
                // Longer than any cell may be: refused before the rest of it is even read.
                return Err(collector.refusal(
                    self.state.row_idx(),
                    Violation::Text {
                        column_idx: self.column_idx,
                        n_chars: None,
                    },
                ));
            }
            match result {
                csv_core::ReadFieldResult::InputEmpty => {
                    if input.is_empty() {
                        return Ok(());
                    }
                }
                csv_core::ReadFieldResult::OutputFull => {}
                csv_core::ReadFieldResult::Field { record_end } => {
                    self.state.record_newlines += self.field.newlines;
                    if self.column_idx >= MOST_FIELDS {
                        return Err(
                            collector.refusal(self.state.row_idx(), Violation::TooManyFields)
                        );
                    }
                    self.finish_field(collector)?;
                    self.column_idx += 1;
                    if record_end {
                        let row_idx = self.state.row_idx();
                        self.state.embedded_newlines += self.state.record_newlines;
                        self.state.record_newlines = 0;
                        self.state.between_records = true;
                        for (column, cell) in self.record.drain(..) {
                            collector.push(row_idx, column, cell)?;
                        }
                        self.column_idx = 0;
                    }
                }
                csv_core::ReadFieldResult::End => {
                    self.state.finished = true;
                    return Ok(());
                }
            }
        }
    }

    /// Ends one field: a blank one is nothing; any other becomes a cell of the record, once
    /// checked against the limits.
    fn finish_field(&mut self, collector: &RowCollector<'_>) -> Result<(), WorkbookError> {
        let text = String::from_utf8_lossy(&self.field.bytes);
        if !text.trim().is_empty() {
            // A leading apostrophe marks text that could be taken for a formula (funnelsync
            // writes values that way); the value is what follows it.
            let value = super::unescape_csv_field(&text);
            if let Some(violation) = collector.violation(self.column_idx, Some(value)) {
                return Err(collector.refusal(self.state.row_idx(), violation));
            }
            if collector.keeps_cells() {
                self.record
                    .push((self.column_idx, Cell::Text(value.into())));
            } else if self.record.is_empty() {
                // Checking only: one mark says the row has a value.
                self.record.push((self.column_idx, Cell::Bool(true)));
            }
        }
        self.field.clear();
        Ok(())
    }
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

    fn read_bytes(
        bytes: &[u8],
        encoding: CsvEncoding,
    ) -> Result<(Vec<SheetRow>, CsvFormat), WorkbookError> {
        read_with(bytes, encoding, &Limits::default())
    }

    fn read_with(
        bytes: &[u8],
        encoding: CsvEncoding,
        limits: &Limits,
    ) -> Result<(Vec<SheetRow>, CsvFormat), WorkbookError> {
        let mut census = Utf8Census::default();
        census.feed(bytes);
        census.finish();
        let mut rows = Vec::new();
        let format = stream(
            Path::new("x.csv"),
            &mut std::io::Cursor::new(bytes),
            encoding,
            Some(&census),
            limits,
            &mut |batch| {
                rows.extend(batch);
                Ok(())
            },
        )?;
        Ok((rows, format))
    }

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
        let (rows, format) = read_bytes(&bytes, CsvEncoding::Auto).expect("reads");
        assert_eq!(format.encoding, encoding_rs::GB18030);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].cell(0), &Cell::Text("甲\n公司".into()));
        assert_eq!(rows[1].row_number, 2);
        assert_eq!(rows[2].row_number, 4);
        assert_eq!(rows[2].cell(1), &Cell::Text("成交".into()));
    }

    #[test]
    fn every_row_is_read_wherever_the_chunks_of_the_file_end() {
        // The first row's length moves every later byte, so over these paddings the end of a
        // 64 KB chunk falls after a delimiter, after a newline, inside a field and inside a
        // multi-byte character.
        for (encoding, company) in [
            (encoding_rs::UTF_8, "Acme"),
            (encoding_rs::UTF_8, "上海甲公司"),
            (encoding_rs::GB18030, "上海甲公司"),
        ] {
            for padding in 0..24 {
                let mut text =
                    format!("Company,Stage,Amount\n{},Lead,1\n", "x".repeat(padding + 1));
                let n_rows = 9_000;
                for row_idx in 0..n_rows {
                    text.push_str(&format!("{company}{row_idx},Lead,{row_idx}\n"));
                }
                let (bytes, _, _) = encoding.encode(&text);
                let (rows, _) = read_bytes(&bytes, CsvEncoding::Auto).expect("reads");
                assert_eq!(
                    rows.len(),
                    n_rows + 2,
                    "{} {company} padding {padding}: the last row read is {:?}",
                    encoding.name(),
                    rows.last()
                );
                assert_eq!(
                    rows.last().map(|row| row.cell(2).clone()),
                    Some(Cell::Text((n_rows - 1).to_string().into()))
                );
            }
        }
    }

    #[test]
    fn gbk_text_that_happens_to_look_like_utf8_is_not_taken_for_a_pasted_row() {
        // Every pair of these common characters, as names, companies and cities: GBK bytes
        // that are valid UTF-8 by chance must not make the file look mixed.
        let characters: Vec<char> = "张王李赵刘陈杨黄周吴徐孙马朱胡郭何林高罗郑梁谢宋唐许韩冯邓曹\
            彭曾肖田董潘袁蔡蒋余于杜叶程魏苏吕丁任沈姚卢钟姜崔谭陆范汪廖石金韦贾夏付方邹熊白孟秦\
            邱侯江尹薛闫段雷龙黎史陶贺毛郝顾龚邵万覃武钱戴严欧莫孔向常汤康易乔赖文伟芳娜敏静丽强\
            磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰飞红春鑫波斌宇浩凯健俊帆帅旭宁龙林欣佳琳晨辉\
            上海北京深圳广州成都杭州南京武汉天津重庆科技有限公司贸易集团机会成交线索潜在赢单输单"
            .chars()
            .filter(|character| !character.is_whitespace())
            .collect();
        let mut text = String::from("公司,联系人,阶段,城市\n");
        for (idx, first) in characters.iter().enumerate() {
            for second in characters.iter().skip(idx % 3).step_by(3) {
                text.push_str(&format!(
                    "{first}{second}公司,{first}{second},机会,{second}\n"
                ));
            }
        }
        let (bytes, _, _) = encoding_rs::GB18030.encode(&text);
        let (rows, format) = read_bytes(&bytes, CsvEncoding::Auto).expect("reads as GB18030");
        assert_eq!(format.encoding, encoding_rs::GB18030);
        assert!(
            rows.len() > 5_000,
            "{} rows, last {:?}, lines {} bytes {}",
            rows.len(),
            rows.last(),
            text.lines().count(),
            bytes.len()
        );
    }

    #[test]
    fn a_file_mixing_utf8_and_gbk_is_refused_with_its_row_and_offset() {
        let mut bytes = "公司,阶段\n甲公司,机会\n乙公司,成交\n".as_bytes().to_vec();
        let (gbk, _, _) = encoding_rs::GB18030.encode("丙公司");
        bytes.extend_from_slice(&gbk);
        bytes.extend_from_slice(",机会\n".as_bytes());
        let error = read_bytes(&bytes, CsvEncoding::Auto).expect_err("refused");
        let text = error.to_string();
        assert!(
            text.contains("row 4") && text.contains("mixes encodings"),
            "{text}"
        );
        assert!(!error.is_retryable());
        // A GBK file with one row pasted from a UTF-8 file is refused too, naming that row.
        let mut gbk_first = encoding_rs::GB18030
            .encode("公司,阶段\n甲公司,机会\n")
            .0
            .into_owned();
        gbk_first.extend_from_slice("上海乙公司,成交\n".as_bytes());
        gbk_first.extend_from_slice(&encoding_rs::GB18030.encode("丙公司,机会\n丁公司,成交\n").0);
        let text = read_bytes(&gbk_first, CsvEncoding::Auto)
            .expect_err("refused")
            .to_string();
        assert!(
            text.contains("row 3 (byte 22) is UTF-8") && text.contains("mixes encodings"),
            "{text}"
        );
        // A whole GBK file is still read as GB18030.
        let (gbk_file, _, _) = encoding_rs::GB18030.encode("公司,阶段\n丙公司,机会\n");
        assert!(read_bytes(&gbk_file, CsvEncoding::Auto).is_ok());
        // A file that is neither is refused with the place of the first bad bytes.
        let error = read_with(
            b"Company,Stage\nAcme,Lead\n\xff\xff\xff,Lead\n",
            CsvEncoding::Fixed(encoding_rs::UTF_8),
            &Limits::default(),
        )
        .expect_err("refused");
        assert!(error.to_string().contains("row 3 (byte 24)"), "{error}");
    }

    #[test]
    fn limits_are_enforced_while_reading() {
        let limits = Limits {
            max_columns: 3,
            max_cell_chars: 5,
            max_rows: 2,
            ..Limits::default()
        };
        let error = |text: &str| {
            read_with(text.as_bytes(), CsvEncoding::Auto, &limits)
                .expect_err("refused")
                .to_string()
        };
        assert!(error("a,b\n,,,x\n").contains("row 2"));
        assert!(error("a,b\n\n\"x\ny\",b\n\n,,,x\n").contains("row 5"));
        // Empty fields past the limit are nothing, not columns.
        assert!(read_with(b"a,b,,,,,,\n", CsvEncoding::Auto, &limits).is_ok());
        assert!(error("a,b\nabcdef,b\n").contains("characters"));
        assert!(error(&format!("a,{}\n", "x".repeat(100))).contains("more than 5 characters"));
        // A record with more fields than any spreadsheet has columns, even empty ones.
        let commas = format!("a,b\n{}\n", ",".repeat(20_000));
        assert!(error(&commas).contains("row 2"), "{}", error(&commas));
        assert!(error("a\nb\n\nc\n").contains("rows"));
        assert!(read_with(b"a\n\n  \nb\n", CsvEncoding::Auto, &limits).is_ok());
        assert!(error("a\nb\x00\n").contains("NUL"));
    }

    proptest::proptest! {
        /// Any bytes at all: a CSV reader result or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = read_bytes(&bytes, CsvEncoding::Auto);
            let _ = read_bytes(&bytes, CsvEncoding::Fixed(encoding_rs::SHIFT_JIS));
            let _ = read_bytes(&bytes, CsvEncoding::Fixed(encoding_rs::UTF_16LE));
        }

        /// Text that is a valid CSV keeps its cells.
        #[test]
        fn cells_survive_quoting(cells in proptest::collection::vec("[a-zA-Z0-9 ,;\"éü中]{1,8}", 2..5)) {
            let mut writer = csv::Writer::from_writer(Vec::new());
            writer.write_record(["Company", "Stage", "A", "B", "C"].iter().take(cells.len())).expect("write");
            writer.write_record(&cells).expect("write");
            let bytes = writer.into_inner().expect("bytes");
            let (rows, _) = read_bytes(&bytes, CsvEncoding::Auto).expect("reads");
            let expected: Vec<Cell> = cells.iter().map(|cell| if cell.trim().is_empty() { Cell::Empty } else { Cell::Text(cell.as_str().into()) }).collect();
            if expected.iter().any(|cell| !cell.is_empty()) {
                for (column_idx, cell) in expected.iter().enumerate() {
                    proptest::prop_assert_eq!(rows[1].cell(column_idx), cell);
                }
            }
        }
    }

    #[test]
    fn bom_is_remembered() {
        let bytes = b"\xEF\xBB\xBFCompany;Stage\r\nAcme;Lead\r\n";
        let (rows, format) = read_bytes(bytes, CsvEncoding::Auto).expect("reads");
        assert!(format.has_bom);
        assert!(format.line_ending_crlf);
        assert_eq!(format.delimiter, b';');
        assert_eq!(rows[0].cell(0), &Cell::Text("Company".into()));
    }
}
