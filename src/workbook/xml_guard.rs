//! A streaming check of the XML parts of an .xlsx or .ods before calamine reads them: calamine
//! (through quick-xml) holds each text, tag and comment whole in memory, and keeps every shared
//! string, so one hostile part could ask for gigabytes. This scan holds a few bytes of state per
//! part and refuses what could not come from a real workbook: a text or a tag longer than any
//! cell allows, a shared string longer than `max_cell_chars`, a shared-strings part that declares
//! far more strings than it holds (calamine reserves room for the declared count), and any
//! document type declaration (OOXML and ODF never have one; it is how XML entity attacks start).
//!
//! It knows bytes and element names, not what a cell means.

use std::io::Read;

/// What the scan found wrong, for [`super::WorkbookError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Over a limit: what, and the limit.
    OverLimit { what: String, limit: String },
    /// Not something a real workbook holds.
    Malformed(String),
    /// The part could not be read (a corrupt or half-written zip).
    Unreadable(String),
}

/// The bounds of one scan.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// The most bytes of text (or CDATA) between two tags.
    pub text_bytes: usize,
    /// The most bytes of one tag, comment or processing instruction.
    pub tag_bytes: usize,
    /// The most characters of one shared string.
    pub string_chars: usize,
}

impl Bounds {
    /// The bounds for a workbook read under `max_cell_chars`: a cell's text may take up to six
    /// bytes per character once escaped (`&quot;`), and a little more for formulas.
    pub fn for_cells(max_cell_chars: usize) -> Bounds {
        Bounds {
            text_bytes: max_cell_chars.saturating_mul(8).saturating_add(64 << 10),
            tag_bytes: 1 << 20,
            string_chars: max_cell_chars,
        }
    }
}

/// Whether an entry of the archive is read by calamine as XML (and so is scanned). Custom XML
/// parts hold arbitrary data that no reader of cells looks at.
pub fn is_scanned(entry_name: &str) -> bool {
    let lower = entry_name.to_ascii_lowercase();
    (lower.ends_with(".xml") || lower.ends_with(".rels")) && !lower.starts_with("customxml/")
}

