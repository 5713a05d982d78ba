//! Property test of the in-place editor: for random sheets and random edits, the written package
//! is a valid zip whose other entries are unchanged, and calamine reads back exactly the planned
//! values.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};

use calamine::{Data, Reader};
use chrono::NaiveDate;
use proptest::prelude::*;
use rust_xlsxwriter::{Format, Formula, Workbook};

use crate::writeback::{OutCell, PlannedRow, SheetPlan};

const N_COLUMNS: usize = 4;

/// A cell of the random sheet as written and as expected back.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Text(String),
    Number(f64),
    Date(NaiveDate),
}

/// A value for a column: text in the first and last, numbers in the second, dates in the third,
/// as a real sheet keeps one kind of value (and one number format) per column.
fn value_strategy(column: usize) -> BoxedStrategy<Option<Value>> {
    let text = "[a-zA-Z =+@&<>\"'中文]{1,8}".prop_map(|text| Some(Value::Text(text)));
    let some = match column {
        1 => (-1.0e6..1.0e6f64)
            .prop_map(|number| Some(Value::Number((number * 100.0).round() / 100.0)))
            .boxed(),
        2 => (0u32..20_000)
            .prop_map(|days| {
                Some(Value::Date(
                    NaiveDate::from_ymd_opt(1990, 1, 1).expect("date")
                        + chrono::Days::new(u64::from(days)),
                ))
            })
            .boxed(),
        _ => text.boxed(),
    };
    prop_oneof![1 => Just(None), 3 => some].boxed()
}

fn row_strategy() -> impl Strategy<Value = Vec<Option<Value>>> {
    (0..N_COLUMNS).map(value_strategy).collect::<Vec<_>>()
}

fn out_cell(value: &Option<Value>) -> OutCell {
    match value {
        None => OutCell::Empty,
        Some(Value::Text(text)) => OutCell::Text(text.clone()),
        Some(Value::Number(number)) => OutCell::Number(*number),
        Some(Value::Date(date)) => OutCell::Date(*date),
    }
}

/// Writes the sheet (a header on row 1, then the rows) plus a second sheet, optionally with a
/// formula in the last column of the first data row.
fn workbook(rows: &[Vec<Option<Value>>], formula: bool) -> Vec<u8> {
    let mut workbook = Workbook::new();
    let fill = Format::new().set_background_color(rust_xlsxwriter::Color::RGB(0xDDEEFF));
    let date_format = Format::new().set_num_format("dd/mm/yyyy");
    let sheet = workbook.add_worksheet();
    sheet.set_name("Data").expect("name");
    for column in 0..N_COLUMNS {
        sheet
            .write_string(0, column as u16, format!("H{column}"))
            .expect("header");
    }
    for (row_idx, row) in rows.iter().enumerate() {
        let row_number = row_idx as u32 + 1;
        for (column, value) in row.iter().enumerate() {
            let column = column as u16;
            match value {
                None => {}
                Some(Value::Text(text)) => {
                    sheet
                        .write_string_with_format(row_number, column, text, &fill)
                        .expect("text");
                }
                Some(Value::Number(number)) => {
                    sheet
                        .write_number(row_number, column, *number)
                        .expect("number");
                }
                Some(Value::Date(date)) => {
                    let serial = super::date_serial(*date, false).expect("serial") as f64;
                    sheet
                        .write_number_with_format(row_number, column, serial, &date_format)
                        .expect("date");
                }
            }
        }
    }
    if formula && !rows.is_empty() {
        sheet
            .write_formula(
                1,
                (N_COLUMNS - 1) as u16,
                Formula::new("=1+1").set_result("2"),
            )
            .expect("formula");
    }
    let other = workbook.add_worksheet();
    other.write_string(0, 0, "untouched").expect("other");
    workbook.save_to_buffer().expect("bytes")
}

