//! An .xlsx as calamine sees it when its worksheets are checked on a second core: the same
//! archive, except that each worksheet part is *stored* and its bytes come from a thread that
//! inflates the original entry and passes it through the XML guard ([`super::xml_guard`]) as
//! calamine reads it. calamine never sees a byte the guard has not passed, so the guard's memory
//! bound holds as when every part was scanned before calamine opened the file; but the guard and
//! the inflating now run beside calamine's parsing instead of before it, and the sheet is inflated
//! once instead of twice.
//!
//! Only a plain archive is presented this way: one without ZIP64 records, leading data,
//! encryption or duplicate names. For anything else [`GuardedZip::over`] says `None` and the file
//! is read as it always was, every part scanned first. The parts other than worksheets (the shared
//! strings, styles, the workbook) are still scanned before calamine opens the file, because it
//! reads them whole while opening it.
//!
//! It knows the zip format's records and which parts are worksheets, not what a cell is.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use super::xml_guard::{self, Bounds, Refusal};

const LOCAL_HEADER_SIGNATURE: u32 = 0x0403_4b50;
const CENTRAL_HEADER_SIGNATURE: u32 = 0x0201_4b50;
const END_SIGNATURE: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIGNATURE: u32 = 0x0706_4b50;
const END_RECORD_BYTES: usize = 22;
const CENTRAL_HEADER_BYTES: usize = 46;
/// A central directory larger than this is not a workbook's: such a file is read the plain way.
const MAX_DIRECTORY_BYTES: u64 = 16 << 20;
/// How many checked chunks of a worksheet may wait for calamine.
const CHUNKS_IN_FLIGHT: usize = 8;

/// A file handle read at explicit offsets, so that clones of it never move each other.
struct PositionedFile {
    file: Arc<File>,
    position: u64,
    len: u64,
}

impl Read for PositionedFile {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let n_read = self.file.read_at(buffer, self.position)?;
        self.position += n_read as u64;
        Ok(n_read)
    }
}

impl Seek for PositionedFile {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.position = seek_target(self.position, self.len, to)?;
        Ok(self.position)
    }
}

fn seek_target(position: u64, len: u64, to: SeekFrom) -> io::Result<u64> {
    let target = match to {
        SeekFrom::Start(offset) => Some(offset),
        SeekFrom::End(delta) => len.checked_add_signed(delta),
        SeekFrom::Current(delta) => position.checked_add_signed(delta),
    };
    target.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))
}

/// Where a piece of the presented archive comes from.
enum Source {
    /// The original file's bytes from this offset.
    File(u64),
    /// Bytes made here: a new local header, or the new central directory.
    Bytes(Vec<u8>),
    /// The inflated, checked bytes of one worksheet entry.
    Worksheet(Worksheet),
}

struct Worksheet {
    /// The entry's name in the archive, as its directory spells it.
    name: Vec<u8>,
    /// The entry being read now, if calamine is reading it.
    stream: Option<WorksheetStream>,
}

struct WorksheetStream {
    receiver: Receiver<Result<Vec<u8>, ()>>,
    /// How far into the entry the chunks received so far reach.
    position: u64,
    chunk: Vec<u8>,
    chunk_offset: usize,
    ended: bool,
}

struct Piece {
    start: u64,
    len: u64,
    source: Source,
}

/// The archive calamine reads (see the module doc).
pub struct GuardedZip {
    file: Arc<File>,
    pieces: Vec<Piece>,
    len: u64,
    position: u64,
    bounds: Bounds,
    /// Why the guard stopped a worksheet, for the caller to report instead of calamine's error.
    refusal: Arc<Mutex<Option<Refusal>>>,
}

/// A worksheet entry found in the central directory.
struct Entry {
    name: Vec<u8>,
    record_offset: usize,
}

fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(offset..offset + 2)?.try_into().ok()?,
    ))
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(offset..offset + 4)?.try_into().ok()?,
    ))
}

fn put_u16(bytes: &mut [u8], offset: usize, value: u16) {
    bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
}