/// Whether an entry is the shared-strings table of an .xlsx.
pub fn is_shared_strings(entry_name: &str) -> bool {
    entry_name
        .rsplit('/')
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case("sharedStrings.xml"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Markup {
    /// Just after `<`: not yet known what follows.
    Opening,
    /// After `<!`: a comment, CDATA or a declaration follows.
    Bang,
    /// After `<!-`.
    BangDash,
    /// After `<![`: CDATA.
    CdataStart,
    Element,
    Comment,
    Cdata,
    Instruction,
}

/// The scanner's state for one part.
struct Scanner<'a> {
    part: &'a str,
    bounds: Bounds,
    shared_strings: bool,
    in_markup: Option<Markup>,
    /// Bytes of the current text run, or of the current markup.
    run_bytes: usize,
    quote: Option<u8>,
    previous: [u8; 2],
    /// The current element's name (its first bytes), whether it closes, and its first bytes.
    name: Vec<u8>,
    name_done: bool,
    closing: bool,
    tag_head: Vec<u8>,
    // Shared strings only.
    in_text: bool,
    phonetic_depth: usize,
    in_entity: bool,
    entity_bytes: usize,
    string_chars: usize,
    n_strings: u64,
    declared_strings: Option<u64>,
    /// Whether a part that is not the shared strings takes [`Scanner::feed_plain`] (always, but
    /// in the test that holds it to the byte-by-byte way).
    plain_fast: bool,
}

impl<'a> Scanner<'a> {
    fn new(part: &'a str, bounds: Bounds) -> Scanner<'a> {
        Scanner {
            part,
            bounds,
            shared_strings: is_shared_strings(part),
            in_markup: None,
            run_bytes: 0,
            quote: None,
            previous: [0, 0],
            name: Vec::with_capacity(32),
            name_done: false,
            closing: false,
            tag_head: Vec::with_capacity(64),
            in_text: false,
            phonetic_depth: 0,
            in_entity: false,
            entity_bytes: 0,
            string_chars: 0,
            n_strings: 0,
            declared_strings: None,
            plain_fast: true,
        }
    }
}

impl Scanner<'_> {
    fn refuse_text(&self) -> Refusal {
        Refusal::OverLimit {
            what: format!(
                "a text of more than {} bytes in {}",
                self.bounds.text_bytes, self.part
            ),
            limit: format!("{} bytes of text", self.bounds.text_bytes),
        }
    }

    fn refuse_tag(&self) -> Refusal {
        Refusal::OverLimit {
            what: format!(
                "a tag of more than {} bytes in {}",
                self.bounds.tag_bytes, self.part
            ),
            limit: format!("{} bytes per tag", self.bounds.tag_bytes),
        }
    }

    /// Counts one byte of a shared string's text (outside phonetic runs), entities as one
    /// character.
    fn count_string_byte(&mut self, byte: u8) -> Result<(), Refusal> {
        if !(self.shared_strings && self.in_text && self.phonetic_depth == 0) {
            return Ok(());
        }
        if self.in_entity {
            self.entity_bytes += 1;
            if byte == b';' || self.entity_bytes > 12 {
                self.in_entity = false;
            }
            return Ok(());
        }
        if byte == b'&' {
            self.in_entity = true;
            self.entity_bytes = 0;
        } else if byte & 0xC0 == 0x80 {
            // A UTF-8 continuation byte: part of a character already counted.
            return Ok(());
        }
        self.string_chars += 1;
        if self.string_chars > self.bounds.string_chars {
            return Err(Refusal::OverLimit {
                what: format!(
                    "shared string {} in {} (more than {} characters)",
                    self.n_strings, self.part, self.bounds.string_chars
                ),
                limit: format!("{} characters", self.bounds.string_chars),
            });
        }
        Ok(())
    }

    fn end_element(&mut self, self_closing: bool) -> Result<(), Refusal> {
        let local = match self.name.iter().rposition(|byte| *byte == b':') {
            Some(colon) => &self.name[colon + 1..],
            None => &self.name[..],
        };
        if !self.shared_strings {
            return Ok(());
        }
        match (local, self.closing, self_closing) {
            (b"si", false, _) => {
                self.n_strings += 1;
                self.string_chars = 0;
            }
            (b"t", false, false) => self.in_text = true,
            (b"t", true, _) => self.in_text = false,
            (b"rPh", false, false) => self.phonetic_depth += 1,
            (b"rPh", true, _) => self.phonetic_depth = self.phonetic_depth.saturating_sub(1),
            (b"sst", false, _) => self.declared_strings = unique_count(&self.tag_head),
            _ => {}
        }
        Ok(())
    }

    fn feed(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
        if self.plain_fast && !self.shared_strings {
            return self.feed_plain(bytes);
        }
        let mut position = 0;
        while position < bytes.len() {
            // Fast paths, for the bulk of a sheet: text that is not a shared string only needs
            // its length counted up to the next `<`; inside an element whose name is known and
            // outside quotes, only a quote or `>` matter.
            let counting_strings = self.shared_strings && self.in_text && self.phonetic_depth == 0;
            match self.in_markup {
                None if !counting_strings => {
                    let rest = &bytes[position..];
                    let run = memchr::memchr(b'<', rest).unwrap_or(rest.len());
                    self.run_bytes += run;
                    if self.run_bytes > self.bounds.text_bytes {
                        return Err(self.refuse_text());
                    }
                    position += run;
                    if position == bytes.len() {
                        break;
                    }
                }
                // Inside a quoted attribute value only its closing quote matters; elsewhere in an
                // element, a quote or `>`. Outside shared strings an element's name is never
                // looked at: only its length and where it ends count.
                Some(Markup::Element)
                    if self.quote.is_some() || self.name_done || !self.shared_strings =>
                {
                    let rest = &bytes[position..];
                    let run = match self.quote {
                        Some(quote) => memchr::memchr(quote, rest),
                        None => memchr::memchr3(b'"', b'\'', b'>', rest),
                    }
                    .unwrap_or(rest.len());
                    // Only the shared strings' `<sst …>` tag is read back (for its count).
                    if self.shared_strings {
                        let room = 1024usize.saturating_sub(self.tag_head.len());
                        self.tag_head.extend_from_slice(&rest[..run.min(room)]);
                    }
                    // Only the two bytes before the special one matter (for `/>`).
                    if run >= 2 {
                        self.previous = [rest[run - 2], rest[run - 1]];
                    } else if run == 1 {
                        self.previous = [self.previous[1], rest[0]];
                    }
                    self.run_bytes += run;
                    if self.run_bytes > self.bounds.tag_bytes {
                        return Err(self.refuse_tag());
                    }
                    position += run;
                    if position == bytes.len() {
                        break;
                    }
                }
                _ => {}
            }
            let byte = bytes[position];
            position += 1;
            match self.in_markup {
                None => {
                    if byte == b'<' {
                        self.in_markup = Some(Markup::Opening);
                        self.run_bytes = 1;
                        self.in_entity = false;
                        continue;
                    }
                    self.run_bytes += 1;
                    if self.run_bytes > self.bounds.text_bytes {
                        return Err(self.refuse_text());
                    }
                    self.count_string_byte(byte)?;
                }
                Some(markup) => {
                    self.run_bytes += 1;
                    let limit = if markup == Markup::Cdata {
                        self.bounds.text_bytes
                    } else {
                        self.bounds.tag_bytes
                    };
                    if self.run_bytes > limit {
                        return Err(if markup == Markup::Cdata {
                            self.refuse_text()
                        } else {
                            self.refuse_tag()
                        });
                    }
                    self.markup_byte(markup, byte)?;
                }
            }
        }
        Ok(())
    }

    /// [`Self::feed`] for a part that is not the shared strings, where only the lengths of texts
    /// and tags, the quotes in tags and the kinds of markup matter: a text is skipped to its `<`
    /// and a tag from one quote or `>` to the next, a word at a time (the runs of a sheet are a
    /// few bytes each, too short for a vector search to pay for its call); the rarer markup —
    /// what follows a `<`, comments, CDATA, instructions — goes byte by byte as in `feed`.
    fn feed_plain(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
        let mut position = 0;
        while position < bytes.len() {
            let rest = &bytes[position..];
            match self.in_markup {
                None => {
                    let found = find_byte(rest, b'<');
                    self.run_bytes += found.unwrap_or(rest.len());
                    if self.run_bytes > self.bounds.text_bytes {
                        return Err(self.refuse_text());
                    }
                    let Some(run) = found else {
                        return Ok(());
                    };
                    self.in_markup = Some(Markup::Opening);
                    self.run_bytes = 1;
                    position += run + 1;
                }
                Some(Markup::Element) => {
                    let found = match self.quote {
                        Some(quote) => find_byte(rest, quote),
                        None => find_tag_byte(rest),
                    };
                    // The run, and the byte that ends it.
                    self.run_bytes += found.map_or(rest.len(), |run| run + 1);
                    if self.run_bytes > self.bounds.tag_bytes {
                        return Err(self.refuse_tag());
                    }
                    let Some(run) = found else {
                        return Ok(());
                    };
                    let byte = rest[run];
                    match self.quote {
                        Some(_) => self.quote = None,
                        None if byte == b'>' => {
                            self.in_markup = None;
                            self.run_bytes = 0;
                            self.previous = [0, 0];
                        }
                        None => self.quote = Some(byte),
                    }
                    position += run + 1;
                }
                // What follows a `<`: most often an element's name, which a part that is not
                // the shared strings never looks at.
                Some(Markup::Opening) if !matches!(rest[0], b'!' | b'?') => {
                    let byte = rest[0];
                    position += 1;
                    self.run_bytes += 1;
                    if self.run_bytes > self.bounds.tag_bytes {
                        return Err(self.refuse_tag());
                    }
                    if byte == b'>' {
                        self.in_markup = None;
                        self.run_bytes = 0;
                        self.previous = [0, 0];
                    } else {
                        self.in_markup = Some(Markup::Element);
                        self.quote = None;
                    }
                }
                Some(markup) => {
                    let byte = rest[0];
                    position += 1;
                    self.run_bytes += 1;
                    if markup == Markup::Cdata {
                        if self.run_bytes > self.bounds.text_bytes {
                            return Err(self.refuse_text());
                        }
                    } else if self.run_bytes > self.bounds.tag_bytes {
                        return Err(self.refuse_tag());
                    }
                    self.markup_byte(markup, byte)?;
                }
            }
        }
        Ok(())
    }

    fn markup_byte(&mut self, markup: Markup, byte: u8) -> Result<(), Refusal> {
        let ended = |scanner: &mut Scanner<'_>| {
            scanner.in_markup = None;
            scanner.run_bytes = 0;
            scanner.previous = [0, 0];
        };
        match markup {
            Markup::Opening => match byte {
                b'!' => self.in_markup = Some(Markup::Bang),
                b'?' => self.in_markup = Some(Markup::Instruction),
                _ => {
                    self.in_markup = Some(Markup::Element);
                    self.name.clear();
                    self.name_done = false;
                    self.closing = byte == b'/';
                    self.quote = None;
                    self.tag_head.clear();
                    self.tag_head.push(byte);
                    if !self.closing {
                        if byte == b'>' {
                            ended(self);
                            return self.end_element(false);
                        }
                        self.name.push(byte);
                    }
                }
            },
            Markup::Bang => match byte {
                b'-' => self.in_markup = Some(Markup::BangDash),
                b'[' => self.in_markup = Some(Markup::CdataStart),
                _ => {
                    return Err(Refusal::Malformed(format!(
                        "{} declares a document type (<!{}…); workbooks never do, and it is how \
                         XML entity attacks (XXE) start",
                        self.part, byte as char
                    )))
                }
            },
            Markup::BangDash => self.in_markup = Some(Markup::Comment),
            Markup::CdataStart => {
                // `<![CDATA[`: the rest of the opening is part of the markup's length.
                if byte == b'[' {
                    self.in_markup = Some(Markup::Cdata);
                    self.previous = [0, 0];
                }
            }
            Markup::Comment | Markup::Cdata | Markup::Instruction => {
                let closes = match markup {
                    Markup::Comment => byte == b'>' && self.previous == [b'-', b'-'],
                    Markup::Cdata => byte == b'>' && self.previous == [b']', b']'],
                    _ => byte == b'>' && self.previous[1] == b'?',
                };
                if markup == Markup::Cdata && !closes {
                    self.count_string_byte(byte)?;
                }
                self.previous = [self.previous[1], byte];
                if closes {
                    ended(self);
                }
            }
            Markup::Element => {
                if self.shared_strings && self.tag_head.len() < 1024 {
                    self.tag_head.push(byte);
                }
                match self.quote {
                    Some(quote) if byte == quote => self.quote = None,
                    Some(_) => {}
                    None => match byte {
                        b'"' | b'\'' => self.quote = Some(byte),
                        b'>' => {
                            let self_closing = self.previous[1] == b'/';
                            ended(self);
                            return self.end_element(self_closing);
                        }
                        _ => {
                            if !self.name_done {
                                if byte.is_ascii_whitespace() || byte == b'/' {
                                    self.name_done = !self.name.is_empty();
                                } else if self.name.len() < 32 {
                                    self.name.push(byte);
                                }
                            }
                        }
                    },
                }
                self.previous = [self.previous[1], byte];
            }
        }
        Ok(())
    }
}

