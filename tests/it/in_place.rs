//! The write-back edits a team's workbook in place: formatting, merged cells, comments,
//! conditional formats, validations, hyperlinks, images, charts, defined names, hidden columns,
//! panes, tables and macros are theirs and stay; only the cells funnelsync changes change.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::Path;

use rust_xlsxwriter::{
    Chart, ChartType, Color, ConditionalFormatCell, ConditionalFormatCellRule, DataValidation,
    ExcelDateTime, Format, FormatBorder, Formula, Image, Note, Table, Workbook,
};

use crate::harness::{file_report, read_xlsx, TestDir};

/// A 1×1 PNG.
const PIXEL_PNG: &[u8] = &[
    0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1F, 0x15, 0xC4,
    0x89, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9C, 0x63, 0xF8, 0xCF, 0xC0, 0xF0,
    0x1F, 0x00, 0x05, 0x00, 0x01, 0xFF, 0x89, 0x99, 0x3D, 0x1D, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45,
    0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82,
];

/// A deal of the team workbook: company, contact, email, stage, amount, owner, next step date.
type TeamDeal = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    f64,
    &'static str,
    (u16, u8, u8),
);

const DEALS: [TeamDeal; 4] = [
    (
        "Acme",
        "Ann",
        "ann@acme.com",
        "Lead",
        1000.0,
        "Alice",
        (2026, 12, 1),
    ),
    (
        "Globex",
        "Gus",
        "gus@globex.com",
        "Prospect",
        2500.0,
        "Bob",
        (2026, 12, 2),
    ),
    (
        "Initech",
        "Ian",
        "ian@initech.com",
        "Opportunity",
        4000.0,
        "Alice",
        (2026, 12, 3),
    ),
    (
        "Umbrella",
        "Uma",
        "uma@umbrella.com",
        "Lead",
        800.0,
        "Bob",
        (2026, 12, 4),
    ),
];

/// A pipeline workbook as a team makes it: a merged, coloured title row, a coloured header on
/// row 2, row fills and borders, "$" amounts, `dd mmm yyyy` dates, a note, conditional
/// formatting, a dropdown from a named range, hyperlinks, an image, a hidden column, a pane frozen
/// at B3, and a Summary sheet with a formula over a defined name and a chart.
fn team_workbook(path: &Path) {
    let mut workbook = Workbook::new();
    let title = Format::new()
        .set_bold()
        .set_font_size(16)
        .set_background_color(Color::RGB(0x1F4E78))
        .set_font_color(Color::White);
    let header = Format::new()
        .set_bold()
        .set_background_color(Color::RGB(0xBDD7EE))
        .set_border(FormatBorder::Thin);
    let row_fill = Format::new()
        .set_background_color(Color::RGB(0xF2F2F2))
        .set_border(FormatBorder::Thin);
    let money = Format::new()
        .set_num_format("\"$\"#,##0.00")
        .set_background_color(Color::RGB(0xF2F2F2))
        .set_border(FormatBorder::Thin);
    let date = Format::new()
        .set_num_format("dd mmm yyyy")
        .set_background_color(Color::RGB(0xF2F2F2))
        .set_border(FormatBorder::Thin);
    let sheet = workbook.add_worksheet();
    sheet.set_name("Pipeline").expect("name");
    sheet
        .merge_range(0, 0, 0, 7, "Team pipeline 2026", &title)
        .expect("merge");
    for (column, text) in [
        "Company",
        "Contact",
        "Email",
        "Stage",
        "Amount",
        "Owner",
        "Next Step",
        "Website",
    ]
    .iter()
    .enumerate()
    {
        sheet
            .write_string_with_format(1, column as u16, *text, &header)
            .expect("header");
    }
    for (idx, (company, contact, email, stage, amount, owner, (year, month, day))) in
        DEALS.iter().enumerate()
    {
        let row = idx as u32 + 2;
        for (column, text) in [
            (0, company),
            (1, contact),
            (2, email),
            (3, stage),
            (5, owner),
        ] {
            sheet
                .write_string_with_format(row, column, *text, &row_fill)
                .expect("text");
        }
        sheet
            .write_number_with_format(row, 4, *amount, &money)
            .expect("amount");
        sheet
            .write_datetime_with_format(
                row,
                6,
                ExcelDateTime::from_ymd(*year, *month, *day).expect("date"),
                &date,
            )
            .expect("date");
        sheet
            .write_url(
                row,
                7,
                format!("https://{}.example.com", company.to_lowercase()).as_str(),
            )
            .expect("url");
    }
    sheet
        .insert_note(2, 0, &Note::new("Key account — call on Mondays"))
        .expect("note");
    sheet
        .add_conditional_format(
            2,
            4,
            5,
            4,
            &ConditionalFormatCell::new()
                .set_rule(ConditionalFormatCellRule::GreaterThan(3000))
                .set_format(Format::new().set_font_color(Color::RGB(0x006100))),
        )
        .expect("conditional format");
    sheet
        .add_data_validation(
            2,
            3,
            5,
            3,
            &DataValidation::new().allow_list_formula(Formula::new("=StageList")),
        )
        .expect("validation");
    sheet
        .insert_image(8, 1, &Image::new_from_buffer(PIXEL_PNG).expect("png"))
        .expect("image");
    sheet.set_column_width(0, 18).expect("width");
    sheet.set_column_width(2, 24).expect("width");
    sheet.set_column_hidden(7).expect("hidden");
    sheet.set_row_height(3, 28).expect("row height");
    sheet.set_freeze_panes(2, 1).expect("pane");
    let lists = workbook.add_worksheet();
    lists.set_name("Lists").expect("name");
    for (row, stage) in ["Lead", "Prospect", "Opportunity", "Won", "Lost"]
        .iter()
        .enumerate()
    {
        lists.write_string(row as u32, 0, *stage).expect("stage");
    }
    let summary = workbook.add_worksheet();
    summary.set_name("Summary").expect("name");
    summary.write_string(0, 0, "Total").expect("label");
    summary
        .write_formula(
            0,
            1,
            Formula::new("=SUM(PipelineAmounts)").set_result("8300"),
        )
        .expect("formula");
    let mut chart = Chart::new(ChartType::Column);
    chart
        .add_series()
        .set_categories("Pipeline!$A$3:$A$6")
        .set_values("Pipeline!$E$3:$E$6");
    summary.insert_chart(2, 0, &chart).expect("chart");
    workbook
        .define_name("StageList", "=Lists!$A$1:$A$5")
        .expect("name");
    workbook
        .define_name("PipelineAmounts", "=Pipeline!$E$3:$E$6")
        .expect("name");
    workbook.save(path).expect("save workbook");
    drop_recalculation_flag(path);
}