fn put_u32(bytes: &mut [u8], offset: usize, value: u32) {
    bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

/// Whether an entry is a worksheet part (`xl/worksheets/sheetN.xml`, in any case).
pub fn is_worksheet(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower
        .strip_prefix("xl/worksheets/")
        .is_some_and(|rest| rest.ends_with(".xml") && !rest.contains('/'))
}

impl GuardedZip {
    /// The archive with its worksheets presented as checked streams, and the names of those
    /// worksheets (which the caller need not scan beforehand); `None` when the file is not a
    /// plain archive this can present, or has no worksheet.
    pub fn over(file: &File, bounds: Bounds) -> io::Result<Option<(GuardedZip, Vec<String>)>> {
        let len = file.metadata()?.len();
        let file = Arc::new(file.try_clone()?);
        let tail_len = len.min((END_RECORD_BYTES + usize::from(u16::MAX)) as u64);
        let mut tail = vec![0u8; tail_len as usize];
        file.read_exact_at(&mut tail, len - tail_len)?;
        // The end record is the last signature whose comment reaches exactly to the end.
        let Some(end_idx) = (0..=tail.len().saturating_sub(END_RECORD_BYTES))
            .rev()
            .find(|&idx| {
                u32_at(&tail, idx) == Some(END_SIGNATURE)
                    && u16_at(&tail, idx + 20).is_some_and(|comment| {
                        idx + END_RECORD_BYTES + usize::from(comment) == tail.len()
                    })
            })
        else {
            return Ok(None);
        };
        let end_offset = len - tail_len + end_idx as u64;
        let end_record = &tail[end_idx..];
        let (Some(disk), Some(directory_disk), Some(on_disk), Some(n_entries)) = (
            u16_at(end_record, 4),
            u16_at(end_record, 6),
            u16_at(end_record, 8),
            u16_at(end_record, 10),
        ) else {
            return Ok(None);
        };
        let (Some(directory_len), Some(directory_offset)) =
            (u32_at(end_record, 12), u32_at(end_record, 16))
        else {
            return Ok(None);
        };
        let directory_len = u64::from(directory_len);
        let directory_offset = u64::from(directory_offset);
        let zip64 = end_idx >= 20 && u32_at(&tail, end_idx - 20) == Some(ZIP64_LOCATOR_SIGNATURE);
        if zip64
            || disk != 0
            || directory_disk != 0
            || on_disk != n_entries
            || n_entries == u16::MAX
            || directory_offset.checked_add(directory_len) != Some(end_offset)
            || directory_len > MAX_DIRECTORY_BYTES
        {
            return Ok(None);
        }
        let mut directory = vec![0u8; directory_len as usize];
        file.read_exact_at(&mut directory, directory_offset)?;
        let Some(entries) = worksheet_entries(&directory, usize::from(n_entries)) else {
            return Ok(None);
        };
        if entries.is_empty() {
            return Ok(None);
        }
        // The presented archive: the original up to its directory, then a stored copy of each
        // worksheet (a new local header and the checked stream), then the patched directory.
        let mut pieces = vec![Piece {
            start: 0,
            len: directory_offset,
            source: Source::File(0),
        }];
        let mut at = directory_offset;
        let mut names = Vec::with_capacity(entries.len());
        for entry in &entries {
            let record = &directory[entry.record_offset..];
            let (Some(flags), Some(crc), Some(size)) =
                (u16_at(record, 8), u32_at(record, 16), u32_at(record, 24))
            else {
                return Ok(None);
            };
            let mut header = vec![0u8; 30];
            put_u32(&mut header, 0, LOCAL_HEADER_SIGNATURE);
            put_u16(&mut header, 4, 20);
            // The sizes are in the header now: no data descriptor follows.
            put_u16(&mut header, 6, flags & !0x0008);
            put_u16(&mut header, 8, 0);
            header[10..14].copy_from_slice(&record[12..16]);
            put_u32(&mut header, 14, crc);
            put_u32(&mut header, 18, size);
            put_u32(&mut header, 22, size);
            put_u16(&mut header, 26, entry.name.len() as u16);
            put_u16(&mut header, 28, 0);
            header.extend_from_slice(&entry.name);
            let Ok(header_offset) = u32::try_from(at) else {
                return Ok(None);
            };
            let record = &mut directory[entry.record_offset..];
            put_u16(record, 8, flags & !0x0008);
            put_u16(record, 10, 0);
            put_u32(record, 20, size);
            put_u32(record, 42, header_offset);
            let header_len = header.len() as u64;
            pieces.push(Piece {
                start: at,
                len: header_len,
                source: Source::Bytes(header),
            });
            at += header_len;
            pieces.push(Piece {
                start: at,
                len: u64::from(size),
                source: Source::Worksheet(Worksheet {
                    name: entry.name.clone(),
                    stream: None,
                }),
            });
            at += u64::from(size);
            names.push(String::from_utf8_lossy(&entry.name).into_owned());
        }
        let Ok(new_directory_offset) = u32::try_from(at) else {
            return Ok(None);
        };
        let mut end = end_record.to_vec();
        put_u32(&mut end, 16, new_directory_offset);
        directory.extend_from_slice(&end);
        let directory_bytes = directory.len() as u64;
        pieces.push(Piece {
            start: at,
            len: directory_bytes,
            source: Source::Bytes(directory),
        });
        at += directory_bytes;
        Ok(Some((
            GuardedZip {
                file,
                pieces,
                len: at,
                position: 0,
                bounds,
                refusal: Arc::new(Mutex::new(None)),
            },
            names,
        )))
    }

    /// A handle on the guard's verdict, which outlives the archive handed to calamine.
    pub fn refusal_slot(&self) -> Arc<Mutex<Option<Refusal>>> {
        Arc::clone(&self.refusal)
    }

    /// Reads the worksheet of a piece from `offset` within it. A read from its start starts the
    /// stream (afresh, if it had begun); a read ahead of the stream skips to it. A read from
    /// elsewhere — the zip reader looking backwards from the end for the directory — gets zeros:
    /// it wants no worksheet bytes, and inflating the sheet up to there would cost a whole pass.
    fn read_worksheet(
        &mut self,
        piece_idx: usize,
        offset: u64,
        buffer: &mut [u8],
    ) -> io::Result<usize> {
        let Source::Worksheet(worksheet) = &self.pieces[piece_idx].source else {
            return Ok(0);
        };
        let reachable = worksheet
            .stream
            .as_ref()
            .is_some_and(|stream| stream.position <= offset);
        if !reachable {
            if offset != 0 {
                buffer.fill(0);
                return Ok(buffer.len());
            }
            let stream = self.start_stream(&worksheet.name);
            if let Source::Worksheet(worksheet) = &mut self.pieces[piece_idx].source {
                worksheet.stream = Some(stream);
            }
        }
        let Source::Worksheet(Worksheet {
            stream: Some(stream),
            ..
        }) = &mut self.pieces[piece_idx].source
        else {
            return Ok(0);
        };
        stream.skip_to(offset)?;
        stream.read(buffer)
    }

    fn start_stream(&self, name: &[u8]) -> WorksheetStream {
        let (sender, receiver) = std::sync::mpsc::sync_channel(CHUNKS_IN_FLIGHT);
        let original = PositionedFile {
            file: Arc::clone(&self.file),
            position: 0,
            len: self
                .file
                .metadata()
                .map(|metadata| metadata.len())
                .unwrap_or(0),
        };
        let name = name.to_vec();
        let bounds = self.bounds;
        let refusal = Arc::clone(&self.refusal);
        let spawned = std::thread::Builder::new()
            .name("funnelsync-guard".to_string())
            .spawn(move || check_worksheet(original, &name, bounds, &sender, &refusal));
        if let Err(error) = spawned {
            // Without the thread the stream ends at once; calamine's read of it then fails on
            // its checksum, and this says why.
            if let Ok(mut slot) = self.refusal.lock() {
                slot.get_or_insert(Refusal::Unreadable(format!(
                    "cannot start the worksheet check: {error}"
                )));
            }
        }
        WorksheetStream {
            receiver,
            position: 0,
            chunk: Vec::new(),
            chunk_offset: 0,
            ended: false,
        }
    }
}

/// The worksheet entries of a central directory, or `None` when it is not a plain one.
fn worksheet_entries(directory: &[u8], n_entries: usize) -> Option<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut seen: HashSet<Vec<u8>> = HashSet::with_capacity(n_entries);
    let mut offset = 0;
    for _ in 0..n_entries {
        let record = directory.get(offset..)?;
        if u32_at(record, 0)? != CENTRAL_HEADER_SIGNATURE {
            return None;
        }
        let flags = u16_at(record, 8)?;
        let method = u16_at(record, 10)?;
        let compressed = u32_at(record, 20)?;
        let size = u32_at(record, 24)?;
        let name_len = usize::from(u16_at(record, 28)?);
        let extra_len = usize::from(u16_at(record, 30)?);
        let comment_len = usize::from(u16_at(record, 32)?);
        let disk = u16_at(record, 34)?;
        let local_offset = u32_at(record, 42)?;
        let name = record
            .get(CENTRAL_HEADER_BYTES..CENTRAL_HEADER_BYTES + name_len)?
            .to_vec();
        // Encryption, ZIP64 sizes or another disk: not a plain archive.
        if flags & 0x0001 != 0
            || compressed == u32::MAX
            || size == u32::MAX
            || local_offset == u32::MAX
            || disk != 0
        {
            return None;
        }
        let lower = name.to_ascii_lowercase();
        if !seen.insert(lower) {
            return None;
        }
        if (method == 0 || method == 8) && std::str::from_utf8(&name).is_ok_and(is_worksheet) {
            entries.push(Entry {
                name,
                record_offset: offset,
            });
        }
        offset += CENTRAL_HEADER_BYTES + name_len + extra_len + comment_len;
    }
    (offset == directory.len()).then_some(entries)
}