fn read_back(bytes: &[u8]) -> Vec<Vec<Option<Value>>> {
    let mut workbook: calamine::Xlsx<_> =
        calamine::open_workbook_from_rs(Cursor::new(bytes.to_vec())).expect("open written");
    let range = workbook.worksheet_range("Data").expect("sheet");
    let mut rows: BTreeMap<u32, Vec<Option<Value>>> = BTreeMap::new();
    for (row, column, data) in range.cells() {
        let row = row as u32 + range.start().map_or(0, |start| start.0);
        let column = column + range.start().map_or(0, |start| start.1 as usize);
        if row == 0 {
            continue;
        }
        let value = match data {
            Data::Empty => None,
            Data::String(text) => Some(Value::Text(text.clone())),
            Data::Float(number) => Some(Value::Number(*number)),
            Data::Int(number) => Some(Value::Number(*number as f64)),
            Data::DateTime(datetime) => datetime.as_datetime().map(|at| Value::Date(at.date())),
            other => Some(Value::Text(format!("unexpected {other:?}"))),
        };
        let cells = rows.entry(row).or_insert_with(|| vec![None; N_COLUMNS]);
        if column < N_COLUMNS {
            cells[column] = value;
        }
    }
    let last = rows.keys().max().copied().unwrap_or(0);
    (1..=last)
        .map(|row| rows.remove(&row).unwrap_or_else(|| vec![None; N_COLUMNS]))
        .collect()
}

/// Each entry's name → its content and its bytes as stored (compressed), so that "copied
/// through" can be checked byte for byte.
fn entries(bytes: &[u8]) -> BTreeMap<String, (Vec<u8>, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).expect("a valid zip");
    (0..archive.len())
        .map(|idx| {
            let mut raw = Vec::new();
            archive
                .by_index_raw(idx)
                .expect("entry")
                .read_to_end(&mut raw)
                .expect("read raw");
            let mut entry = archive.by_index(idx).expect("entry");
            let mut content = Vec::new();
            entry.read_to_end(&mut content).expect("read");
            (entry.name().expect("name").into_owned(), (content, raw))
        })
        .collect()
}

/// The `count` of `styles.xml`'s `<cellXfs>`.
fn n_cell_formats(styles: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(styles).ok()?;
    let start = text.find("<cellXfs count=\"")? + "<cellXfs count=\"".len();
    text[start..].split('"').next()?.parse().ok()
}