/// Eight copies of a byte, one per byte of a word.
const fn repeated(byte: u8) -> u64 {
    u64::from_le_bytes([byte; 8])
}

/// The bytes of `word` equal to `byte`, each marked by its high bit. Only the lowest mark is
/// sure (a borrow can mark a byte above a true one), and only the lowest is used.
fn equal_bytes(word: u64, byte: u8) -> u64 {
    let difference = word ^ repeated(byte);
    difference.wrapping_sub(repeated(0x01)) & !difference & repeated(0x80)
}

/// How many words a search looks at itself before it hands a long run to `memchr`.
const WORDS_BEFORE_MEMCHR: usize = 4;

/// The first position of `needle` in `haystack`, as [`find_in_words`] looks.
fn find_byte(haystack: &[u8], needle: u8) -> Option<usize> {
    find_in_words(
        haystack,
        |word| equal_bytes(word, needle),
        |byte| byte == needle,
        |rest| memchr::memchr(needle, rest),
    )
}

/// The first quote or `>` in `haystack`, as [`find_in_words`] looks.
fn find_tag_byte(haystack: &[u8]) -> Option<usize> {
    find_in_words(
        haystack,
        |word| equal_bytes(word, b'"') | equal_bytes(word, b'\'') | equal_bytes(word, b'>'),
        |byte| matches!(byte, b'"' | b'\'' | b'>'),
        |rest| memchr::memchr3(b'"', b'\'', b'>', rest),
    )
}