/// rust_xlsxwriter asks every workbook to recalculate on opening; a workbook Excel saved does
/// not, and funnelsync asks only when a formula may read a cell it changed.
fn drop_recalculation_flag(path: &Path) {
    let workbook_xml =
        String::from_utf8(entries(path)["xl/workbook.xml"].2.clone()).expect("utf-8");
    let quiet = workbook_xml.replace(" fullCalcOnLoad=\"1\"", "");
    assert_ne!(quiet, workbook_xml, "the fixture had the flag");
    replace_part(path, "xl/workbook.xml", quiet.as_bytes());
}

/// The attributes of each `<row>` of a sheet part by row number, without `spans` (a hint that
/// changes when cells are added).
fn row_tags(bytes: &[u8]) -> BTreeMap<String, Vec<(String, String)>> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(bytes);
    let mut rows = BTreeMap::new();
    loop {
        match reader.read_event().expect("xml") {
            Event::Eof => return rows,
            Event::Start(element) | Event::Empty(element)
                if element.local_name().as_ref() == "row" =>
            {
                let attributes: Vec<(String, String)> = element
                    .attributes()
                    .flatten()
                    .map(|attribute| {
                        (
                            attribute.key.as_ref().to_string(),
                            attribute.value.into_owned(),
                        )
                    })
                    .filter(|(key, _)| key != "spans")
                    .collect();
                let number = attributes
                    .iter()
                    .find(|(key, _)| key == "r")
                    .map(|(_, value)| value.clone())
                    .expect("rows carry their number");
                rows.insert(number, attributes);
            }
            _ => {}
        }
    }
}

/// Every zip entry of a package: name → (compression method, CRC, uncompressed bytes).
/// Each entry's name → its compression method, CRC, content and bytes as stored (compressed):
/// "copied through" is checked on the stored bytes, not only on what they inflate to.
pub(crate) fn entries(path: &Path) -> BTreeMap<String, Entry> {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path).expect("open")).expect("zip");
    let mut entries = BTreeMap::new();
    for entry_idx in 0..archive.len() {
        let mut raw = Vec::new();
        archive
            .by_index_raw(entry_idx)
            .expect("entry")
            .read_to_end(&mut raw)
            .expect("read stored bytes");
        let mut entry = archive.by_index(entry_idx).expect("entry");
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).expect("read entry");
        entries.insert(
            entry.name().expect("entry name").into_owned(),
            (
                format!("{:?}", entry.compression()),
                entry.crc32(),
                bytes,
                raw,
            ),
        );
    }
    entries
}

/// An entry of a package: compression method, CRC, content, stored bytes.
pub(crate) type Entry = (String, u32, Vec<u8>, Vec<u8>);

/// Asserts that every entry but `changed` is exactly as it was, and no entry came or went.
#[track_caller]
pub(crate) fn assert_other_entries_unchanged(
    before: &BTreeMap<String, Entry>,
    after: &BTreeMap<String, Entry>,
    changed: &[&str],
) {
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the package keeps exactly its parts"
    );
    for (name, entry) in before {
        if changed.contains(&name.as_str()) {
            continue;
        }
        assert!(
            after[name] == *entry,
            "{name} changed (its stored bytes, CRC or content differ)"
        );
    }
}

/// One cell of a sheet part as written: its style index, type and raw XML.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct XmlCell {
    pub style: Option<String>,
    pub kind: Option<String>,
    pub xml: String,
}

/// The cells of a sheet part by reference (`B3`), and the raw text of each top-level element
/// other than `sheetData`.
pub(crate) fn sheet_xml(bytes: &[u8]) -> (BTreeMap<String, XmlCell>, BTreeMap<String, String>) {
    use quick_xml::events::Event;
    let text = std::str::from_utf8(bytes).expect("utf-8");
    let mut reader = quick_xml::Reader::from_str(text);
    let mut cells = BTreeMap::new();
    let mut elements = BTreeMap::new();
    let mut depth = 0usize;
    let mut cell_start: Option<(usize, String, Option<String>, Option<String>)> = None;
    let mut element_start: Option<(usize, String)> = None;
    loop {
        let start = reader.buffer_position() as usize;
        let event = reader.read_event().expect("xml");
        let end = reader.buffer_position() as usize;
        match &event {
            Event::Eof => break,
            Event::Start(element) | Event::Empty(element) => {
                let local = element.local_name().as_ref().to_string();
                let attribute = |name: &str| {
                    element
                        .attributes()
                        .flatten()
                        .find(|attribute| attribute.key.as_ref() == name)
                        .map(|attribute| attribute.value.into_owned())
                };
                if local == "c" {
                    let reference = attribute("r").expect("cells carry their reference");
                    if matches!(event, Event::Empty(_)) {
                        cells.insert(
                            reference,
                            XmlCell {
                                style: attribute("s"),
                                kind: attribute("t"),
                                xml: text[start..end].to_string(),
                            },
                        );
                    } else {
                        cell_start = Some((start, reference, attribute("s"), attribute("t")));
                    }
                }
                if depth == 1 && local != "sheetData" {
                    if matches!(event, Event::Empty(_)) {
                        elements.insert(local.clone(), text[start..end].to_string());
                    } else {
                        element_start = Some((start, local.clone()));
                    }
                }
                if matches!(event, Event::Start(_)) {
                    depth += 1;
                }
            }
            Event::End(element) => {
                depth -= 1;
                let local = element.local_name().as_ref().to_string();
                if local == "c" {
                    if let Some((cell_begin, reference, style, kind)) = cell_start.take() {
                        cells.insert(
                            reference,
                            XmlCell {
                                style,
                                kind,
                                xml: text[cell_begin..end].to_string(),
                            },
                        );
                    }
                }
                if depth == 1 {
                    if let Some((element_begin, name)) = element_start.take() {
                        elements.insert(name, text[element_begin..end].to_string());
                    }
                }
            }
            _ => {}
        }
    }
    (cells, elements)
}