/// Inflates one worksheet of the original archive and hands each chunk on once the guard has
/// passed it. The last chunk waits until the whole part passed, so that calamine cannot finish a
/// part the guard then refuses.
fn check_worksheet(
    original: PositionedFile,
    name: &[u8],
    bounds: Bounds,
    sender: &SyncSender<Result<Vec<u8>, ()>>,
    refusal: &Mutex<Option<Refusal>>,
) {
    let part = String::from_utf8_lossy(name).into_owned();
    let refuse = |found: Refusal| {
        if let Ok(mut slot) = refusal.lock() {
            slot.get_or_insert(found);
        }
        let _ = sender.send(Err(()));
    };
    let mut archive = match zip::ZipArchive::new(original) {
        Ok(archive) => archive,
        Err(error) => return refuse(Refusal::Unreadable(format!("{part}: {error}"))),
    };
    let Some(entry_idx) = archive.index_for_name_raw(name) else {
        return refuse(Refusal::Unreadable(format!("{part}: not in the archive")));
    };
    let entry = match archive.by_index(entry_idx) {
        Ok(entry) => entry,
        Err(error) => return refuse(Refusal::Unreadable(format!("{part}: {error}"))),
    };
    // A failed send means calamine stopped reading (it had what it wanted): the check stops too.
    let passed = xml_guard::check_part_passing(&part, entry, bounds, &mut |chunk: &[u8]| {
        sender.send(Ok(chunk.to_vec())).is_ok()
    });
    if let Err(found) = passed {
        refuse(found);
    }
}

