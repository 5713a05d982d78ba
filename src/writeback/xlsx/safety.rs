//! Whether rows can be deleted from the managed sheet (the rows below moving up) without breaking
//! anything that points at them. Deleting is safe only when nothing in the workbook refers to a
//! cell at or below the first deleted row, or when what does is a plain range that the patcher
//! moves itself (conditional formats, validations, the autofilter, tables). Otherwise the rows
//! are cleared and left blank, which is always safe.

use std::io::{BufReader, Read, Seek};

use quick_xml::events::Event;
use quick_xml::Reader;

use super::cellref::{self, Range, RowShift};
use super::package::{Package, Relationship, WorkbookInfo};
use super::xml;
use super::PackageError;

/// Why deleting rows is not safe, in words for the log.
pub type Reason = String;

/// Everything about the managed sheet the check needs.
pub struct SheetParts<'a> {
    pub sheet_name: &'a str,
    pub sheet_index: usize,
    pub sheet_part: &'a str,
    pub relationships: &'a [Relationship],
    pub workbook: &'a WorkbookInfo,
    /// Formula cells of the sheet as read: (row, column).
    pub formula_cells: &'a [(u32, u32)],
}

/// `Ok(())` when the rows in `shift` can be deleted, else the reason they must be cleared.
pub fn check<R: Read + Seek>(
    package: &mut Package<R>,
    parts: &SheetParts<'_>,
    shift: &RowShift,
    first_deleted: u32,
) -> Result<Result<(), Reason>, PackageError> {
    if let Some((row, column)) = parts
        .formula_cells
        .iter()
        .find(|(row, _)| *row >= first_deleted)
    {
        return Ok(Err(format!(
            "the sheet has a formula at {} (formulas below a deleted row would point at the wrong cells)",
            cellref::cell_name(*row, *column)
        )));
    }
    if let Err(reason) = check_sheet_tail(package, parts.sheet_part, shift, first_deleted)? {
        return Ok(Err(reason));
    }
    for relationship in parts.relationships {
        let Some(part) = &relationship.part else {
            continue;
        };
        let reason = match relationship.kind.as_str() {
            "hyperlink" | "printerSettings" => None,
            "table" => check_table(package, part, shift)?,
            "drawing" => highest_anchor_row(package, part, "row")?
                .filter(|row| row + 1 >= first_deleted)
                .map(|_| "a picture, chart or shape is anchored at or below it".to_string()),
            "vmlDrawing" => highest_anchor_row(package, part, "Row")?
                .filter(|row| row + 1 >= first_deleted)
                .map(|_| "a comment or control is anchored at or below it".to_string()),
            "comments" | "threadedComment" => highest_comment_row(package, part)?
                .filter(|row| *row >= first_deleted)
                .map(|_| "a comment is attached at or below it".to_string()),
            other => Some(format!(
                "the sheet has a {other} part that may point at its rows"
            )),
        };
        if let Some(reason) = reason {
            return Ok(Err(reason));
        }
    }
    if package.index_of("xl/vbaProject.bin").is_some() {
        return Ok(Err(
            "the workbook has macros, which may refer to rows by number".to_string(),
        ));
    }
    let references = sheet_references(parts.sheet_name);
    for (name, local_sheet, formula) in &parts.workbook.defined_names {
        if name.eq_ignore_ascii_case("_xlnm._FilterDatabase") {
            continue;
        }
        let refers_to_sheet = references[..2]
            .iter()
            .any(|reference| formula.contains(reference.as_str()))
            || formula.contains(&format!("{}!", parts.sheet_name))
            || (*local_sheet == Some(parts.sheet_index) && !formula.contains('!'));
        if refers_to_sheet
            && cellref::max_referenced_row(formula).is_some_and(|row| row >= first_deleted)
        {
            return Ok(Err(format!(
                "the defined name {name} refers to rows at or below it"
            )));
        }
    }
    // Any other part that names the sheet (formulas on other sheets, chart series, pivot
    // caches) may point at the moving rows.
    if let Some(name) = part_naming_sheet(package, parts)? {
        return Ok(Err(format!(
            "{name} refers to the sheet \"{}\"",
            parts.sheet_name
        )));
    }
    Ok(Ok(()))
}