/// The first match in `haystack`: the first [`WORDS_BEFORE_MEMCHR`] words a word at a time with
/// `marks` (a word's matching bytes, as [`equal_bytes`] marks them), the last bytes of a shorter
/// haystack one by one with `is_match`, and what a longer haystack has beyond those words with
/// `search_rest` (a vector search, which pays for its call only on a long run).
fn find_in_words(
    haystack: &[u8],
    marks: impl Fn(u64) -> u64,
    is_match: impl Fn(u8) -> bool,
    search_rest: impl Fn(&[u8]) -> Option<usize>,
) -> Option<usize> {
    let mut words = haystack.chunks_exact(8);
    for (word_idx, word) in words.by_ref().take(WORDS_BEFORE_MEMCHR).enumerate() {
        let mut word_bytes = [0u8; 8];
        word_bytes.copy_from_slice(word);
        let found = marks(u64::from_le_bytes(word_bytes));
        if found != 0 {
            return Some(word_idx * 8 + found.trailing_zeros() as usize / 8);
        }
    }
    let searched = WORDS_BEFORE_MEMCHR * 8;
    if haystack.len() >= searched {
        return search_rest(&haystack[searched..]).map(|position| searched + position);
    }
    let tail = haystack.len() / 8 * 8;
    haystack[tail..]
        .iter()
        .position(|byte| is_match(*byte))
        .map(|position| tail + position)
}