impl WorksheetStream {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        while self.chunk_offset == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            match self.receiver.recv() {
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.chunk_offset = 0;
                }
                Ok(Err(())) => {
                    self.ended = true;
                    return Err(io::Error::other("the XML guard refused the worksheet"));
                }
                // The checking thread finished: everything it passed was received.
                Err(_) => {
                    self.ended = true;
                    return Ok(0);
                }
            }
        }
        let n_copied = buffer.len().min(self.chunk.len() - self.chunk_offset);
        buffer[..n_copied]
            .copy_from_slice(&self.chunk[self.chunk_offset..self.chunk_offset + n_copied]);
        self.chunk_offset += n_copied;
        self.position += n_copied as u64;
        Ok(n_copied)
    }

    /// Skips ahead to `offset` within the entry.
    fn skip_to(&mut self, offset: u64) -> io::Result<()> {
        if self.position >= offset {
            return Ok(());
        }
        let mut scratch = vec![0u8; 64 << 10];
        while self.position < offset {
            let wanted = usize::try_from(offset - self.position)
                .unwrap_or(usize::MAX)
                .min(scratch.len());
            if self.read(&mut scratch[..wanted])? == 0 {
                break;
            }
        }
        Ok(())
    }
}

impl Read for GuardedZip {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if buffer.is_empty() || self.position >= self.len {
            return Ok(0);
        }
        let position = self.position;
        let Some(piece_idx) = self
            .pieces
            .iter()
            .position(|piece| position >= piece.start && position < piece.start + piece.len)
        else {
            return Ok(0);
        };
        let offset = position - self.pieces[piece_idx].start;
        let remaining = self.pieces[piece_idx].len - offset;
        let wanted = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(buffer.len());
        let n_read = match &self.pieces[piece_idx].source {
            Source::File(from) => {
                let from = from + offset;
                self.file.read_at(&mut buffer[..wanted], from)?
            }
            Source::Bytes(bytes) => {
                let from = offset as usize;
                buffer[..wanted].copy_from_slice(&bytes[from..from + wanted]);
                wanted
            }
            Source::Worksheet(_) => {
                self.read_worksheet(piece_idx, offset, &mut buffer[..wanted])?
            }
        };
        self.position += n_read as u64;
        Ok(n_read)
    }
}