#[derive(Debug, Clone)]
struct Case {
    rows: Vec<Vec<Option<Value>>>,
    /// Per row: removed, or the new values of some columns.
    edits: Vec<(bool, BTreeMap<usize, Option<Value>>)>,
    new_rows: Vec<Vec<Option<Value>>>,
    formula: bool,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (1usize..8, any::<bool>()).prop_flat_map(|(n_rows, formula)| {
        let edit = (
            proptest::bool::weighted(0.2),
            proptest::collection::vec(proptest::option::weighted(0.4, Just(())), N_COLUMNS),
            row_strategy(),
        )
            .prop_map(|(remove, chosen, values)| {
                let overrides: BTreeMap<usize, Option<Value>> = chosen
                    .iter()
                    .zip(values)
                    .enumerate()
                    .filter(|(_, (chosen, _))| chosen.is_some())
                    .map(|(column, (_, value))| (column, value))
                    .collect();
                (remove, overrides)
            });
        (
            proptest::collection::vec(row_strategy(), n_rows),
            proptest::collection::vec(edit, n_rows),
            proptest::collection::vec(row_strategy(), 0..3),
            Just(formula),
        )
            .prop_map(|(rows, edits, new_rows, formula)| Case {
                rows,
                edits,
                new_rows,
                formula,
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn the_written_package_holds_exactly_the_planned_values(case in case_strategy()) {
        let original = workbook(&case.rows, case.formula);
        let mut plan = SheetPlan {
            headers: (0..N_COLUMNS).map(|column| format!("H{column}")).collect(),
            roles: vec![None; N_COLUMNS],
            header_row_number: 1,
            rows: Vec::new(),
            removed: Vec::new(),
            removed_deals: Vec::new(),
            style_rows: Default::default(),
            formula_cells: Vec::new(),
            last_data_row: None,
            added_key_column: None,
            changed: true,
        };
        // What the sheet should hold afterwards, by row as written: kept rows then new rows.
        let mut expected_kept: Vec<(u32, Vec<Option<Value>>)> = Vec::new();
        for (row_idx, (row, (remove, overrides))) in case.rows.iter().zip(&case.edits).enumerate() {
            let row_number = row_idx as u32 + 2;
            if *remove {
                plan.removed.push(row_number);
                continue;
            }
            let mut values = row.clone();
            let mut planned = BTreeMap::new();
            for (column, value) in overrides {
                let is_formula = case.formula && row_idx == 0 && *column == N_COLUMNS - 1;
                planned.insert(*column, out_cell(value));
                if !is_formula {
                    values[*column] = value.clone();
                }
            }
            if case.formula && row_idx == 0 {
                values[N_COLUMNS - 1] = Some(Value::Number(2.0));
            }
            plan.rows.push(PlannedRow { origin: Some(row_number), overrides: planned, deal_id: None, fields: Default::default(), extras: Default::default() });
            expected_kept.push((row_number, values));
        }
        for row in &case.new_rows {
            plan.rows.push(PlannedRow {
                origin: None,
                overrides: row.iter().enumerate().map(|(column, value)| (column, out_cell(value))).collect(),
                deal_id: None,
                fields: Default::default(),
                extras: Default::default(),
            });
        }
        let formula_cells = if case.formula && !case.rows.is_empty() { vec![(2, (N_COLUMNS - 1) as u32)] } else { Vec::new() };
        let sheet = crate::workbook::SheetData {
            path: "random.xlsx".into(),
            format: crate::workbook::FileFormat::Xlsx,
            sheet_name: "Data".to_string(),
            rows: Vec::new(),
            content_hash: String::new(),
            modified: None,
            csv_format: None,
            formula_cells,
        };
        let mut out = Cursor::new(Vec::new());
        let mut original_file = tempfile::tempfile().expect("temp file");
        std::io::Write::write_all(&mut original_file, &original).expect("write the original");
        let row_numbers = super::build(&sheet, &original_file, &plan, &[], &mut out).expect("build");
        let written = out.into_inner();

        let before = entries(&original);
        let after = entries(&written);
        prop_assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
        for (name, (content, raw)) in &before {
            let (content_after, raw_after) = &after[name];
            if name == "xl/worksheets/sheet1.xml" || raw_after == raw {
                continue;
            }
            // Only two other parts may change, and only so: one date style added to the styles,
            // the recalculation flag set on the workbook.
            match name.as_str() {
                "xl/styles.xml" => prop_assert_eq!(
                    n_cell_formats(content_after),
                    n_cell_formats(content).map(|count| count + 1),
                    "styles.xml changed by more than one added format"
                ),
                "xl/workbook.xml" => prop_assert!(
                    String::from_utf8_lossy(content_after).contains("fullCalcOnLoad=\"1\""),
                    "workbook.xml changed without asking for recalculation"
                ),
                _ => prop_assert!(false, "{} changed (its stored bytes differ)", name),
            }
        }

        // Removed rows are deleted (the rows below moving up) unless the formula (on the first
        // data row) is at or below the first of them; then they are cleared, formula kept.
        let first_removed = plan.removed.first().copied();
        let shifted = !(case.formula && first_removed == Some(2));
        let mut expected: BTreeMap<u32, Vec<Option<Value>>> = BTreeMap::new();
        let mut next = 2u32;
        for (row_number, values) in &expected_kept {
            let at = if shifted { next } else { *row_number };
            next = at + 1;
            expected.insert(at, values.clone());
        }
        if !shifted {
            for row_number in &plan.removed {
                let mut values = vec![None; N_COLUMNS];
                if *row_number == 2 {
                    values[N_COLUMNS - 1] = Some(Value::Number(2.0));
                }
                expected.insert(*row_number, values);
            }
        }
        let last_data_row = if shifted { next - 1 } else { case.rows.len() as u32 + 1 };
        for (idx, row) in case.new_rows.iter().enumerate() {
            expected.insert(last_data_row + 1 + idx as u32, row.clone());
        }
        let planned_numbers: Vec<u32> = expected_kept
            .iter()
            .map(|(row_number, _)| *row_number)
            .scan(2u32, |next, row_number| {
                let at = if shifted { *next } else { row_number };
                *next = at + 1;
                Some(at)
            })
            .chain((0..case.new_rows.len() as u32).map(|idx| last_data_row + 1 + idx))
            .collect();
        prop_assert_eq!(&row_numbers, &planned_numbers);
        let read = read_back(&written);
        for (row_idx, values) in read.iter().enumerate() {
            let row_number = row_idx as u32 + 2;
            let wanted = expected.get(&row_number).cloned().unwrap_or_else(|| vec![None; N_COLUMNS]);
            prop_assert_eq!(values, &wanted, "row {}", row_number);
        }
        for (row_number, values) in &expected {
            if values.iter().any(Option::is_some) {
                prop_assert!((*row_number as usize - 2) < read.len(), "row {} missing", row_number);
            }
        }
    }
}