pub(crate) const PIPELINE_PART: &str = "xl/worksheets/sheet1.xml";

/// Syncs, expecting success and the file `name` written back; returns the JSON report.
#[track_caller]
fn sync_writing(test: &TestDir, name: &str) -> serde_json::Value {
    let run = test.sync();
    run.assert_code(0);
    let report = run.json();
    assert_eq!(
        file_report(&report, name)["write_back"]["status"],
        "written",
        "{report}"
    );
    report
}

fn deal_id(test: &TestDir, company: &str) -> String {
    test.deal_by("company", company)["id"].to_string()
}

#[test]
fn the_first_sync_of_a_team_workbook_adds_only_the_crm_id_column() {
    let test = TestDir::new();
    let path = test.path("team.xlsx");
    team_workbook(&path);
    let before = entries(&path);
    test.single_source("team.xlsx", "sheet = \"Pipeline\"");
    let report = test.sync();
    report.assert_code(0);
    let report = report.json();
    assert_eq!(
        file_report(&report, "team.xlsx")["write_back"]["status"],
        "written"
    );
    assert_eq!(file_report(&report, "team.xlsx")["counts"]["created"], 4);

    let after = entries(&path);
    assert_other_entries_unchanged(&before, &after, &[PIPELINE_PART]);
    let (cells_before, elements_before) = sheet_xml(&before[PIPELINE_PART].2);
    let (cells_after, elements_after) = sheet_xml(&after[PIPELINE_PART].2);
    // Every cell the team wrote is there, byte for byte: value, type and style.
    for (reference, cell) in &cells_before {
        assert_eq!(cells_after.get(reference), Some(cell), "cell {reference}");
    }
    // The CRM ID column (I) was added: the header in the header row's style, an id per deal.
    let added: Vec<&String> = cells_after
        .keys()
        .filter(|reference| !cells_before.contains_key(*reference))
        .collect();
    assert_eq!(
        added,
        ["I2", "I3", "I4", "I5", "I6"],
        "only the CRM ID column is new"
    );
    assert_eq!(
        cells_after["I2"].style, cells_before["H2"].style,
        "the header's style"
    );
    assert!(
        cells_after["I2"].xml.contains(">CRM ID<"),
        "{:?}",
        cells_after["I2"]
    );
    // Rows keep their heights and styles.
    assert_eq!(
        row_tags(&after[PIPELINE_PART].2),
        row_tags(&before[PIPELINE_PART].2)
    );
    assert!(
        row_tags(&after[PIPELINE_PART].2)["4"]
            .iter()
            .any(|(key, _)| key == "ht"),
        "the fixture has a row height"
    );
    // Everything else in the sheet is exactly as it was.
    for name in [
        "cols",
        "sheetViews",
        "sheetFormatPr",
        "mergeCells",
        "conditionalFormatting",
        "dataValidations",
        "hyperlinks",
        "pageMargins",
        "drawing",
        "legacyDrawing",
    ] {
        assert!(elements_before.contains_key(name), "the fixture has {name}");
        assert_eq!(
            elements_after.get(name),
            elements_before.get(name),
            "{name}"
        );
    }
    assert_eq!(
        elements_after["dimension"], "<dimension ref=\"A1:I6\"/>",
        "the dimension covers the new column"
    );

    // calamine reads every value back, the Summary's formula over the defined name included.
    let pipeline = read_xlsx(&path, "Pipeline");
    assert_eq!(
        pipeline.column("Company"),
        ["Acme", "Globex", "Initech", "Umbrella"]
    );
    assert_eq!(pipeline.column("Next Step")[0], "2026-12-01");
    let ids = pipeline.column("CRM ID");
    assert_eq!(
        ids,
        [
            deal_id(&test, "Acme"),
            deal_id(&test, "Globex"),
            deal_id(&test, "Initech"),
            deal_id(&test, "Umbrella")
        ]
    );
    let summary = read_xlsx(&path, "Summary");
    assert_eq!(summary.formulas[&(0, 1)], "SUM(PipelineAmounts)");
}

#[test]
fn a_store_change_changes_one_cell_and_keeps_its_style() {
    let test = TestDir::new();
    let path = test.path("team.xlsx");
    team_workbook(&path);
    test.single_source("team.xlsx", "sheet = \"Pipeline\"");
    test.sync().assert_code(0);
    let before = entries(&path);
    assert!(
        !String::from_utf8_lossy(&before["xl/workbook.xml"].2).contains("fullCalcOnLoad"),
        "adding the CRM ID column asked for no recalculation: no formula reads it"
    );
    let globex = deal_id(&test, "Globex");
    test.run(&["deals", "set", &globex, "amount=7777"])
        .assert_code(0);
    sync_writing(&test, "team.xlsx");
    let after = entries(&path);
    // The amount changed, and the Summary's formula reads it through the defined name
    // PipelineAmounts: the workbook asks for a recalculation.
    assert_other_entries_unchanged(&before, &after, &[PIPELINE_PART, "xl/workbook.xml"]);
    let workbook_xml = String::from_utf8_lossy(&after["xl/workbook.xml"].2).into_owned();
    assert!(
        workbook_xml.contains("fullCalcOnLoad=\"1\""),
        "{workbook_xml}"
    );
    let (cells_before, elements_before) = sheet_xml(&before[PIPELINE_PART].2);
    let (cells_after, elements_after) = sheet_xml(&after[PIPELINE_PART].2);
    let changed: Vec<&String> = cells_before
        .keys()
        .filter(|reference| cells_after.get(*reference) != cells_before.get(*reference))
        .collect();
    assert_eq!(changed, ["E4"], "only Globex's amount changed");
    assert_eq!(
        cells_after["E4"].style, cells_before["E4"].style,
        "the \"$\" format stays"
    );
    assert!(
        cells_after["E4"].xml.contains("<v>7777</v>"),
        "{:?}",
        cells_after["E4"]
    );
    assert_eq!(elements_after, elements_before);
    assert_eq!(read_xlsx(&path, "Pipeline").column("Amount")[1], "7777");
}