impl Seek for GuardedZip {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.position = seek_target(self.position, self.len, to)?;
        Ok(self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn bounds() -> Bounds {
        Bounds {
            text_bytes: 1 << 10,
            tag_bytes: 1 << 10,
            string_chars: 1 << 10,
        }
    }

    fn archive(parts: &[(&str, &[u8])]) -> File {
        let mut file = tempfile::tempfile().expect("temp file");
        {
            let mut writer = zip::ZipWriter::new(&mut file);
            for (name, bytes) in parts {
                writer
                    .start_file(
                        *name,
                        zip::write::SimpleFileOptions::default()
                            .compression_method(zip::CompressionMethod::Deflated),
                    )
                    .expect("start");
                writer.write_all(bytes).expect("write");
            }
            writer.finish().expect("finish");
        }
        file
    }

    fn read_entry(zip: GuardedZip, name: &str) -> io::Result<Vec<u8>> {
        let mut archive = zip::ZipArchive::new(zip).map_err(io::Error::other)?;
        let mut entry = archive.by_name(name).map_err(io::Error::other)?;
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    #[test]
    fn a_worksheet_reads_as_it_was_and_other_parts_are_untouched() {
        let sheet = "<worksheet><sheetData><row r=\"1\"><c r=\"A1\"><v>1</v></c></row></sheetData></worksheet>".repeat(500);
        let file = archive(&[
            ("xl/workbook.xml", b"<workbook/>"),
            ("xl/worksheets/sheet1.xml", sheet.as_bytes()),
            ("xl/media/image1.png", &[7u8; 5000]),
        ]);
        let (zip, names) = GuardedZip::over(&file, bounds())
            .expect("read")
            .expect("a plain archive");
        assert_eq!(names, vec!["xl/worksheets/sheet1.xml".to_string()]);
        assert_eq!(
            read_entry(zip, "xl/worksheets/sheet1.xml").expect("sheet"),
            sheet.as_bytes()
        );
        let (zip, _) = GuardedZip::over(&file, bounds())
            .expect("read")
            .expect("plain");
        assert_eq!(
            read_entry(zip, "xl/media/image1.png").expect("image"),
            vec![7u8; 5000]
        );
        let (zip, _) = GuardedZip::over(&file, bounds())
            .expect("read")
            .expect("plain");
        assert_eq!(
            read_entry(zip, "xl/workbook.xml").expect("workbook"),
            b"<workbook/>"
        );
    }

    #[test]
    fn a_worksheet_the_guard_refuses_never_reaches_the_reader_whole() {
        let long_text = "x".repeat(100_000);
        let sheet = format!(
            "<worksheet><sheetData><row><c><v>{long_text}</v></c></row></sheetData></worksheet>"
        );
        let file = archive(&[("xl/worksheets/sheet1.xml", sheet.as_bytes())]);
        let (zip, _) = GuardedZip::over(&file, bounds())
            .expect("read")
            .expect("plain");
        let slot = zip.refusal_slot();
        let read = read_entry(zip, "xl/worksheets/sheet1.xml");
        assert!(read.is_err(), "the reader got the whole part");
        let refusal = slot.lock().expect("slot").clone();
        assert!(
            matches!(refusal, Some(Refusal::OverLimit { .. })),
            "{refusal:?}"
        );
    }

    #[test]
    fn only_plain_archives_with_worksheets_are_presented() {
        let file = archive(&[("xl/workbook.xml", b"<workbook/>")]);
        assert!(GuardedZip::over(&file, bounds()).expect("read").is_none());
        let mut not_a_zip = tempfile::tempfile().expect("temp file");
        not_a_zip
            .write_all(b"name,amount\nacme,1\n")
            .expect("write");
        assert!(GuardedZip::over(&not_a_zip, bounds())
            .expect("read")
            .is_none());
    }

    #[test]
    fn worksheet_names_are_recognised() {
        for (name, expected) in [
            ("xl/worksheets/sheet1.xml", true),
            ("XL/Worksheets/Sheet2.XML", true),
            ("xl/worksheets/_rels/sheet1.xml.rels", false),
            ("xl/sharedStrings.xml", false),
            ("xl/worksheets/sub/sheet1.xml", false),
        ] {
            assert_eq!(is_worksheet(name), expected, "{name}");
        }
    }
}