/// The `uniqueCount` attribute of an `<sst …>` tag.
fn unique_count(tag: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(tag);
    let start = text.find("uniqueCount")? + "uniqueCount".len();
    let rest = text[start..].trim_start().strip_prefix('=')?.trim_start();
    let rest = rest.strip_prefix(['"', '\''])?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Scans one XML part of the archive, named `part`, read from `reader`.
pub fn check_part(part: &str, reader: impl Read, bounds: Bounds) -> Result<(), Refusal> {
    check_part_passing(part, reader, bounds, &mut |_| true)
}

/// [`check_part`], handing each chunk of the part to `pass` once it has been checked, for a
/// reader that reads the part as it is checked. The last chunk is handed on only after the whole
/// part passed, so that the reader never finishes a part the check refuses at its end. When
/// `pass` returns false (nobody reads any more), the check stops there and passes.
pub fn check_part_passing(
    part: &str,
    mut reader: impl Read,
    bounds: Bounds,
    pass: &mut dyn FnMut(&[u8]) -> bool,
) -> Result<(), Refusal> {
    let mut scanner = Scanner::new(part, bounds);
    let mut buffer = vec![0u8; 64 << 10];
    let mut checked: Vec<u8> = Vec::new();
    loop {
        let n_read = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n_read) => n_read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(Refusal::Unreadable(format!("{part}: {error}"))),
        };
        scanner.feed(&buffer[..n_read])?;
        if !checked.is_empty() && !pass(&checked) {
            return Ok(());
        }
        checked.clear();
        checked.extend_from_slice(&buffer[..n_read]);
    }
    // calamine reserves room for the declared number of strings before reading them.
    if let Some(declared) = scanner.declared_strings {
        if declared > scanner.n_strings.saturating_add(1024) {
            return Err(Refusal::Malformed(format!(
                "{part} declares {declared} shared strings but holds {}",
                scanner.n_strings
            )));
        }
    }
    if !checked.is_empty() {
        pass(&checked);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(part: &str, xml: &str, string_chars: usize) -> Result<(), Refusal> {
        check_part(
            part,
            xml.as_bytes(),
            Bounds {
                text_bytes: 100,
                tag_bytes: 200,
                string_chars,
            },
        )
    }

    /// Scans `xml` fed in chunks of `chunk_len` bytes, the plain way or byte by byte.
    fn scan(xml: &[u8], chunk_len: usize, plain_fast: bool) -> Result<(), Refusal> {
        let bounds = Bounds {
            text_bytes: 40,
            tag_bytes: 60,
            string_chars: 10,
        };
        let mut scanner = Scanner::new("xl/worksheets/sheet1.xml", bounds);
        scanner.plain_fast = plain_fast;
        for chunk in xml.chunks(chunk_len.max(1)) {
            scanner.feed(chunk)?;
        }
        Ok(())
    }

    /// Pieces of markup, well-formed and not, that random worksheets are made of.
    const PIECES: &[&str] = &[
        "<",
        ">",
        "\"",
        "'",
        "/",
        "!",
        "-",
        "?",
        "[",
        "]",
        "x",
        " ",
        "é",
        "<c r=\"A1\" t=\"s\">",
        "</c>",
        "<is><t>",
        "</t></is>",
        "<!--",
        "-->",
        "<![CDATA[",
        "]]>",
        "<?xml v?>",
        "<!DOCTYPE",
        "<a b='>'>",
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "<row r=\"2\"/>",
    ];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
        #[test]
        fn the_plain_way_gives_the_verdict_of_the_byte_by_byte_way(
            picks in proptest::collection::vec(0..PIECES.len(), 0..120),
            chunk_len in 1usize..90,
        ) {
            let xml: String = picks.iter().map(|pick| PIECES[*pick]).collect();
            proptest::prop_assert_eq!(
                scan(xml.as_bytes(), chunk_len, true),
                scan(xml.as_bytes(), chunk_len, false),
                "{}", xml
            );
        }
    }

    #[test]
    fn the_plain_way_finds_bytes_near_and_far() {
        for len in 0..80 {
            for at in 0..len {
                let mut haystack = vec![b'x'; len];
                haystack[at] = b'<';
                assert_eq!(find_byte(&haystack, b'<'), Some(at), "{len} {at}");
                haystack[at] = b'\'';
                assert_eq!(find_tag_byte(&haystack), Some(at), "{len} {at}");
            }
            // A byte that is one more than the needle after a match must not be taken for one.
            let mut haystack = vec![b'x'; len];
            if len >= 2 {
                haystack[len - 2] = b'<';
                haystack[len - 1] = b'=';
                assert_eq!(find_byte(&haystack, b'<'), Some(len - 2));
            }
            assert_eq!(find_byte(&vec![b'x'; len], b'<'), None);
            assert_eq!(find_tag_byte(&vec![b'x'; len]), None);
        }
    }

    #[test]
    fn real_parts_pass_and_hostile_ones_are_refused() {
        let strings = "<?xml version=\"1.0\"?><sst xmlns=\"x\" count=\"2\" uniqueCount=\"2\"><si><t>Acme &amp; Co</t></si><si><r><t>中文</t></r><rPh><t>long phonetic text ignored</t></rPh></si></sst>";
        assert_eq!(check("xl/sharedStrings.xml", strings, 10), Ok(()));
        // "Acme & Co" is 9 characters, entity included.
        assert!(check("xl/sharedStrings.xml", strings, 8).is_err());
        let sheet = "<worksheet><!-- a > comment --><sheetData><row r=\"1\"><c r=\"A1\" t=\"inlineStr\"><is><t><![CDATA[x<y]]></t></is></c></row></sheetData></worksheet>";
        assert_eq!(check("xl/worksheets/sheet1.xml", sheet, 10), Ok(()));

        let long_text = format!("<a>{}</a>", "x".repeat(101));
        assert!(matches!(
            check("xl/worksheets/sheet1.xml", &long_text, 10),
            Err(Refusal::OverLimit { .. })
        ));
        let long_tag = format!("<a b=\"{}>\">", ">".repeat(300));
        assert!(matches!(
            check("xl/styles.xml", &long_tag, 10),
            Err(Refusal::OverLimit { .. })
        ));
        let long_comment = format!("<a><!--{}--></a>", "<b>".repeat(100));
        assert!(check("xl/styles.xml", &long_comment, 10).is_err());
        let doctype = "<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY e SYSTEM \"file:///etc/passwd\">]><x>&e;</x>";
        assert!(matches!(
            check("xl/workbook.xml", doctype, 10),
            Err(Refusal::Malformed(_))
        ));
        let lying = "<sst uniqueCount=\"999999999999\"><si><t>a</t></si></sst>";
        assert!(matches!(
            check("xl/sharedStrings.xml", lying, 10),
            Err(Refusal::Malformed(_))
        ));
    }
}