#[test]
fn a_change_read_by_another_sheets_formula_asks_for_recalculation_without_a_calc_chain() {
    let test = TestDir::new();
    let path = test.path("pipeline.xlsx");
    let mut workbook = Workbook::new();
    let pipeline = workbook.add_worksheet();
    pipeline.set_name("Pipeline").expect("name");
    for (column, text) in ["Company", "Email", "Stage", "Amount", "Owner"]
        .iter()
        .enumerate()
    {
        pipeline
            .write_string(0, column as u16, *text)
            .expect("header");
    }
    for (idx, company) in ["Acme", "Globex", "Initech"].iter().enumerate() {
        let row = idx as u32 + 1;
        pipeline.write_string(row, 0, *company).expect("cell");
        pipeline
            .write_string(
                row,
                1,
                format!("{}@example.com", company.to_lowercase()).as_str(),
            )
            .expect("cell");
        pipeline.write_string(row, 2, "Lead").expect("cell");
        pipeline.write_number(row, 3, 1000.0).expect("cell");
        pipeline.write_string(row, 4, "Alice").expect("cell");
    }
    let summary = workbook.add_worksheet();
    summary.set_name("Summary").expect("name");
    summary
        .write_formula(
            0,
            0,
            Formula::new("=SUM(Pipeline!D2:D4)").set_result("3000"),
        )
        .expect("formula");
    workbook.save(&path).expect("save");
    drop_recalculation_flag(&path);
    let before = entries(&path);
    assert!(
        !before.keys().any(|name| name.contains("calcChain")),
        "the workbook has no calculation chain: {:?}",
        before.keys().collect::<Vec<_>>()
    );
    test.single_source("pipeline.xlsx", "sheet = \"Pipeline\"");
    sync_writing(&test, "pipeline.xlsx");
    let first = entries(&path);
    assert!(
        !String::from_utf8_lossy(&first["xl/workbook.xml"].2).contains("fullCalcOnLoad"),
        "adding the CRM ID column asked for no recalculation: Summary reads only the amounts"
    );

    let globex = deal_id(&test, "Globex");
    test.run(&["deals", "set", &globex, "amount=7777"])
        .assert_code(0);
    sync_writing(&test, "pipeline.xlsx");
    let after = entries(&path);
    assert!(
        String::from_utf8_lossy(&after["xl/workbook.xml"].2).contains("fullCalcOnLoad=\"1\""),
        "Summary's SUM reads the changed amount: its cached 3000 is stale"
    );
    assert_other_entries_unchanged(&first, &after, &[PIPELINE_PART, "xl/workbook.xml"]);
}

#[test]
fn a_formula_in_a_mapped_column_stays_and_the_store_change_is_a_conflict_the_sheet_wins() {
    let test = TestDir::new();
    let path = test.path("p.xlsx");
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.set_name("Pipeline").expect("name");
    for (column, text) in ["Company", "Email", "Stage", "Units", "Price", "Amount"]
        .iter()
        .enumerate()
    {
        sheet.write_string(0, column as u16, *text).expect("header");
    }
    sheet.write_string(1, 0, "Acme").expect("cell");
    sheet.write_string(1, 1, "ann@acme.com").expect("cell");
    sheet.write_string(1, 2, "Lead").expect("cell");
    sheet.write_number(1, 3, 10).expect("cell");
    sheet.write_number(1, 4, 500).expect("cell");
    sheet
        .write_formula(1, 5, Formula::new("=D2*E2").set_result("5000"))
        .expect("formula");
    workbook.save(&path).expect("save");
    test.single_source("p.xlsx", "");
    test.sync().assert_code(0);
    let acme = deal_id(&test, "Acme");
    test.run(&["deals", "set", &acme, "amount=4444", "stage=Prospect"])
        .assert_code(0);
    let report = test.sync();
    report.assert_code(0);
    let report = report.json();
    let file = file_report(&report, "p.xlsx");
    assert_eq!(file["conflicts"], 1);
    let warning = file["issues"]
        .as_array()
        .expect("issues")
        .iter()
        .map(|issue| issue["message"].as_str().unwrap_or_default().to_string())
        .find(|message| message.contains("formula"))
        .unwrap_or_else(|| panic!("a warning about the formula in {file}"));
    assert!(warning.contains("4444"), "{warning}");
    let written = read_xlsx(&path, "Pipeline");
    assert_eq!(written.formulas[&(1, 5)], "D2*E2", "the formula stays");
    assert_eq!(
        written.column("Stage"),
        ["Prospect"],
        "the other change is written"
    );
    assert_eq!(
        test.deal_by("company", "Acme")["amount"],
        5000.0,
        "the sheet won"
    );
    assert_eq!(
        test.count("SELECT COUNT(*) FROM conflicts WHERE field = 'amount' AND winner = 'sheet'"),
        1
    );
}

#[test]
fn new_deals_are_appended_in_the_styles_of_the_row_above() {
    let test = TestDir::new();
    let path = test.path("team.xlsx");
    team_workbook(&path);
    test.write(
        "leads.csv",
        "Company,Contact,Email,Stage,Amount,Owner\nHooli,Hank,hank@hooli.com,Lead,1200,Alice\n",
    );
    test.config(
        "[[sources]]\nname = \"team\"\npath = \"team.xlsx\"\nsheet = \"Pipeline\"\nview = \"all\"\n\n[[sources]]\nname = \"leads\"\npath = \"leads.csv\"\nwrite_back = false\n",
    );
    test.sync().assert_code(0);
    let (cells, elements) = sheet_xml(&entries(&path)[PIPELINE_PART].2);
    let company_column = ["A", "B", "C", "D", "E", "F", "G", "H"];
    for column in company_column {
        assert_eq!(
            cells
                .get(&format!("{column}7"))
                .map(|cell| cell.style.clone()),
            cells
                .get(&format!("{column}6"))
                .map(|cell| cell.style.clone()),
            "{column}7 takes the style of {column}6"
        );
    }
    assert!(cells["A7"].xml.contains(">Hooli<"), "{:?}", cells["A7"]);
    assert_eq!(cells["A7"].kind.as_deref(), Some("inlineStr"));
    assert!(cells["E7"].xml.contains("<v>1200</v>"));
    // The conditional format and the dropdown that ended on the last row now cover the new one.
    assert!(
        elements["conditionalFormatting"].contains("sqref=\"E3:E7\""),
        "{}",
        elements["conditionalFormatting"]
    );
    assert!(
        elements["dataValidations"].contains("sqref=\"D3:D7\""),
        "{}",
        elements["dataValidations"]
    );
    assert_eq!(read_xlsx(&path, "Pipeline").column("Company")[4], "Hooli");
}

