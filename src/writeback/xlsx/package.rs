//! The package around the managed sheet: which zip entry holds it, which parts belong to it
//! (tables, drawings, comments), the workbook's date system and defined names.
//!
//! Only reads. Part names are matched without regard to case, as OOXML asks.

use std::collections::HashMap;
use std::io::{Read, Seek};

use quick_xml::events::Event;

use super::xml;
use super::PackageError;

/// The zip archive of a workbook with its entries found by part name.
pub struct Package<R: Read + Seek> {
    pub archive: zip::ZipArchive<R>,
    /// Lower-case part name (no leading slash) → entry index.
    by_name: HashMap<String, usize>,
}

/// One relationship of a part.
#[derive(Debug, Clone)]
pub struct Relationship {
    pub id: String,
    /// The last segment of the relationship type: `worksheet`, `table`, `drawing`, `comments` …
    pub kind: String,
    /// The target part's name, resolved against the source part (`xl/tables/table1.xml`), or
    /// `None` for an external target.
    pub part: Option<String>,
}

/// What the write-back needs to know of `xl/workbook.xml`.
#[derive(Debug, Clone, Default)]
pub struct WorkbookInfo {
    pub part: String,
    /// Sheets in order: name and relationship id.
    pub sheets: Vec<(String, String)>,
    pub date1904: bool,
    /// Defined names: (name, local sheet index, formula text).
    pub defined_names: Vec<(String, Option<usize>, String)>,
}

impl<R: Read + Seek> Package<R> {
    pub fn open(reader: R) -> Result<Package<R>, PackageError> {
        let archive = zip::ZipArchive::new(reader)?;
        let mut by_name = HashMap::new();
        for entry_idx in 0..archive.len() {
            if let Some(Ok(name)) = archive.name_for_index(entry_idx) {
                by_name.insert(name.trim_start_matches('/').to_lowercase(), entry_idx);
            }
        }
        Ok(Package { archive, by_name })
    }

    pub fn index_of(&self, part: &str) -> Option<usize> {
        self.by_name
            .get(&part.trim_start_matches('/').to_lowercase())
            .copied()
    }

    /// A part's bytes, or `None` when the package has no such part. Parts are bounded by the
    /// reader's limits: the whole package was checked against `max_unzipped_mb` when it was read.
    pub fn read(&mut self, part: &str) -> Result<Option<Vec<u8>>, PackageError> {
        let Some(entry_idx) = self.index_of(part) else {
            return Ok(None);
        };
        let mut entry = self.archive.by_index(entry_idx)?;
        let mut bytes = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0).min(1 << 24));
        entry.read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }

    /// The relationships of a part (from `folder/_rels/name.rels`).
    pub fn relationships(&mut self, part: &str) -> Result<Vec<Relationship>, PackageError> {
        let (folder, name) = part.rsplit_once('/').unwrap_or(("", part));
        let rels_part = if folder.is_empty() {
            format!("_rels/{name}.rels")
        } else {
            format!("{folder}/_rels/{name}.rels")
        };
        let Some(bytes) = self.read(&rels_part)? else {
            return Ok(Vec::new());
        };
        let mut relationships = Vec::new();
        xml::walk(&bytes, |event, _, _| {
            if let Event::Start(element) | Event::Empty(element) = event {
                if element.local_name().as_ref() != "Relationship" {
                    return;
                }
                let id = xml::attribute(element, "Id").unwrap_or_default();
                let kind = xml::attribute(element, "Type")
                    .unwrap_or_default()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let external = xml::attribute(element, "TargetMode").as_deref() == Some("External");
                let part = xml::attribute(element, "Target")
                    .filter(|_| !external)
                    .map(|target| resolve(folder, &unescape(&target)));
                relationships.push(Relationship { id, kind, part });
            }
        })?;
        Ok(relationships)
    }

    /// The workbook part (from the package relationships) and what it says.
    pub fn workbook(&mut self) -> Result<WorkbookInfo, PackageError> {
        let part = self
            .relationships("")?
            .into_iter()
            .find(|relationship| relationship.kind == "officeDocument")
            .and_then(|relationship| relationship.part)
            .unwrap_or_else(|| "xl/workbook.xml".to_string());
        let bytes = self
            .read(&part)?
            .ok_or_else(|| PackageError::Missing(part.clone()))?;
        let mut info = WorkbookInfo {
            part,
            ..WorkbookInfo::default()
        };
        let mut in_defined_name: Option<(String, Option<usize>)> = None;
        let mut formula = String::new();
        xml::walk(&bytes, |event, _, _| match event {
            Event::Start(element) | Event::Empty(element) => match element.local_name().as_ref() {
                "sheet" => info.sheets.push((
                    unescape(&xml::attribute(element, "name").unwrap_or_default()),
                    xml::prefixed_attribute(element, "id").unwrap_or_default(),
                )),
                "workbookPr" => {
                    info.date1904 = matches!(
                        xml::attribute(element, "date1904").as_deref(),
                        Some("1" | "true")
                    );
                }
                "definedName" if matches!(event, Event::Start(_)) => {
                    in_defined_name = Some((
                        unescape(&xml::attribute(element, "name").unwrap_or_default()),
                        xml::attribute(element, "localSheetId").and_then(|id| id.parse().ok()),
                    ));
                    formula.clear();
                }
                _ => {}
            },
            Event::Text(text) if in_defined_name.is_some() => {
                formula.push_str(&unescape(text));
            }
            Event::GeneralRef(reference) if in_defined_name.is_some() => {
                formula.push_str(&unescape(&format!("&{};", &**reference)));
            }
            Event::End(element) if element.local_name().as_ref() == "definedName" => {
                if let Some((name, local_sheet)) = in_defined_name.take() {
                    info.defined_names
                        .push((name, local_sheet, std::mem::take(&mut formula)));
                }
            }
            _ => {}
        })?;
        Ok(info)
    }
}

/// Resolves a relationship target against the folder of its source part.
pub fn resolve(folder: &str, target: &str) -> String {
    let mut segments: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        folder
            .split('/')
            .filter(|segment| !segment.is_empty())
            .collect()
    };
    for segment in target.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    segments.join("/")
}

/// Undoes XML escaping in an attribute value or text.
pub fn unescape(text: &str) -> String {
    quick_xml::escape::unescape(text)
        .map(|text| text.into_owned())
        .unwrap_or_else(|_| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::resolve;

    #[test]
    fn targets_resolve_against_their_source() {
        assert_eq!(
            resolve("xl", "worksheets/sheet1.xml"),
            "xl/worksheets/sheet1.xml"
        );
        assert_eq!(
            resolve("xl/worksheets", "../tables/table1.xml"),
            "xl/tables/table1.xml"
        );
        assert_eq!(
            resolve("xl/worksheets", "/xl/drawings/drawing1.xml"),
            "xl/drawings/drawing1.xml"
        );
        assert_eq!(resolve("", "xl/workbook.xml"), "xl/workbook.xml");
    }
}
