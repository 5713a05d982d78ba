//! The workbook's cell styles as far as the write-back needs them: which style indexes show a
//! date, and — only when a date must go into a column that has no date style — one new `xf`
//! per base style, appended to `cellXfs`.

use std::collections::{HashMap, HashSet};

use quick_xml::events::Event;

use super::xml::{self, Splice};
use super::PackageError;

/// Excel's built-in number formats that show dates or times.
fn is_builtin_date_format(num_fmt_id: u32) -> bool {
    matches!(num_fmt_id, 14..=22 | 27..=36 | 45..=47 | 50..=58 | 71..=81)
}

/// Whether a custom number format code shows a date or time: a d, m, y, h or s outside quotes,
/// brackets and escapes (`[Red]0.00` and `"days"0` are not dates).
pub fn is_date_format_code(code: &str) -> bool {
    let mut in_quotes = false;
    let mut in_brackets = false;
    let mut escaped = false;
    // Only the first section (positive numbers) decides, as Excel does.
    for character in code.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match character {
            '\\' => escaped = true,
            '"' => in_quotes = !in_quotes,
            '[' if !in_quotes => in_brackets = true,
            ']' if !in_quotes => in_brackets = false,
            ';' if !in_quotes && !in_brackets => return false,
            'd' | 'D' | 'm' | 'M' | 'y' | 'Y' | 'h' | 'H' | 's' | 'S'
                if !in_quotes && !in_brackets =>
            {
                return true
            }
            _ => {}
        }
    }
    false
}

#[derive(Debug, Default)]
pub struct Styles {
    /// The number format of each `cellXfs` entry, by style index.
    xf_formats: Vec<u32>,
    /// The raw XML of each `cellXfs` entry, to derive new entries from.
    xf_raw: Vec<Vec<u8>>,
    date_formats: HashSet<u32>,
    /// New entries appended to `cellXfs`: base style index → new style index.
    added: HashMap<u32, u32>,
    added_raw: Vec<Vec<u8>>,
    /// Where `cellXfs` starts (its start tag) and ends (its end tag) in the part.
    cell_xfs_tag: Option<(usize, usize, bool)>,
    cell_xfs_end: Option<usize>,
}

impl Styles {
    pub fn parse(bytes: &[u8]) -> Result<Styles, PackageError> {
        let mut styles = Styles::default();
        let mut in_cell_xfs = false;
        let mut xf_start: Option<(usize, u32)> = None;
        let mut depth = 0usize;
        let mut cell_xfs_depth = 0usize;
        xml::walk(bytes, |event, start, end| match event {
            Event::Start(element) | Event::Empty(element) => {
                let is_start = matches!(event, Event::Start(_));
                match element.local_name().as_ref() {
                    "numFmt" => {
                        let id = xml::attribute(element, "numFmtId").and_then(|id| id.parse().ok());
                        let code = super::package::unescape(
                            &xml::attribute(element, "formatCode").unwrap_or_default(),
                        );
                        if let Some(id) = id.filter(|_| is_date_format_code(&code)) {
                            styles.date_formats.insert(id);
                        }
                    }
                    "cellXfs" => {
                        styles.cell_xfs_tag = Some((start, end, !is_start));
                        in_cell_xfs = is_start;
                        cell_xfs_depth = depth;
                    }
                    "xf" if in_cell_xfs && depth == cell_xfs_depth + 1 => {
                        let num_fmt_id = xml::attribute(element, "numFmtId")
                            .and_then(|id| id.parse().ok())
                            .unwrap_or(0);
                        if is_start {
                            xf_start = Some((start, num_fmt_id));
                        } else {
                            styles.xf_formats.push(num_fmt_id);
                            styles.xf_raw.push(bytes[start..end].to_vec());
                        }
                    }
                    _ => {}
                }
                if is_start {
                    depth += 1;
                }
            }
            Event::End(element) => {
                depth = depth.saturating_sub(1);
                match element.local_name().as_ref() {
                    "xf" if in_cell_xfs => {
                        if let Some((xf_begin, num_fmt_id)) = xf_start.take() {
                            styles.xf_formats.push(num_fmt_id);
                            styles.xf_raw.push(bytes[xf_begin..end].to_vec());
                        }
                    }
                    "cellXfs" => {
                        in_cell_xfs = false;
                        styles.cell_xfs_end = Some(start);
                    }
                    _ => {}
                }
            }
            _ => {}
        })?;
        Ok(styles)
    }

    pub fn is_date(&self, style: u32) -> bool {
        self.xf_formats
            .get(style as usize)
            .is_some_and(|num_fmt_id| {
                is_builtin_date_format(*num_fmt_id) || self.date_formats.contains(num_fmt_id)
            })
            || self.added.values().any(|added| *added == style)
    }