/// A plain pipeline sheet, optionally with a total row below the data.
fn plain_workbook(path: &Path, total_row: bool) {
    plain_workbook_with(path, total_row, |_| {});
}

/// The plain pipeline sheet, with more cells written by `more` before it is saved.
fn plain_workbook_with(
    path: &Path,
    total_row: bool,
    more: impl FnOnce(&mut rust_xlsxwriter::Worksheet),
) {
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.set_name("Pipeline").expect("name");
    let fill = Format::new().set_background_color(Color::RGB(0xFFF2CC));
    for (column, text) in ["Company", "Email", "Stage", "Amount", "Owner"]
        .iter()
        .enumerate()
    {
        sheet.write_string(0, column as u16, *text).expect("header");
    }
    for (idx, (company, owner)) in [
        ("Acme", "Alice"),
        ("Globex", "Bob"),
        ("Initech", "Alice"),
        ("Hooli", "Alice"),
    ]
    .iter()
    .enumerate()
    {
        let row = idx as u32 + 1;
        sheet
            .write_string_with_format(row, 0, *company, &fill)
            .expect("cell");
        sheet
            .write_string(
                row,
                1,
                format!("{}@example.com", company.to_lowercase()).as_str(),
            )
            .expect("cell");
        sheet.write_string(row, 2, "Lead").expect("cell");
        sheet
            .write_number(row, 3, 1000.0 * (idx + 1) as f64)
            .expect("cell");
        sheet.write_string(row, 4, *owner).expect("cell");
    }
    if total_row {
        sheet.write_string(6, 0, "Total").expect("cell");
        sheet
            .write_formula(6, 3, Formula::new("=SUM(D2:D5)").set_result("10000"))
            .expect("formula");
    }
    more(sheet);
    workbook.save(path).expect("save");
}

#[test]
fn a_deal_leaving_the_view_takes_its_row_with_it_when_nothing_points_below() {
    let test = TestDir::new();
    let path = test.path("alice.xlsx");
    plain_workbook(&path, false);
    test.single_source("alice.xlsx", "filter = { owner = \"Alice\" }");
    test.sync();
    let globex_row = read_xlsx(&path, "Pipeline").column("Company");
    assert_eq!(
        globex_row,
        ["Acme", "Initech", "Hooli"],
        "Bob's deal left the view"
    );
    let (cells, _) = sheet_xml(&entries(&path)["xl/worksheets/sheet1.xml"].2);
    assert_eq!(
        read_xlsx(&path, "Pipeline").values[2][0],
        "Initech",
        "the rows below moved up"
    );
    assert!(cells["A3"].style.is_some(), "and kept their style");
    assert!(!cells.contains_key("A5"), "no row is left behind");
    let initech = deal_id(&test, "Initech");
    test.run(&["deals", "set", &initech, "owner=Carol"])
        .assert_code(0);
    test.sync();
    assert_eq!(
        read_xlsx(&path, "Pipeline").column("Company"),
        ["Acme", "Hooli"]
    );
    // The mirror follows the rows: an edit of the moved row is still that deal's.
    let written = read_xlsx(&path, "Pipeline");
    assert_eq!(written.column("CRM ID")[1], deal_id(&test, "Hooli"));
}

#[test]
fn a_deal_leaving_the_view_leaves_a_blank_row_when_a_formula_points_below() {
    let test = TestDir::new();
    let path = test.path("alice.xlsx");
    plain_workbook(&path, true);
    test.single_source("alice.xlsx", "filter = { owner = \"Alice\" }");
    test.sync();
    let written = read_xlsx(&path, "Pipeline");
    assert_eq!(
        written.column("Company"),
        ["Acme", "", "Initech", "Hooli", "", "Total"]
    );
    assert_eq!(
        written.formulas[&(6, 3)],
        "SUM(D2:D5)",
        "the total still sums the same rows"
    );
    let (cells, _) = sheet_xml(&entries(&path)["xl/worksheets/sheet1.xml"].2);
    assert!(
        !cells["A3"].xml.contains("<v>") && !cells["A3"].xml.contains("<is>"),
        "the cleared cell holds nothing: {:?}",
        cells["A3"]
    );
    assert!(cells["A3"].style.is_some(), "but keeps its fill");
}

#[test]
fn a_deal_leaving_the_view_leaves_a_blank_row_when_a_formula_above_it_points_below() {
    let test = TestDir::new();
    let path = test.path("alice.xlsx");
    // G2 sits above the row that leaves (Globex, row 3) and reads Hooli's amount in row 5.
    plain_workbook_with(&path, false, |sheet| {
        sheet
            .write_formula(1, 6, Formula::new("=D5").set_result("4000"))
            .expect("formula");
    });
    test.single_source("alice.xlsx", "filter = { owner = \"Alice\" }");
    test.sync();
    let written = read_xlsx(&path, "Pipeline");
    assert_eq!(
        written.column("Company"),
        ["Acme", "", "Initech", "Hooli"],
        "Globex's row is blank, the rows below did not move"
    );
    assert_eq!(written.formulas[&(1, 6)], "D5");
    assert_eq!(written.values[4][0], "Hooli", "D5 is still Hooli's amount");
    assert_eq!(written.values[4][3], "4000");
}

#[test]
fn an_xlsm_is_written_back_and_keeps_its_macros() {
    let test = TestDir::new();
    let vba = test.path("vbaProject.bin");
    std::fs::write(
        &vba,
        b"\xd0\xcf\x11\xe0 not a real VBA project, but bytes that must survive",
    )
    .expect("vba");
    let path = test.path("macro.xlsm");
    let mut workbook = Workbook::new();
    workbook.add_vba_project(&vba).expect("vba");
    let sheet = workbook.add_worksheet();
    for (column, text) in ["Company", "Email", "Stage"].iter().enumerate() {
        sheet.write_string(0, column as u16, *text).expect("header");
    }
    sheet.write_string(1, 0, "Acme").expect("cell");
    sheet.write_string(1, 1, "ann@acme.com").expect("cell");
    sheet.write_string(1, 2, "Lead").expect("cell");
    workbook.save(&path).expect("save");
    let before = entries(&path);
    assert!(before.contains_key("xl/vbaProject.bin"));
    test.single_source("macro.xlsm", "");
    sync_writing(&test, "macro.xlsm");
    let after = entries(&path);
    assert_other_entries_unchanged(&before, &after, &[PIPELINE_PART]);
    assert_eq!(
        read_xlsx(&path, "Sheet1").column("CRM ID"),
        [deal_id(&test, "Acme")]
    );
}