/// The forms a reference to the sheet takes in a part's XML: `Pipeline!`, `'Pipe line'!` (and
/// its escaped apostrophe), and a pivot cache's `sheet="Pipeline"`.
fn sheet_references(sheet_name: &str) -> [String; 4] {
    [
        format!("{}!", xml::escape(sheet_name)),
        format!("{}'!", xml::escape(sheet_name)),
        format!("{}&apos;!", xml::escape(sheet_name)),
        format!("sheet=\"{}\"", xml::escape(sheet_name)),
    ]
}

/// The first part of the workbook other than the sheet, its own parts, the workbook, styles,
/// themes, shared strings and the calculation chain that names the sheet: another sheet's
/// formula, a chart's series, a pivot cache. Such a part may read or point at the sheet's cells.
fn part_naming_sheet<R: Read + Seek>(
    package: &mut Package<R>,
    parts: &SheetParts<'_>,
) -> Result<Option<String>, PackageError> {
    let references = sheet_references(parts.sheet_name);
    let own_parts: Vec<&str> = parts
        .relationships
        .iter()
        .filter_map(|relationship| relationship.part.as_deref())
        .collect();
    for entry_idx in 0..package.archive.len() {
        let Some(Ok(name)) = package.archive.name_for_index(entry_idx) else {
            continue;
        };
        let name = name.into_owned();
        let lower = name.to_lowercase();
        let skipped = !lower.ends_with(".xml")
            || !lower.starts_with("xl/")
            || lower.eq_ignore_ascii_case(parts.sheet_part)
            || lower.eq_ignore_ascii_case(&parts.workbook.part)
            || lower.contains("/_rels/")
            || lower.starts_with("xl/theme/")
            || matches!(
                lower.as_str(),
                "xl/styles.xml" | "xl/sharedstrings.xml" | "xl/calcchain.xml"
            )
            || own_parts.iter().any(|own| own.eq_ignore_ascii_case(&name));
        if skipped {
            continue;
        }
        let Some(bytes) = package.read(&name)? else {
            continue;
        };
        if references
            .iter()
            .any(|reference| contains(&bytes, reference.as_bytes()))
        {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// A formula on another sheet that names the managed sheet: its text, and how far a shared
/// formula's range reaches below and to the right of its first cell (its references move with it).
pub struct ForeignFormula {
    pub text: String,
    pub rows_below: u32,
    pub columns_right: u32,
}

/// The formulas of the worksheet parts `other_sheets` whose text names `sheet_name` (`Pipeline!`
/// or `'Pipe line'!`). Each part is streamed: only the formulas are kept.
pub fn formulas_naming_sheet<R: Read + Seek>(
    package: &mut Package<R>,
    other_sheets: &[String],
    sheet_name: &str,
) -> Result<Vec<ForeignFormula>, PackageError> {
    let plain = format!("{sheet_name}!");
    let quoted = format!("'{}'!", sheet_name.replace('\'', "''"));
    let mut found = Vec::new();
    for part in other_sheets {
        let Some(entry_idx) = package.index_of(part) else {
            continue;
        };
        let entry = package.archive.by_index(entry_idx)?;
        let mut reader = Reader::from_reader(BufReader::with_capacity(1 << 16, entry));
        reader.config_mut().check_end_names = false;
        let mut buffer = Vec::new();
        let mut cell_row_column: Option<(u32, u32)> = None;
        let mut formula: Option<ForeignFormula> = None;
        loop {
            buffer.clear();
            match reader.read_event_into(&mut buffer)? {
                Event::Eof => break,
                Event::Start(element) | Event::Empty(element)
                    if element.local_name().as_ref() == "c" =>
                {
                    cell_row_column = xml::attribute(&element, "r")
                        .and_then(|reference| cellref::parse_cell(reference.as_bytes()));
                }
                Event::Start(element) if element.local_name().as_ref() == "f" => {
                    let (rows_below, columns_right) =
                        match (xml::attribute(&element, "t").as_deref(), cell_row_column) {
                            (Some("shared"), Some((row, column))) => {
                                xml::attribute(&element, "ref")
                                    .and_then(|text| Range::parse(&text))
                                    .map_or((0, 0), |range| {
                                        (
                                            range.last_row.saturating_sub(row),
                                            range.last_column.saturating_sub(column),
                                        )
                                    })
                            }
                            _ => (0, 0),
                        };
                    formula = Some(ForeignFormula {
                        text: String::new(),
                        rows_below,
                        columns_right,
                    });
                }
                Event::Text(text) => {
                    if let Some(formula) = &mut formula {
                        formula.text.push_str(&super::package::unescape(&text));
                    }
                }
                Event::GeneralRef(reference) => {
                    if let Some(formula) = &mut formula {
                        formula
                            .text
                            .push_str(&super::package::unescape(&format!("&{};", &*reference)));
                    }
                }
                Event::End(element) if element.local_name().as_ref() == "f" => {
                    if let Some(formula) = formula.take() {
                        if formula.text.contains(&plain) || formula.text.contains(&quoted) {
                            found.push(formula);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(found)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// Reads what follows `<sheetData>`: merged cells, hyperlinks, conditional formats, validations,
/// page breaks, protected ranges and extensions.
fn check_sheet_tail<R: Read + Seek>(
    package: &mut Package<R>,
    sheet_part: &str,
    shift: &RowShift,
    first_deleted: u32,
) -> Result<Result<(), Reason>, PackageError> {
    let Some(entry_idx) = package.index_of(sheet_part) else {
        return Err(PackageError::Missing(sheet_part.to_string()));
    };
    let entry = package.archive.by_index(entry_idx)?;
    let mut reader = Reader::from_reader(BufReader::with_capacity(1 << 16, entry));
    let mut buffer = Vec::new();
    let mut in_extension = false;
    let mut formula_of: Option<String> = None;
    let mut formula_text = String::new();
    let reaches = |text: &str| {
        text.split_whitespace()
            .filter_map(Range::parse)
            .any(|range| {
                range.last_row >= first_deleted && range.last_row != cellref::MAX_ROW
                    || range.first_row >= first_deleted
            })
    };
    let vanishes = |text: &str| {
        let ranges: Vec<Range> = text.split_whitespace().filter_map(Range::parse).collect();
        !ranges.is_empty() && ranges.iter().all(|range| shift.range(*range).is_none())
    };
    let mut in_row_breaks = false;
    loop {
        buffer.clear();
        let event = reader.read_event_into(&mut buffer)?;
        let is_start = matches!(event, Event::Start(_));
        match event {
            Event::Eof => return Ok(Ok(())),
            Event::Start(element) | Event::Empty(element) => {
                let local = element.local_name().as_ref().to_string();
                if local == "sheetData" {
                    if is_start {
                        if let Some(reason) = formula_reaching(&mut reader, first_deleted)? {
                            return Ok(Err(reason));
                        }
                    }
                    continue;
                }
                if in_extension {
                    if local == "sqref" || local == "f" {
                        return Ok(Err(
                            "the sheet has extended formats or validations that point at its rows"
                                .to_string(),
                        ));
                    }
                    continue;
                }
                let attribute = |name: &str| xml::attribute(&element, name).unwrap_or_default();
                match local.as_str() {
                    "extLst" => in_extension = true,
                    "rowBreaks" => in_row_breaks = is_start,
                    "mergeCell" if reaches(&attribute("ref")) => {
                        return Ok(Err(format!(
                            "cells {} are merged at or below it",
                            attribute("ref")
                        )));
                    }
                    "hyperlink" if reaches(&attribute("ref")) => {
                        return Ok(Err(format!("cell {} has a hyperlink", attribute("ref"))));
                    }
                    "protectedRange" if reaches(&attribute("sqref")) => {
                        return Ok(Err("a protected range reaches it".to_string()));
                    }
                    "brk" => {
                        let id: u32 = attribute("id").parse().unwrap_or(0);
                        if in_row_breaks && id + 1 >= first_deleted && id < cellref::MAX_ROW {
                            return Ok(Err("a page break is set at or below it".to_string()));
                        }
                    }
                    "conditionalFormatting" | "dataValidation" if vanishes(&attribute("sqref")) => {
                        return Ok(Err(
                            "a conditional format or validation covers only rows that leave"
                                .to_string(),
                        ));
                    }
                    "formula" | "formula1" | "formula2" => {
                        formula_of = Some(local.clone());
                        formula_text.clear();
                    }
                    _ => {}
                }
            }
            Event::Text(text) if formula_of.is_some() => {
                formula_text.push_str(&text);
            }
            Event::End(element) => {
                let local = element.local_name();
                if local.as_ref() == "extLst" {
                    in_extension = false;
                }
                if local.as_ref() == "rowBreaks" {
                    in_row_breaks = false;
                }
                if formula_of.as_deref() == Some(local.as_ref()) {
                    formula_of = None;
                    // A relative reference follows the range it is written for; an absolute
                    // row ($12) does not move.
                    if max_absolute_row(&formula_text).is_some_and(|row| row >= first_deleted) {
                        return Ok(Err("a conditional format or validation formula points at a fixed row at or below it".to_string()));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Reads `<sheetData>` to its end and finds the first formula whose references reach
/// `first_deleted` or below — wherever the formula itself is (`G2` = `=D5` breaks when row 3
/// goes). A shared formula is written once, on its first cell, for the cells of its `ref`: the
/// rows it reaches grow by how far that range goes below the first cell.
fn formula_reaching<B: std::io::BufRead>(
    reader: &mut Reader<B>,
    first_deleted: u32,
) -> Result<Option<Reason>, PackageError> {
    let mut buffer = Vec::new();
    let mut cell: Option<(u32, u32)> = None;
    // Inside an `<f>`: how far its references reach below the text's, and the text so far.
    let mut formula: Option<(u32, String)> = None;
    loop {
        buffer.clear();
        match reader.read_event_into(&mut buffer)? {
            Event::Eof => return Ok(None),
            Event::Start(element) | Event::Empty(element)
                if element.local_name().as_ref() == "c" =>
            {
                cell = xml::attribute(&element, "r")
                    .and_then(|reference| cellref::parse_cell(reference.as_bytes()));
            }
            Event::Start(element) if element.local_name().as_ref() == "f" => {
                let below = match (xml::attribute(&element, "t").as_deref(), cell) {
                    (Some("shared"), Some((row, _))) => xml::attribute(&element, "ref")
                        .and_then(|text| Range::parse(&text))
                        .map_or(0, |range| range.last_row.saturating_sub(row)),
                    _ => 0,
                };
                formula = Some((below, String::new()));
            }
            Event::Text(text) => {
                if let Some((_, formula_text)) = &mut formula {
                    formula_text.push_str(&super::package::unescape(&text));
                }
            }
            Event::GeneralRef(reference) => {
                if let Some((_, formula_text)) = &mut formula {
                    formula_text.push_str(&super::package::unescape(&format!("&{};", &*reference)));
                }
            }
            Event::End(element) => match element.local_name().as_ref() {
                "f" => {
                    let Some((below, formula_text)) = formula.take() else {
                        continue;
                    };
                    let reached = cellref::max_referenced_row(&formula_text)
                        .map(|row| row.saturating_add(below));
                    if reached.is_some_and(|row| row >= first_deleted) {
                        let at = cell.map_or_else(String::new, |(row, column)| {
                            format!(" at {}", cellref::cell_name(row, column))
                        });
                        return Ok(Some(format!(
                            "the formula{at} (={formula_text}) points at or below it"
                        )));
                    }
                }
                "sheetData" => return Ok(None),
                _ => {}
            },
            _ => {}
        }
    }
}

/// The highest absolute row (`$12`) a formula names.
fn max_absolute_row(formula: &str) -> Option<u32> {
    let bytes = formula.as_bytes();
    let mut highest = None;
    for (position, byte) in bytes.iter().enumerate() {
        if *byte != b'$' {
            continue;
        }
        let digits: String = bytes[position + 1..]
            .iter()
            .take_while(|byte| byte.is_ascii_digit())
            .map(|byte| *byte as char)
            .collect();
        if let Ok(row) = digits.parse::<u32>() {
            highest = Some(highest.map_or(row, |highest: u32| highest.max(row)));
        }
    }
    highest
}

/// A table survives the deletion when it keeps a data row.
fn check_table<R: Read + Seek>(
    package: &mut Package<R>,
    part: &str,
    shift: &RowShift,
) -> Result<Option<Reason>, PackageError> {
    let Some(bytes) = package.read(part)? else {
        return Ok(None);
    };
    let mut reason = None;
    xml::walk(&bytes, |event, _, _| {
        if let Event::Start(element) | Event::Empty(element) = event {
            if element.local_name().as_ref() != "table" {
                return;
            }
            let Some(range) = xml::attribute(element, "ref").and_then(|text| Range::parse(&text))
            else {
                return;
            };
            match shift.range(range) {
                Some(shifted) if shifted.last_row > shifted.first_row => {}
                _ => reason = Some("a table would be left without rows".to_string()),
            }
        }
    })?;
    Ok(reason)
}

/// The highest row (0-based, as drawings count) in the text of elements named `name`.
fn highest_anchor_row<R: Read + Seek>(
    package: &mut Package<R>,
    part: &str,
    name: &str,
) -> Result<Option<u32>, PackageError> {
    let Some(bytes) = package.read(part)? else {
        return Ok(None);
    };
    let mut highest: Option<u32> = None;
    let mut inside = false;
    xml::walk(&bytes, |event, _, _| match event {
        Event::Start(element) => inside = element.local_name().as_ref() == name,
        Event::Text(text) if inside => {
            if let Ok(row) = text.trim().parse::<u32>() {
                highest = Some(highest.map_or(row, |highest| highest.max(row)));
            }
        }
        Event::End(_) => inside = false,
        _ => {}
    })?;
    Ok(highest)
}

fn highest_comment_row<R: Read + Seek>(
    package: &mut Package<R>,
    part: &str,
) -> Result<Option<u32>, PackageError> {
    let Some(bytes) = package.read(part)? else {
        return Ok(None);
    };
    let mut highest: Option<u32> = None;
    xml::walk(&bytes, |event, _, _| {
        if let Event::Start(element) | Event::Empty(element) = event {
            if matches!(element.local_name().as_ref(), "comment" | "threadedComment") {
                if let Some((row, _)) = xml::attribute(element, "ref")
                    .and_then(|reference| cellref::parse_cell(reference.as_bytes()))
                {
                    highest = Some(highest.map_or(row, |highest| highest.max(row)));
                }
            }
        }
    })?;
    Ok(highest)
}

#[cfg(test)]
mod tests {
    use super::max_absolute_row;

    #[test]
    fn only_absolute_rows_count() {
        assert_eq!(max_absolute_row("$F2=\"Won\""), None);
        assert_eq!(max_absolute_row("$F$12>0"), Some(12));
        assert_eq!(max_absolute_row("StageList"), None);
    }
}