    /// A style like `base` that shows a date: a new `xf` with Excel's short-date format (14),
    /// everything else of `base` kept. One per base style, however many cells need it.
    pub fn date_variant(&mut self, base: u32) -> Option<u32> {
        if let Some(added) = self.added.get(&base) {
            return Some(*added);
        }
        self.cell_xfs_end?;
        let raw = self
            .xf_raw
            .get(base as usize)
            .or_else(|| self.xf_raw.first())?;
        let mut reader = quick_xml::Reader::from_reader(raw.as_slice());
        let (element, empty) = match reader.read_event() {
            Ok(Event::Start(element)) => (element, false),
            Ok(Event::Empty(element)) => (element, true),
            _ => return None,
        };
        let rest = raw[reader.buffer_position() as usize..].to_vec();
        let edited = xml::with_attributes(
            &element,
            &[("numFmtId", Some("14")), ("applyNumberFormat", Some("1"))],
        );
        let mut new_raw = xml::tag_bytes(&edited, empty);
        new_raw.extend_from_slice(&rest);
        let index = u32::try_from(self.xf_formats.len() + self.added_raw.len()).ok()?;
        self.added_raw.push(new_raw);
        self.added.insert(base, index);
        Some(index)
    }

    pub fn is_changed(&self) -> bool {
        !self.added_raw.is_empty()
    }

    /// The part with the new entries appended to `cellXfs` and its count updated.
    pub fn write(&self, original: &[u8]) -> Result<Vec<u8>, PackageError> {
        let (Some((tag_start, tag_end, _)), Some(end)) = (self.cell_xfs_tag, self.cell_xfs_end)
        else {
            return Ok(original.to_vec());
        };
        let mut reader = quick_xml::Reader::from_reader(&original[tag_start..tag_end]);
        let Ok(Event::Start(element)) = reader.read_event() else {
            return Ok(original.to_vec());
        };
        let count = (self.xf_formats.len() + self.added_raw.len()).to_string();
        let tag = xml::tag_bytes(
            &xml::with_attributes(&element, &[("count", Some(&count))]),
            false,
        );
        Ok(xml::apply_splices(
            original,
            vec![
                Splice {
                    start: tag_start,
                    end: tag_end,
                    text: tag,
                },
                Splice {
                    start: end,
                    end,
                    text: self.added_raw.concat(),
                },
            ],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STYLES: &str = r#"<?xml version="1.0"?><styleSheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><numFmts count="2"><numFmt numFmtId="164" formatCode="&quot;$&quot;#,##0.00"/><numFmt numFmtId="165" formatCode="dd mmm yyyy"/></numFmts><cellXfs count="4"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/><xf numFmtId="164" fontId="1" fillId="2" borderId="1" xfId="0" applyNumberFormat="1"/><xf numFmtId="165" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/><xf numFmtId="0" fontId="0" fillId="3" borderId="1" xfId="0"><alignment wrapText="1"/></xf></cellXfs></styleSheet>"#;

    #[test]
    fn date_formats_are_recognised() {
        for (code, is_date) in [
            ("dd mmm yyyy", true),
            ("yyyy-mm-dd", true),
            ("\"$\"#,##0.00", false),
            ("[Red]0.00", false),
            ("0.00\" days\"", false),
            ("General", false),
            ("h:mm", true),
        ] {
            assert_eq!(is_date_format_code(code), is_date, "{code}");
        }
        let styles = Styles::parse(STYLES.as_bytes()).expect("parse");
        assert_eq!(
            (0..4)
                .map(|style| styles.is_date(style))
                .collect::<Vec<_>>(),
            [false, false, true, false]
        );
    }

    #[test]
    fn a_date_variant_keeps_the_base_style_and_is_added_once() {
        let mut styles = Styles::parse(STYLES.as_bytes()).expect("parse");
        assert_eq!(styles.date_variant(3), Some(4));
        assert_eq!(styles.date_variant(3), Some(4));
        assert_eq!(styles.date_variant(1), Some(5));
        assert!(styles.is_date(4));
        let written =
            String::from_utf8(styles.write(STYLES.as_bytes()).expect("write")).expect("utf-8");
        assert!(written.contains(r#"<cellXfs count="6">"#), "{written}");
        assert!(
            written.ends_with(
                r#"<xf numFmtId="14" fontId="0" fillId="3" borderId="1" xfId="0" applyNumberFormat="1"><alignment wrapText="1"/></xf><xf numFmtId="14" fontId="1" fillId="2" borderId="1" xfId="0" applyNumberFormat="1"/></cellXfs></styleSheet>"#
            ),
            "{written}"
        );
        let reparsed =
            Styles::parse(&styles.write(STYLES.as_bytes()).expect("write")).expect("parse");
        assert_eq!(reparsed.xf_formats, vec![0, 164, 165, 0, 14, 14]);
    }
}