#[test]
fn a_workbook_with_a_chart_sheet_and_a_table_is_written_in_place() {
    let test = TestDir::new();
    let path = test.path("table.xlsx");
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.set_name("Pipeline").expect("name");
    for (column, text) in ["Company", "Email", "Stage", "Amount"].iter().enumerate() {
        sheet.write_string(0, column as u16, *text).expect("header");
    }
    for (row, company) in ["Acme", "Globex"].iter().enumerate() {
        let row = row as u32 + 1;
        sheet.write_string(row, 0, *company).expect("cell");
        sheet
            .write_string(
                row,
                1,
                format!("{}@example.com", company.to_lowercase()).as_str(),
            )
            .expect("cell");
        sheet.write_string(row, 2, "Lead").expect("cell");
        sheet.write_number(row, 3, 100.0).expect("cell");
    }
    sheet.add_table(0, 0, 2, 4, &Table::new()).expect("table");
    let chart_sheet = workbook.add_chartsheet();
    let mut chart = Chart::new(ChartType::Bar);
    chart.add_series().set_values("Pipeline!$D$2:$D$3");
    chart_sheet.insert_chart(0, 0, &chart).expect("chart");
    workbook.save(&path).expect("save");
    test.write(
        "more.csv",
        "Company,Email,Stage,Amount\nInitech,ian@initech.com,Lead,300\n",
    );
    test.config(
        "[[sources]]\nname = \"table\"\npath = \"table.xlsx\"\nsheet = \"Pipeline\"\nview = \"all\"\n\n[[sources]]\nname = \"more\"\npath = \"more.csv\"\nwrite_back = false\n",
    );
    let before = entries(&path);
    sync_writing(&test, "table.xlsx");
    let after = entries(&path);
    assert_other_entries_unchanged(&before, &after, &[PIPELINE_PART, "xl/tables/table1.xml"]);
    let table = String::from_utf8_lossy(&after["xl/tables/table1.xml"].2).into_owned();
    assert!(
        table.contains("ref=\"A1:E4\""),
        "the table grew over the new row: {table}"
    );
    let written = read_xlsx(&path, "Pipeline");
    assert_eq!(written.column("Company"), ["Acme", "Globex", "Initech"]);
}

#[test]
fn a_sheet_with_just_a_header_gets_a_frozen_header_filter_dropdown_and_widths() {
    let test = TestDir::new();
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.set_name("Pipeline").expect("name");
    for (column, text) in ["Company", "Email", "Stage", "Amount"].iter().enumerate() {
        sheet.write_string(0, column as u16, *text).expect("header");
    }
    workbook.save(test.path("new.xlsx")).expect("save");
    test.write(
        "leads.csv",
        "Company,Email,Stage,Amount\nAcme,ann@acme.com,Lead,100\nGlobex,gus@globex.com,Won,200\n",
    );
    test.config(
        "[[sources]]\nname = \"new\"\npath = \"new.xlsx\"\nview = \"all\"\n\n[[sources]]\nname = \"leads\"\npath = \"leads.csv\"\nwrite_back = false\n",
    );
    test.sync().assert_code(0);
    let (_, elements) = sheet_xml(&entries(&test.path("new.xlsx"))[PIPELINE_PART].2);
    assert!(
        elements["sheetViews"].contains("state=\"frozen\""),
        "{}",
        elements["sheetViews"]
    );
    assert!(
        elements["cols"].contains("customWidth"),
        "{}",
        elements["cols"]
    );
    assert_eq!(elements["autoFilter"], "<autoFilter ref=\"A1:E3\"/>");
    assert!(
        elements["dataValidations"].contains("C2:C1048576")
            && elements["dataValidations"].contains("Lead,Prospect"),
        "{}",
        elements["dataValidations"]
    );
    assert_eq!(
        read_xlsx(&test.path("new.xlsx"), "Pipeline").column("Company"),
        ["Acme", "Globex"]
    );
}

#[test]
fn libreoffice_reads_the_written_workbook() {
    let Some(soffice) = ["soffice", "libreoffice"].into_iter().find(|program| {
        std::process::Command::new("which")
            .arg(program)
            .output()
            .is_ok_and(|output| output.status.success())
    }) else {
        crate::harness::skip(
            "libreoffice_reads_the_written_workbook",
            "LibreOffice is not installed (apt-get install libreoffice-calc-nogui)",
        );
        return;
    };
    let test = TestDir::new();
    let path = test.path("team.xlsx");
    team_workbook(&path);
    test.single_source("team.xlsx", "sheet = \"Pipeline\"");
    test.sync().assert_code(0);
    let globex = deal_id(&test, "Globex");
    test.run(&["deals", "set", &globex, "amount=7777", "stage=Won"])
        .assert_code(0);
    test.sync().assert_code(0);
    let out = test.path("csv");
    let profile = format!("file://{}", test.path("lo-profile").display());
    let status = std::process::Command::new(soffice)
        .arg(format!("-env:UserInstallation={profile}"))
        // Field separator, text delimiter, UTF-8, from line 1, default cell format, language,
        // quoted fields as text, detect numbers, and the cell contents as shown (formats applied).
        .args([
            "--headless",
            "--convert-to",
            "csv:Text - txt - csv (StarCalc):44,34,76,1,,0,false,true,true",
            "--outdir",
        ])
        .arg(&out)
        .arg(&path)
        .output()
        .expect("run soffice");
    assert!(
        status.status.success(),
        "soffice failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let csv = std::fs::read_to_string(out.join("team.csv")).expect("converted csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("Team pipeline 2026"), "{csv}");
    assert!(
        lines[1].starts_with("Company,Contact,Email,Stage,Amount,Owner,Next Step"),
        "{csv}"
    );
    assert!(lines[1].ends_with("CRM ID"), "{csv}");
    let globex_line = lines
        .iter()
        .find(|line| line.starts_with("Globex"))
        .expect("Globex");
    assert!(globex_line.contains(",Won,"), "{globex_line}");
    assert!(
        globex_line.contains("\"$7,777.00\""),
        "the currency format stays: {globex_line}"
    );
    assert!(
        globex_line.contains("02 Dec 2026"),
        "the date format stays: {globex_line}"
    );
    assert!(
        globex_line.ends_with(&format!(",{globex}")),
        "{globex_line}"
    );
    let seen: HashSet<&str> = lines[2..]
        .iter()
        .filter_map(|line| line.split(',').next())
        .collect();
    assert_eq!(
        seen,
        HashSet::from(["Acme", "Globex", "Initech", "Umbrella"])
    );
}

/// Rewrites a package with one part replaced (or added).
fn replace_part(path: &Path, part: &str, bytes: &[u8]) {
    use std::io::Write;
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path).expect("open")).expect("zip");
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for entry_idx in 0..archive.len() {
        let entry = archive.by_index_raw(entry_idx).expect("entry");
        if entry.name().expect("name") == part {
            continue;
        }
        out.raw_copy_file(entry).expect("copy");
    }
    out.start_file(part, zip::write::SimpleFileOptions::default())
        .expect("start");
    out.write_all(bytes).expect("write");
    let bytes = out.finish().expect("finish").into_inner();
    std::fs::write(path, bytes).expect("save");
}

#[test]
fn a_write_back_that_cannot_be_done_safely_is_a_failure_everywhere() {
    let test = TestDir::new();
    let path = test.path("alice.xlsx");
    plain_workbook(&path, false);
    // The sheet's relationships are not valid XML: calamine reads the cells, but nobody can
    // say what the sheet points at, so it is not edited.
    replace_part(
        &path,
        "xl/worksheets/_rels/sheet1.xml.rels",
        b"<Relationships><Relationship Id=",
    );
    let before = std::fs::read(&path).expect("read");
    let smtp = crate::harness::SmtpServer::start(0);
    test.config(&format!(
        "[alerts]\nto = \"it@example.com\"\n\n[smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"funnelsync@example.com\"\n\n[[sources]]\nname = \"pipeline\"\npath = \"alice.xlsx\"\n",
        smtp.port
    ));
    let run = test.sync();
    run.assert_code(1);
    let report = run.json();
    let file = file_report(&report, "alice.xlsx");
    assert_eq!(file["status"], "synced", "the store took the rows");
    assert_eq!(file["write_back"]["status"], "failed");
    assert!(
        file["write_back"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("cannot edit")),
        "{file}"
    );
    assert_eq!(report["ok"], false);
    assert_eq!(
        std::fs::read(&path).expect("read"),
        before,
        "the file is untouched"
    );
    assert_eq!(test.deals().len(), 4);
    let status = test.run(&["status", "--format", "json"]);
    status.assert_code(0);
    let status = status.json();
    assert_eq!(status[0]["last_status"], "failed", "{status}");
    assert!(
        status[0]["last_message"]
            .as_str()
            .is_some_and(|message| message.contains("could not be written back")),
        "{status}"
    );
    let errors = test.run(&["errors"]);
    assert!(
        errors.stdout.contains("could not be written back"),
        "{}",
        errors.stdout
    );
    let table = test.run(&["sync"]);
    table.assert_code(1);
    assert!(
        table.stdout.contains("write-back failed"),
        "{}",
        table.stdout
    );
    crate::harness::wait_until(std::time::Duration::from_secs(10), "the alert", || {
        !smtp.to("it@example.com").is_empty()
    });
    let alerts = smtp.to("it@example.com");
    assert_eq!(alerts.len(), 1, "one alert, however often the sync fails");
    assert_eq!(
        alerts[0].subject(),
        "funnelsync: alice.xlsx cannot be written back"
    );
}

#[test]
fn a_header_only_sheet_keeps_its_own_pane_widths_and_validation() {
    let test = TestDir::new();
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.set_name("Pipeline").expect("name");
    for (column, text) in ["Company", "Email", "Stage"].iter().enumerate() {
        sheet.write_string(0, column as u16, *text).expect("header");
    }
    sheet.set_freeze_panes(1, 1).expect("pane");
    sheet.set_column_width(0, 33).expect("width");
    sheet
        .add_data_validation(
            1,
            2,
            50,
            2,
            &DataValidation::new()
                .allow_list_strings(&["Hot", "Cold"])
                .expect("list"),
        )
        .expect("validation");
    workbook.save(test.path("own.xlsx")).expect("save");
    let (_, before) = sheet_xml(&entries(&test.path("own.xlsx"))[PIPELINE_PART].2);
    test.write("leads.csv", "Company,Email,Stage\nAcme,ann@acme.com,Lead\n");
    test.config(
        "[[sources]]\nname = \"own\"\npath = \"own.xlsx\"\nview = \"all\"\n\n[[sources]]\nname = \"leads\"\npath = \"leads.csv\"\nwrite_back = false\n",
    );
    test.sync().assert_code(0);
    let (_, after) = sheet_xml(&entries(&test.path("own.xlsx"))[PIPELINE_PART].2);
    for name in ["sheetViews", "cols", "dataValidations"] {
        assert_eq!(after[name], before[name], "the sheet's own {name} stays");
    }
    assert!(after.contains_key("autoFilter"), "what it lacked is added");
    assert_eq!(
        read_xlsx(&test.path("own.xlsx"), "Pipeline").column("Company"),
        ["Acme"]
    );
}

/// Runs the binary with its files limited to `max_file_bytes` (as a full disk or a quota stops a
/// write partway): a write past it fails with EFBIG instead of the process being killed.
fn run_with_file_size_limit(
    test: &TestDir,
    max_file_bytes: u64,
    args: &[&str],
) -> crate::harness::Run {
    use std::os::unix::process::CommandExt;
    let mut command = test.command(args);
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // async-signal-safe functions (signal, setrlimit).
    unsafe {
        command.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: max_file_bytes,
                rlim_max: max_file_bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    crate::harness::Run::from_output(command.output().expect("run funnelsync"))
}

/// Adds a stored (uncompressed) entry of `n_bytes` that nothing reads, so the workbook is larger
/// than anything else funnelsync writes.
fn add_padding_entry(path: &Path, n_bytes: usize) {
    use std::io::Write;
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path).expect("open")).expect("zip");
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for entry_idx in 0..archive.len() {
        out.raw_copy_file(archive.by_index_raw(entry_idx).expect("entry"))
            .expect("copy");
    }
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    out.start_file("customXml/padding.bin", stored)
        .expect("start");
    let bytes = crate::harness::Random(0x9E37_79B9_7F4A_7C15).bytes(n_bytes);
    out.write_all(&bytes).expect("write");
    let bytes = out.finish().expect("finish").into_inner();
    std::fs::write(path, bytes).expect("save");
}

#[test]
fn a_write_back_cut_short_by_a_full_disk_fails_and_leaves_the_workbook_whole() {
    let test = TestDir::new();
    let path = test.path("share/alice.xlsx");
    std::fs::create_dir_all(test.path("share")).expect("share");
    plain_workbook(&path, false);
    add_padding_entry(&path, 6_000_000);
    for backups in [1, 0] {
        test.config(&format!(
            "[[sources]]\nname = \"pipeline\"\npath = \"share/alice.xlsx\"\nbackups = {backups}\n"
        ));
        let before = std::fs::read(&path).expect("read");
        let backups_before = backup_names(&test);
        // Half the workbook's size: the backup copy (when kept) or the new file stops partway,
        // while the store's writes go through (a new store of 16 KB pages is ≈ 640 KB).
        let run = run_with_file_size_limit(&test, 3_000_000, &["sync", "--format", "json"]);
        run.assert_code(1);
        let report = run.json();
        let file = file_report(&report, "alice.xlsx");
        // The first time the store takes the rows; the second time it has them already, and the
        // write-back is tried again all the same.
        let expected = if backups == 1 { "synced" } else { "unchanged" };
        assert_eq!(file["status"], expected, "{file}");
        assert_eq!(
            file["write_back"]["status"], "failed",
            "backups = {backups}: {file}"
        );
        let message = file["write_back"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("File too large") && !message.contains("not a valid zip"),
            "the message says the write failed, not that the workbook is broken: {message}"
        );
        assert_eq!(
            std::fs::read(&path).expect("read"),
            before,
            "the workbook is untouched"
        );
        let share: Vec<String> = std::fs::read_dir(test.path("share"))
            .expect("share")
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name != ".funnelsync")
            .collect();
        assert_eq!(share, ["alice.xlsx"], "no temp file is left beside it");
        assert_eq!(
            backup_names(&test),
            backups_before,
            "no partial backup is left"
        );
        let status = test.run(&["status", "--format", "json"]).json();
        assert_eq!(status[0]["last_status"], "failed", "{status}");
    }
    // With room again, the next sync writes the CRM IDs in.
    let run = test.sync();
    run.assert_code(0);
    assert_eq!(
        file_report(&run.json(), "alice.xlsx")["write_back"]["status"],
        "written"
    );
    assert_eq!(read_xlsx(&path, "Pipeline").column("CRM ID").len(), 4);
}

/// The backups funnelsync keeps of the share's files (hidden temp files included).
fn backup_names(test: &TestDir) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(test.path("share/.funnelsync/backups"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Rewrites the sheet part stored (uncompressed) with `n_bytes` of XML comments after its data:
/// a large file whose rewrite (compressed again) is small.
fn store_sheet_with_comment_padding(path: &Path, n_bytes: usize) {
    use std::io::Write;
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path).expect("open")).expect("zip");
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for entry_idx in 0..archive.len() {
        let name = archive
            .name_for_index(entry_idx)
            .expect("name")
            .expect("name")
            .to_string();
        if name != PIPELINE_PART {
            out.raw_copy_file(archive.by_index_raw(entry_idx).expect("entry"))
                .expect("copy");
            continue;
        }
        let mut xml = String::new();
        archive
            .by_index(entry_idx)
            .expect("entry")
            .read_to_string(&mut xml)
            .expect("read");
        // Comments of up to 500 KB each: within what the reader allows one comment.
        let mut padding = String::new();
        let mut left = n_bytes;
        while left > 0 {
            let n = left.min(500_000);
            padding.push_str(&format!("<!--{}-->", "x".repeat(n)));
            left -= n;
        }
        let xml = xml.replacen("</sheetData>", &format!("</sheetData>{padding}"), 1);
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        out.start_file(name.as_str(), stored).expect("start");
        out.write_all(xml.as_bytes()).expect("write");
    }
    let bytes = out.finish().expect("finish").into_inner();
    std::fs::write(path, bytes).expect("save");
}

#[test]
fn a_backup_cut_short_by_a_full_disk_fails_the_write_back_and_leaves_no_partial_backup() {
    let test = TestDir::new();
    let path = test.path("share/alice.xlsx");
    std::fs::create_dir_all(test.path("share")).expect("share");
    plain_workbook(&path, false);
    store_sheet_with_comment_padding(&path, 6_000_000);
    let before = std::fs::read(&path).expect("read");
    assert!(before.len() > 6_000_000, "{}", before.len());
    test.config("[[sources]]\nname = \"pipeline\"\npath = \"share/alice.xlsx\"\nbackups = 2\n");
    // The new file (its sheet compressed again) and the store (≈ 640 KB of 16 KB pages) fit
    // under the limit; the backup, a copy of the 6 MB original, does not.
    let run = run_with_file_size_limit(&test, 3_000_000, &["sync", "--format", "json"]);
    run.assert_code(1);
    let report = run.json();
    let file = file_report(&report, "alice.xlsx");
    assert_eq!(file["status"], "synced", "{file}");
    assert_eq!(file["write_back"]["status"], "failed", "{file}");
    let message = file["write_back"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("backup") && message.contains("File too large"),
        "the message says it was the backup: {message}"
    );
    assert_eq!(
        std::fs::read(&path).expect("read"),
        before,
        "the workbook is untouched"
    );
    assert_eq!(
        backup_names(&test),
        Vec::<String>::new(),
        "the partial backup is gone and does not count in the rotation"
    );
    let status = test.run(&["status", "--format", "json"]).json();
    assert_eq!(status[0]["last_status"], "failed", "{status}");
    assert!(
        status[0]["last_message"]
            .as_str()
            .is_some_and(|message| message.contains("backup")),
        "{status}"
    );
    // With room again: written, and exactly one backup, whole.
    let run = test.sync();
    run.assert_code(0);
    assert_eq!(
        file_report(&run.json(), "alice.xlsx")["write_back"]["status"],
        "written"
    );
    let backups = backup_names(&test);
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(
        std::fs::read(test.path("share/.funnelsync/backups").join(&backups[0])).expect("backup"),
        before
    );
}
