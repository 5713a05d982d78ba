//! The performance benchmark. Run with
//! `cargo run --release --example bench -- --rows 100000`
//! It generates workbooks of 10,000 and `--rows` rows × 12 columns in a temp folder and prints,
//! for each size, every figure and its ratio to the baseline measured in the same run:
//! calamine alone streaming every cell. Each run of a phase with a target follows a run of the
//! baseline, and its ratio is the median of those pairs' ratios (see `measure_paired`). Each phase runs in a child process of its own so that its
//! peak memory (VmHWM) is its own. Not a test: it asserts correctness only (a one-cell change must
//! write exactly one deal), never timings.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

// The benchmark times the library's phases one by one, through the few items the library
// lends it in its hidden `internals` module; under the crate's name, so that every path below
// reads as the module the item comes from.
use ::funnelsync::internals as funnelsync;
use funnelsync::config::Config;
use funnelsync::store::Store;
use funnelsync::sync;

const COLUMNS: [&str; 12] = [
    "Company",
    "Contact",
    "Email",
    "Phone",
    "Stage",
    "Amount",
    "Owner",
    "Next Step",
    "Last Contact",
    "Expected Close",
    "Region",
    "Notes",
];

fn peak_kb() -> u64 {
    status_kb("VmHWM:")
}

/// A figure in kB from /proc/self/status, such as `VmHWM:` (peak) or `VmRSS:` (now).
fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(key))
                .map(str::to_string)
        })
        .and_then(|line| {
            line.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse().ok())
        })
        .unwrap_or(0)
}

fn cell(row: u32, column: usize, changed: Option<u32>) -> String {
    let stages = ["Lead", "Prospect", "Opportunity", "Won", "Lost"];
    match column {
        0 => format!("Company {row}"),
        1 => format!("Contact {row}"),
        2 => format!("contact{row}@example.com"),
        3 => format!("+86 138 {:04} {:04}", row % 10_000, (row * 7) % 10_000),
        4 => stages[(row % 5) as usize].to_string(),
        5 => format!(
            "{}",
            if Some(row) == changed {
                999_999
            } else {
                1000 + row % 50_000
            }
        ),
        6 => ["Alice Wang", "Bob Smith", "王伟", "李明"][(row % 4) as usize].to_string(),
        7 => "Follow-up call".to_string(),
        8 => format!("2026-{:02}-{:02}", 1 + row % 12, 1 + row % 28),
        9 => format!("2027-{:02}-{:02}", 1 + row % 12, 1 + row % 28),
        10 => ["East", "West", "North", "South"][(row % 4) as usize].to_string(),
        _ => format!("note {row}"),
    }
}

/// Writes the test workbook with rust_xlsxwriter (constant memory); returns the seconds taken.
/// The most data rows a sheet holds under its header row.
const EXCEL_MAX_DATA_ROWS: u32 = 1_048_575;

fn generate(path: &Path, n_rows: u32, changed: Option<u32>) -> f64 {
    let started = Instant::now();
    let mut workbook = rust_xlsxwriter::Workbook::new();
    let sheet = workbook
        .add_worksheet_with_constant_memory()
        .expect("constant memory sheet");
    sheet.set_name("Pipeline").expect("name");
    for (column, header) in COLUMNS.iter().enumerate() {
        sheet
            .write_string(0, column as u16, *header)
            .expect("header");
    }
    for row in 1..=n_rows {
        for column in 0..COLUMNS.len() {
            let text = cell(row, column, changed);
            if column == 5 {
                sheet
                    .write_number(row, column as u16, text.parse::<f64>().unwrap_or(0.0))
                    .expect("number");
            } else {
                sheet.write_string(row, column as u16, &text).expect("text");
            }
        }
    }
    let temp = path.with_extension("tmp");
    workbook.save(&temp).expect("save");
    std::fs::rename(&temp, path).expect("rename");
    started.elapsed().as_secs_f64()
}

/// The store of the phases the parent is measuring now: a PostgreSQL database's URL, or `None`
/// for the SQLite file `crm.db` in the bench folder. Handed to each child in
/// `FUNNELSYNC_BENCH_STORE_URL`.
static POSTGRES_STORE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// How many baseline-and-phase pairs a paired figure takes (`--pairs N`, odd; 3 by default).
static PAIRS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(3);

/// The lowest and highest pair ratio of the last paired figure, printed beside it.
static LAST_SPREAD: std::sync::Mutex<Option<(f64, f64)>> = std::sync::Mutex::new(None);

fn store_section() -> String {
    match std::env::var("FUNNELSYNC_BENCH_STORE_URL") {
        Ok(url) if !url.is_empty() => format!("[store]\nurl = \"{url}\"\n"),
        _ => "[store]\npath = \"crm.db\"\n".to_string(),
    }
}

/// The PostgreSQL column's database: dropped and created again before each measured import.
struct PostgresBench {
    server: String,
    url: String,
}

impl PostgresBench {
    const DATABASE: &'static str = "funnelsync_bench";

    fn new(server: &str) -> Result<PostgresBench, String> {
        let (base, _) = server
            .rsplit_once('/')
            .ok_or_else(|| format!("no database in {server}"))?;
        let bench = PostgresBench {
            server: server.to_string(),
            url: format!("{base}/{}", PostgresBench::DATABASE),
        };
        bench.reset()?;
        Ok(bench)
    }

    fn reset(&self) -> Result<(), String> {
        let mut client = postgres::Client::connect(&self.server, postgres::NoTls)
            .map_err(|error| error.to_string())?;
        // Two statements, not one batch: a batch is one transaction, and CREATE DATABASE may
        // not run in one.
        let describe = |error: postgres::Error| match error.as_db_error() {
            Some(db_error) => db_error.message().to_string(),
            None => error.to_string(),
        };
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                PostgresBench::DATABASE
            ))
            .map_err(describe)?;
        client
            .batch_execute(&format!("CREATE DATABASE {}", PostgresBench::DATABASE))
            .map_err(describe)
    }
}

fn config_for(folder: &Path, file: &str, write_back: bool) -> Config {
    let text = format!(
        "{}\n[[sources]]\nname = \"bench\"\npath = \"{file}\"\nwrite_back = {write_back}\nmax_delete = \"100%\"\n\n[limits]\nmax_rows = 2000000\n",
        store_section()
    );
    let path = folder.join("bench.toml");
    std::fs::write(&path, text).expect("config");
    Config::load(&path).expect("valid config")
}

/// One sync as the daemon runs it, with the store it ran on. A figure stops when the sync
/// returns, its rows committed; the store is closed after (`close_store`): the checkpoint of its
/// log runs on a thread of its own beside what comes next, and closing waits for it.
fn sync_once(folder: &Path, file: &str, write_back: bool) -> (sync::FileReport, Store) {
    let config = config_for(folder, file, write_back);
    let mut store = Store::open(&config.store).expect("store");
    let report = sync::sync_file(
        &mut store,
        &config,
        &config.sources[0],
        &folder.join(file),
        chrono::Utc::now(),
    )
    .expect("sync");
    (report, store)
}

/// Closes a store after its figure was printed, saying on stderr how long that took (the
/// checkpoint still running, and the last connection's own).
fn close_store(store: Option<Store>) {
    if let Some(store) = store {
        let started = Instant::now();
        drop(store);
        eprintln!(
            "closing the store: {:.3} s",
            started.elapsed().as_secs_f64()
        );
    }
}

/// One phase, in this (child) process. Prints "seconds peak_kb".
fn run_phase(phase: &str, folder: &Path, n_rows: u32) {
    let file = "pipeline.xlsx";
    let path = folder.join(file);
    let mut kept_store: Option<Store> = None;
    let started = Instant::now();
    match phase {
        "baseline" => {
            let mut workbook: calamine::Xlsx<_> = calamine::open_workbook(&path).expect("open");
            let mut reader = workbook.worksheet_cells_reader("Pipeline").expect("sheet");
            let mut n_cells = 0u64;
            while let Some(cell) = reader.next_cell().expect("cell") {
                if !matches!(cell.get_value(), calamine::DataRef::Empty) {
                    n_cells += 1;
                }
            }
            assert!(n_cells >= u64::from(n_rows) * 12);
        }
        "import" => {
            let (report, store) = sync_once(folder, file, false);
            kept_store = Some(store);
            assert_eq!(
                report.counts.created,
                u64::from(n_rows),
                "{:?}",
                report.error
            );
        }
        "one-cell" => {
            let (report, store) = sync_once(folder, file, false);
            kept_store = Some(store);
            assert_eq!(
                report.counts.updated, 1,
                "a one-cell change writes exactly one deal"
            );
            assert_eq!(report.counts.created, 0);
        }
        "unchanged" => {
            let (report, store) = sync_once(folder, file, false);
            kept_store = Some(store);
            assert_eq!(report.counts.updated + report.counts.created, 0);
        }
        "write-back" => {
            // Everything up to the write is prepared untimed: read, map, match rows to deals.
            use funnelsync::store::CrmStore;
            let config = config_for(folder, file, true);
            let source = &config.sources[0];
            let store = Store::open(&config.store).expect("store");
            let sheet =
                funnelsync::workbook::read_sheet(&path, None, source.encoding, &config.limits)
                    .expect("read");
            let header = funnelsync::mapping::locate_header(&sheet.rows, source).expect("header");
            let (rows, _) =
                funnelsync::mapping::map_rows(&sheet.rows, &header, source, &config.stages);
            let mirror_rows =
                funnelsync::store::mirror::load_all_rows(&store.db(), &sync::file_key(&path))
                    .expect("mirror");
            let by_row: std::collections::HashMap<u32, i64> = mirror_rows
                .iter()
                .map(|row| (row.row_number, row.deal_id))
                .collect();
            let outcomes: Vec<funnelsync::writeback::RowOutcome> = rows
                .iter()
                .map(|row| funnelsync::writeback::RowOutcome {
                    row_number: row.row_number,
                    deal_id: by_row.get(&row.row_number).copied(),
                    read: row.fields.clone(),
                    merged: Some(row.fields.clone()),
                    extras: row.extras.clone(),
                    merged_extras: None,
                    key_cell: row.id,
                })
                .collect();
            let view = store
                .crm()
                .list_deals(&funnelsync::store::DealFilter::default())
                .expect("deals");
            let n_columns = sheet.rows.iter().map(|row| row.width()).max().unwrap_or(0);
            let plan = funnelsync::writeback::plan(&header, n_columns, &outcomes, &view);
            assert!(plan.changed, "the ids are new to the file");
            let stage_names: Vec<String> = config
                .stages
                .stages
                .iter()
                .map(|stage| stage.name.clone())
                .collect();
            let started = Instant::now();
            funnelsync::writeback::write(&sheet, &plan, &stage_names, 0).expect("write");
            println!("{} {}", started.elapsed().as_secs_f64(), peak_kb());
            return;
        }
        "import-write-back" => {
            let (report, store) = sync_once(folder, file, true);
            kept_store = Some(store);
            assert_eq!(report.counts.created, u64::from(n_rows));
            assert_eq!(report.write_back, sync::WriteBack::Written);
        }
        "write-one-cell" => {
            // The file shows every deal with its CRM ID; the store changed one amount. Reading,
            // mapping and planning are untimed: the figure is the in-place write alone.
            use funnelsync::store::CrmStore;
            let config = config_for(folder, file, true);
            let source = &config.sources[0];
            let store = Store::open(&config.store).expect("store");
            let sheet =
                funnelsync::workbook::read_sheet(&path, None, source.encoding, &config.limits)
                    .expect("read");
            let header = funnelsync::mapping::locate_header(&sheet.rows, source).expect("header");
            let (rows, _) =
                funnelsync::mapping::map_rows(&sheet.rows, &header, source, &config.stages);
            let changed_row = rows.len() / 2;
            let outcomes: Vec<funnelsync::writeback::RowOutcome> = rows
                .iter()
                .enumerate()
                .map(|(row_idx, row)| {
                    let mut merged = row.fields.clone();
                    if row_idx == changed_row {
                        // A value the cell does not hold yet, however often this runs.
                        let new_amount = match row.fields.get(&funnelsync::deal::Field::Amount) {
                            Some(funnelsync::deal::FieldValue::Amount(amount)) => amount + 1.0,
                            _ => 123_456.0,
                        };
                        merged.insert(
                            funnelsync::deal::Field::Amount,
                            funnelsync::deal::FieldValue::Amount(new_amount),
                        );
                    }
                    funnelsync::writeback::RowOutcome {
                        row_number: row.row_number,
                        deal_id: row.id,
                        read: row.fields.clone(),
                        merged: Some(merged),
                        extras: row.extras.clone(),
                        merged_extras: None,
                        key_cell: row.id,
                    }
                })
                .collect();
            let view = store
                .crm()
                .list_deals(&funnelsync::store::DealFilter::default())
                .expect("deals");
            let n_columns = sheet.rows.iter().map(|row| row.width()).max().unwrap_or(0);
            let plan = funnelsync::writeback::plan(&header, n_columns, &outcomes, &view);
            let n_overrides: usize = plan.rows.iter().map(|row| row.overrides.len()).sum();
            assert_eq!(n_overrides, 1, "exactly one cell changes");
            drop(rows);
            drop(view);
            // The figure is the write's own peak: the preparation's is forgotten (Linux resets
            // VmHWM when 5 is written to clear_refs).
            let _ = std::fs::write("/proc/self/clear_refs", "5");
            let resident_before = status_kb("VmRSS:");
            let started = Instant::now();
            funnelsync::writeback::write(&sheet, &plan, &[], 0).expect("write");
            // The memory the write itself added: the plan and the rows as read are the sync's.
            println!(
                "{} {}",
                started.elapsed().as_secs_f64(),
                peak_kb().saturating_sub(resident_before)
            );
            return;
        }
        "one-cell-write-back" => {
            // The store changed one deal's amount (as `deals set` does); the sync reads the file
            // and writes that one cell back in place. Timed together.
            use funnelsync::store::CrmStore;
            let config = config_for(folder, file, true);
            {
                let mut store = Store::open(&config.store).expect("store");
                let transaction = store.transaction().expect("transaction");
                let crm = &*transaction;
                let deal_id = i64::from(n_rows / 2);
                let amount = crm
                    .deals_by_ids(&[deal_id])
                    .expect("deal")
                    .get(&deal_id)
                    .and_then(|deal| deal.fields.get(&funnelsync::deal::Field::Amount).cloned());
                let new_amount = match amount {
                    Some(funnelsync::deal::FieldValue::Amount(amount)) => amount + 1.0,
                    _ => 123_456.0,
                };
                crm.update_deal(
                    deal_id,
                    &[(
                        funnelsync::deal::Field::Amount,
                        Some(funnelsync::deal::FieldValue::Amount(new_amount)),
                    )],
                    &[],
                    "cli",
                    chrono::Utc::now(),
                )
                .expect("update");
                transaction.commit().expect("commit");
            }
            let started = Instant::now();
            let (report, store) = sync_once(folder, file, true);
            let seconds = started.elapsed().as_secs_f64();
            kept_store = Some(store);
            assert_eq!(
                report.write_back,
                sync::WriteBack::Written,
                "{:?}",
                report.error
            );
            assert_eq!(report.counts.created + report.counts.updated, 0);
            println!("{seconds} {}", peak_kb());
            close_store(kept_store);
            return;
        }
        // What SQLite alone needs to store an import the way funnelsync stores it: the same
        // deals, stage history, change records and mirror rows, built beforehand, written in one
        // transaction through the same batched statements.
        "schema-floor" => {
            let config = config_for(folder, file, false);
            let mut store = Store::open(&config.store).expect("store");
            let rows = floor_rows(n_rows);
            let started = Instant::now();
            store_as_funnelsync(&mut store, &sync::file_key(&path), &rows);
            println!("{} {}", started.elapsed().as_secs_f64(), peak_kb());
            return;
        }
        // The reading stage alone: the file streamed through funnelsync's reader (limits, guard,
        // rows), nothing else.
        "stream" => {
            let config = config_for(folder, file, false);
            read_through_reader(&path, &config, n_rows);
        }
        // The least any sync of the sheet reads: calamine streaming every cell as funnelsync's
        // reader gets them, through the guard (the zip's parts checked, the sheet inflated and
        // scanned on the other core), with nothing made of the cells.
        "guarded-floor" => {
            let limits = config_for(folder, file, false).limits;
            let n_cells =
                funnelsync::workbook::count_guarded_cells(&path, &limits).expect("guarded read");
            assert!(n_cells >= u64::from(n_rows) * 12);
        }
        // The two floors at once, as an import overlaps them: the reader streams the file on its
        // threads while SQLite stores the (prebuilt) import on this one. No import that reads
        // through this reader and stores this schema can be faster on this machine.
        "overlap-floor" => {
            let config = config_for(folder, file, false);
            let mut store = Store::open(&config.store).expect("store");
            let rows = floor_rows(n_rows);
            let file_key = sync::file_key(&path);
            let started = Instant::now();
            std::thread::scope(|scope| {
                let reading = scope.spawn(|| read_through_reader(&path, &config, n_rows));
                store_as_funnelsync(&mut store, &file_key, &rows);
                reading.join().expect("reader");
            });
            println!("{} {}", started.elapsed().as_secs_f64(), peak_kb());
            return;
        }
        // The XML guard alone, over the sheet's XML already inflated into memory: what the
        // guard's thread spends beside calamine's.
        "guard" => {
            let config = config_for(folder, file, false);
            let mut archive =
                zip::ZipArchive::new(std::fs::File::open(&path).expect("open")).expect("zip");
            let mut xml = Vec::new();
            std::io::Read::read_to_end(
                &mut archive.by_name("xl/worksheets/sheet1.xml").expect("sheet"),
                &mut xml,
            )
            .expect("inflate");
            let bounds =
                funnelsync::workbook::xml_guard::Bounds::for_cells(config.limits.max_cell_chars);
            let started = Instant::now();
            funnelsync::workbook::xml_guard::check_part(
                "xl/worksheets/sheet1.xml",
                xml.as_slice(),
                bounds,
            )
            .expect("the guard passes the sheet");
            println!("{} {}", started.elapsed().as_secs_f64(), peak_kb());
            return;
        }
        // For profiling by hand: (re)write the workbook, unchanged or with one cell changed.
        "generate" => {
            generate(&path, n_rows, None);
        }
        "generate-changed" => {
            generate(&path, n_rows, Some(n_rows / 2));
        }
        "xlsxwriter" => {
            generate(&folder.join("alone.xlsx"), n_rows, None);
        }
        "poll" => {
            let text =
                "[store]\npath = \"crm.db\"\n\n[[sources]]\nname = \"many\"\npath = \"many\"\n";
            let config_path = folder.join("poll.toml");
            std::fs::write(&config_path, text).expect("config");
            let config = Config::load(&config_path).expect("config");
            let started = Instant::now();
            let files = funnelsync::watch::source_files(&config, &config.sources[0]).expect("list");
            let fingerprints: Vec<_> = files
                .iter()
                .map(|file| funnelsync::watch::fingerprint(file))
                .collect();
            assert_eq!(
                fingerprints
                    .iter()
                    .filter(|fingerprint| fingerprint.is_some())
                    .count(),
                1000
            );
            println!("{} {}", started.elapsed().as_secs_f64(), peak_kb());
            return;
        }
        other => panic!("unknown phase {other}"),
    }
    println!("{} {}", started.elapsed().as_secs_f64(), peak_kb());
    close_store(kept_store);
}

/// The rows the schema floor stores: the bench workbook's values, as cleaned rows.
fn floor_rows(n_rows: u32) -> Vec<(funnelsync::deal::FieldMap, funnelsync::deal::ExtraMap)> {
    (1..=n_rows)
        .map(|row| {
            let mut fields = funnelsync::deal::FieldMap::new();
            let text = |column: usize| funnelsync::deal::FieldValue::Text(cell(row, column, None));
            fields.insert(funnelsync::deal::Field::Company, text(0));
            fields.insert(funnelsync::deal::Field::Contact, text(1));
            fields.insert(funnelsync::deal::Field::Email, text(2));
            fields.insert(funnelsync::deal::Field::Phone, text(3));
            fields.insert(funnelsync::deal::Field::Stage, text(4));
            fields.insert(
                funnelsync::deal::Field::Amount,
                funnelsync::deal::FieldValue::Amount(f64::from(1000 + row % 50_000)),
            );
            fields.insert(funnelsync::deal::Field::Owner, text(6));
            fields.insert(funnelsync::deal::Field::NextStep, text(7));
            fields.insert(funnelsync::deal::Field::LastContact, text(8));
            fields.insert(funnelsync::deal::Field::ExpectedClose, text(9));
            let mut extras = funnelsync::deal::ExtraMap::new();
            extras.insert("Region".to_string(), cell(row, 10, None));
            extras.insert("Notes".to_string(), cell(row, 11, None));
            (fields, extras)
        })
        .collect()
}

/// Stores prebuilt rows as a first import does: deals, stage history, change records and mirror
/// rows, batch by batch, in one transaction.
fn store_as_funnelsync(
    store: &mut Store,
    file_key: &str,
    rows: &[(funnelsync::deal::FieldMap, funnelsync::deal::ExtraMap)],
) {
    use funnelsync::store::CrmStore;
    let now = chrono::Utc::now();
    let file_key = file_key.to_string();
    let transaction = store.transaction().expect("transaction");
    let crm = &*transaction;
    funnelsync::store::mirror::save_head(
        &transaction,
        &funnelsync::store::mirror::MirrorHead {
            file: file_key.clone(),
            source: "bench".into(),
            sheet: "Pipeline".into(),
            content_hash: String::new(),
            header_row: 1,
            headers: Vec::new(),
            synced_at: now,
            config_hash: String::new(),
            store_version: None,
            synced_version: None,
            shown_version: None,
            known_error_rows: Vec::new(),
        },
    )
    .expect("head");
    let mut changes = Vec::with_capacity(rows.len());
    for (chunk_idx, chunk) in rows.chunks(2048).enumerate() {
        // As the sync does, each row is encoded once, as it is hashed.
        let hashes: Vec<(String, Option<funnelsync::deal::RowJson>)> = chunk
            .iter()
            .map(|(fields, extras)| funnelsync::deal::encode_row(fields, extras))
            .collect();
        let new: Vec<funnelsync::store::NewDeal<'_>> = chunk
            .iter()
            .zip(&hashes)
            .map(|((fields, extras), (_, json))| funnelsync::store::NewDeal {
                fields,
                extra: extras,
                extra_json: json.as_ref().map(|json| json.extras.as_str()),
                origin: "bench",
                now,
                stage_entered_at: None,
            })
            .collect();
        let ids = crm.create_deals(&new).expect("deals");
        let mirror_rows: Vec<funnelsync::store::mirror::MirrorRowRef<'_>> = chunk
            .iter()
            .zip(&ids)
            .zip(&hashes)
            .enumerate()
            .map(|(offset, (((fields, extras), id), (hash, json)))| {
                changes.push(funnelsync::store::ChangeRecord {
                    id: 0,
                    run_id: 0,
                    deal_id: *id,
                    kind: funnelsync::store::ChangeKind::Create,
                    field: None,
                    old_value: None,
                    new_value: json.as_ref().map(|json| json.fields.clone()),
                });
                // As the sync does, the mirror row borrows the row's values.
                funnelsync::store::mirror::MirrorRowRef {
                    deal_id: *id,
                    row_number: (chunk_idx * 2048 + offset + 2) as u32,
                    row_hash: hash,
                    raw_hash: Some(*id),
                    fields,
                    extras,
                    json: json.as_ref(),
                    fields_as_created: json.is_some(),
                }
            })
            .collect();
        funnelsync::store::mirror::upsert_row_refs(&transaction, &file_key, &mirror_rows)
            .expect("mirror");
    }
    let run_id = crm
        .record_run(&funnelsync::store::SyncRun {
            id: 0,
            source: "bench".into(),
            file: file_key,
            started_at: now,
            finished_at: now,
            status: "synced".into(),
            counts: Default::default(),
            message: None,
        })
        .expect("run");
    crm.record_changes(run_id, &changes).expect("changes");
    transaction.commit().expect("commit");
}

/// Streams the file through funnelsync's reader (limits, guard, rows) and drops the rows.
fn read_through_reader(path: &Path, config: &Config, n_rows_total: u32) {
    let opened = funnelsync::workbook::open_file(path, &config.limits).expect("open");
    let mut stream = funnelsync::workbook::SheetStream::start(
        opened,
        None,
        config.sources[0].encoding,
        &config.limits,
    )
    .expect("stream");
    let mut n_rows = 0usize;
    while let Some(rows) = stream.next_rows().expect("rows") {
        n_rows += rows.len();
    }
    assert!(n_rows as u32 >= n_rows_total);
}

fn child(phase: &str, folder: &Path, n_rows: u32) -> (f64, u64) {
    let store_url = POSTGRES_STORE
        .lock()
        .map(|url| url.clone())
        .unwrap_or_default()
        .unwrap_or_default();
    let output = Command::new(std::env::current_exe().expect("exe"))
        .env("FUNNELSYNC_BENCH_STORE_URL", store_url)
        .args(["--phase", phase, "--folder"])
        .arg(folder)
        .args(["--rows", &n_rows.to_string()])
        .output()
        .expect("run phase");
    assert!(
        output.status.success(),
        "{phase}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let mut parts = text.split_whitespace();
    let seconds = parts
        .next()
        .and_then(|text| text.parse().ok())
        .unwrap_or(f64::NAN);
    let peak = parts.next().and_then(|text| text.parse().ok()).unwrap_or(0);
    (seconds, peak)
}

/// A phase's median time and largest peak memory, and the baseline time its ratio is taken to:
/// each run of the phase follows a run of the baseline, and the ratio is the median of the
/// pairs' ratios. This machine's speed drifts (the baseline alone has ranged 0.9–1.9 s at
/// 100,000 rows within minutes), so a ratio to a baseline measured minutes earlier says more
/// about the drift than about the phase.
fn measure_paired(
    phase: &str,
    folder: &Path,
    n_rows: u32,
    before_each: &dyn Fn(),
) -> ((f64, u64), f64) {
    let n_pairs = PAIRS.load(std::sync::atomic::Ordering::Relaxed).max(1);
    let mut times = Vec::new();
    let mut ratios = Vec::new();
    let mut peak = 0;
    for _ in 0..n_pairs {
        before_each();
        let (base_seconds, _) = child("baseline", folder, n_rows);
        let (seconds, kb) = child(phase, folder, n_rows);
        times.push(seconds);
        ratios.push(seconds / base_seconds);
        peak = peak.max(kb);
    }
    times.sort_by(|left, right| left.total_cmp(right));
    ratios.sort_by(|left, right| left.total_cmp(right));
    if let Ok(mut spread) = LAST_SPREAD.lock() {
        *spread = Some((ratios[0], ratios[n_pairs - 1]));
    }
    let middle = n_pairs / 2;
    ((times[middle], peak), times[middle] / ratios[middle])
}

/// The median of three runs of a phase (time), with the largest peak memory.
fn measure(phase: &str, folder: &Path, n_rows: u32, before_each: &dyn Fn()) -> (f64, u64) {
    let mut times = Vec::new();
    let mut peak = 0;
    for _ in 0..3 {
        before_each();
        let (seconds, kb) = child(phase, folder, n_rows);
        times.push(seconds);
        peak = peak.max(kb);
    }
    times.sort_by(|left, right| left.total_cmp(right));
    (times[1], peak)
}

/// The pandas + python-calamine script the import is compared with: read the workbook into a
/// DataFrame and `to_sql` it into SQLite.
const PANDAS_PEER: &str = r#"
import sys, sqlite3, pandas
frame = pandas.read_excel(sys.argv[1], engine="calamine")
connection = sqlite3.connect(sys.argv[2])
frame.to_sql("deals", connection, if_exists="replace", index=False)
connection.commit()
"#;

/// Times the pandas peer on the workbook, or says why it cannot.
fn pandas_peer(dir: &Path) -> Result<f64, String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let check = Command::new(&python)
        .args(["-c", "import pandas, python_calamine"])
        .output()
        .map_err(|error| format!("{python}: {error}"))?;
    if !check.status.success() {
        return Err("pandas or python-calamine is not installed".to_string());
    }
    let mut times = Vec::new();
    for _ in 0..3 {
        times.push(pandas_peer_once(dir)?);
    }
    times.sort_by(|left, right| left.total_cmp(right));
    Ok(times[1])
}

/// One run of the pandas peer, timed.
fn pandas_peer_once(dir: &Path) -> Result<f64, String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let _ = std::fs::remove_file(dir.join("peer.db"));
    let started = Instant::now();
    let output = Command::new(&python)
        .args(["-c", PANDAS_PEER])
        .arg(dir.join("pipeline.xlsx"))
        .arg(dir.join("peer.db"))
        .output()
        .map_err(|error| error.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The daemon's latency: with `funnelsync run` watching a 10,000-row file (and a master file that
/// shows every deal), the time from an Excel-style save of one changed cell until the store has
/// the new value, and until the master file shows it. Needs the release binary beside this one.
fn daemon_latency(settle: &str) -> Result<(f64, f64), String> {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.parent()?
                .parent()
                .map(|folder| folder.join("funnelsync"))
        })
        .filter(|binary| binary.exists())
        .ok_or("build the binary first: cargo build --release")?;
    let folder = tempfile::tempdir().map_err(|error| error.to_string())?;
    let dir = folder.path();
    let share = dir.join("share");
    std::fs::create_dir_all(&share).map_err(|error| error.to_string())?;
    let n_rows = 10_000;
    generate(&share.join("team.xlsx"), n_rows, None);
    // The master file starts with just a header: the daemon fills it with every deal.
    let mut master = rust_xlsxwriter::Workbook::new();
    let sheet = master.add_worksheet();
    sheet
        .set_name("Pipeline")
        .map_err(|error| error.to_string())?;
    for (column, header) in COLUMNS.iter().enumerate() {
        sheet
            .write_string(0, column as u16, *header)
            .map_err(|error| error.to_string())?;
    }
    master
        .save(share.join("master.xlsx"))
        .map_err(|error| error.to_string())?;
    let config = dir.join("funnelsync.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\npath = \"crm.db\"\n\n[watch]\nsettle = \"{settle}\"\n\n[[sources]]\nname = \"team\"\npath = \"share/team.xlsx\"\nmax_delete = \"100%\"\n\n[[sources]]\nname = \"master\"\npath = \"share/master.xlsx\"\nview = \"all\"\n\n[limits]\nmax_rows = 2000000\n"
        ),
    )
    .map_err(|error| error.to_string())?;
    let mut daemon = Command::new(&binary)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|error| error.to_string())?;
    let store_amount = |company: &str| -> Option<f64> {
        let connection = rusqlite::Connection::open(dir.join("crm.db")).ok()?;
        connection
            .query_row(
                "SELECT amount FROM deals WHERE company = ?1",
                [company],
                |row| row.get(0),
            )
            .ok()
    };
    let master_amount = |company: &str| -> Option<String> {
        use calamine::Reader;
        let mut workbook: calamine::Xlsx<_> =
            calamine::open_workbook(share.join("master.xlsx")).ok()?;
        let range = workbook.worksheet_range("Pipeline").ok()?;
        range
            .rows()
            .find(|row| row.first().is_some_and(|cell| *cell == company))
            .and_then(|row| row.get(5).map(|cell| cell.to_string()))
    };
    let wait = |what: &dyn Fn() -> bool, limit: f64| -> Option<f64> {
        let started = Instant::now();
        while started.elapsed().as_secs_f64() < limit {
            if what() {
                return Some(started.elapsed().as_secs_f64());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    };
    let changed_company = format!("Company {}", n_rows / 2);
    let result = (|| {
        wait(&|| master_amount(&changed_company).is_some(), 120.0)
            .ok_or("the daemon did not fill the master file")?;
        // Excel's save: a temp file, then a rename over the original.
        let temp = share.join("9A8B7C6D");
        generate(&temp, n_rows, Some(n_rows / 2));
        let saved = Instant::now();
        std::fs::rename(&temp, share.join("team.xlsx")).map_err(|error| error.to_string())?;
        wait(&|| store_amount(&changed_company) == Some(999_999.0), 60.0)
            .ok_or("the store did not get the change")?;
        let in_store = saved.elapsed().as_secs_f64();
        wait(
            &|| master_amount(&changed_company).as_deref() == Some("999999"),
            60.0,
        )
        .ok_or("the master file did not get the change")?;
        Ok((in_store, saved.elapsed().as_secs_f64()))
    })();
    let _ = daemon.kill();
    let _ = daemon.wait();
    result
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|arg| arg == flag)
            .and_then(|index| args.get(index + 1))
            .cloned()
    };
    let n_rows: u32 = value("--rows")
        .and_then(|rows| rows.parse::<u32>().ok())
        .unwrap_or(100_000)
        .min(EXCEL_MAX_DATA_ROWS);
    if let Some(phase) = value("--phase") {
        let folder = PathBuf::from(value("--folder").expect("--folder"));
        run_phase(&phase, &folder, n_rows);
        return;
    }
    if let Some(n_pairs) = value("--pairs").and_then(|text| text.parse::<usize>().ok()) {
        PAIRS.store(n_pairs.max(1) | 1, std::sync::atomic::Ordering::Relaxed);
    }
    // `--only a,b` runs only those figures (the baseline always runs).
    let only: Option<Vec<String>> =
        value("--only").map(|list| list.split(',').map(str::to_string).collect());
    let wanted = |name: &str| {
        only.as_ref()
            .is_none_or(|only| only.iter().any(|item| item == name))
    };

    // `--postgres URL` (a server's maintenance database, as tests/run's
    // FUNNELSYNC_TEST_POSTGRES) adds a PostgreSQL column: import, one-cell change and unchanged
    // file again with the store in a database there, as ratios to the SQLite figures.
    let postgres_server = value("--postgres")
        .or_else(|| std::env::var("FUNNELSYNC_BENCH_POSTGRES").ok())
        .or_else(|| std::env::var("FUNNELSYNC_TEST_POSTGRES").ok())
        .filter(|url| !url.is_empty());
    let postgres = match postgres_server.as_deref().map(PostgresBench::new) {
        Some(Ok(bench)) => Some(bench),
        Some(Err(why)) => {
            println!("PostgreSQL column: not measured ({why})");
            None
        }
        None => {
            println!("PostgreSQL column: not measured (give --postgres postgresql://USER@HOST:PORT/postgres)");
            None
        }
    };
    let on_postgres = |measure_it: &dyn Fn() -> (f64, u64)| -> Option<(f64, u64)> {
        let bench = postgres.as_ref()?;
        *POSTGRES_STORE.lock().expect("store lock") = Some(bench.url.clone());
        let figure = measure_it();
        *POSTGRES_STORE.lock().expect("store lock") = None;
        Some(figure)
    };
    let postgres_line = |name: &str, figure: Option<(f64, u64)>, sqlite: (f64, u64)| {
        if let Some((seconds, kb)) = figure {
            println!(
                "  {:<58} {seconds:>9.3} {:>7.2}× {:>9.1}   (ratio to SQLite's figure above)",
                format!("  on PostgreSQL: {name}"),
                seconds / sqlite.0,
                kb as f64 / 1024.0
            );
        }
    };

    println!(
        "funnelsync benchmark ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let sizes: std::collections::BTreeSet<u32> = match value("--sizes") {
        // A sheet holds at most 1,048,576 rows, the header among them: `--sizes 1048576` means a
        // full sheet.
        Some(list) => list
            .split(',')
            .filter_map(|size| size.parse::<u32>().ok())
            .map(|size| size.min(EXCEL_MAX_DATA_ROWS))
            .collect(),
        None => [10_000u32.min(n_rows), n_rows].into_iter().collect(),
    };
    for size in sizes {
        let folder = tempfile::tempdir().expect("temp dir");
        // `--keep DIR` leaves the files of the last size there, for profiling a phase by hand.
        let kept = value("--keep").map(PathBuf::from);
        if let Some(kept) = &kept {
            std::fs::create_dir_all(kept).expect("keep folder");
        }
        let dir = kept.as_deref().unwrap_or(folder.path());
        let path = dir.join("pipeline.xlsx");
        generate(&path, size, None);
        let store = dir.join("crm.db");
        let reset_store = || {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", store.display()));
            }
        };
        println!(
            "\n{size} rows × 12 columns ({:.1} MB file)",
            std::fs::metadata(&path)
                .map(|m| m.len() as f64 / 1e6)
                .unwrap_or(0.0)
        );
        println!(
            "  {:<58} {:>9} {:>8} {:>9}",
            "phase", "seconds", "ratio", "peak MB"
        );
        let (baseline, baseline_kb) = measure("baseline", dir, size, &|| {});
        let line = |name: &str, (seconds, kb): (f64, u64), base: f64, target: &str| {
            // A paired figure also shows how far its pairs' ratios spread.
            let spread = LAST_SPREAD
                .lock()
                .ok()
                .and_then(|mut spread| spread.take())
                .map(|(lowest, highest)| format!("   [pairs {lowest:.2}–{highest:.2}×]"))
                .unwrap_or_default();
            println!(
                "  {name:<58} {seconds:>9.3} {:>7.2}× {:>9.1}   {target}{spread}",
                seconds / base,
                kb as f64 / 1024.0
            );
        };
        line(
            "baseline: calamine streaming every cell",
            (baseline, baseline_kb),
            baseline,
            "",
        );
        if wanted("stream") {
            let (stream, stream_base) = measure_paired("stream", dir, size, &|| {});
            line(
                "floor: funnelsync's reader alone (limits, XML guard, rows)",
                stream,
                stream_base,
                "",
            );
        }
        if wanted("guarded-floor") {
            let (floor, floor_base) = measure_paired("guarded-floor", dir, size, &|| {});
            line(
                "floor: calamine through the guard (zip and XML checks)",
                floor,
                floor_base,
                "",
            );
        }
        if wanted("guard") {
            let (guard, guard_base) = measure_paired("guard", dir, size, &|| {});
            line(
                "  of which the XML guard's thread (the sheet's XML, inflated)",
                guard,
                guard_base,
                "",
            );
        }
        if wanted("schema-floor") {
            let (floor, floor_base) = measure_paired("schema-floor", dir, size, &|| reset_store());
            line(
                "floor: SQLite storing an import as funnelsync stores it",
                floor,
                floor_base,
                "",
            );
        }
        if wanted("overlap-floor") {
            let (floor, floor_base) = measure_paired("overlap-floor", dir, size, &|| reset_store());
            line(
                "floor: the two above at once, on the two cores",
                floor,
                floor_base,
                "",
            );
        }
        if wanted("import") {
            let (import, import_base) = measure_paired("import", dir, size, &|| reset_store());
            line(
                "first import into an empty store",
                import,
                import_base,
                "target ≤ 2.0×, ≤ 50 MB",
            );
            let import_on_postgres = on_postgres(&|| {
                measure("import", dir, size, &|| {
                    if let Some(bench) = &postgres {
                        bench.reset().expect("reset the PostgreSQL database");
                    }
                })
            });
            postgres_line("first import", import_on_postgres, import);
        }
        if wanted("peer") {
            match pandas_peer(dir) {
                Ok(seconds) => {
                    line(
                        "peer: pandas (python-calamine) read + to_sql",
                        (seconds, 0),
                        baseline,
                        "",
                    );
                    if wanted("import") {
                        // The peer's runs and the import's are minutes apart: both are measured
                        // once more, back to back, for this comparison.
                        reset_store();
                        let (import_seconds, _) = child("import", dir, size);
                        let peer_seconds = pandas_peer_once(dir).unwrap_or(seconds);
                        println!(
                            "  {:<58} {:>9.3} {:>7.2}× faster than the peer ({peer_seconds:.3} s)   target ≥ 2×",
                            "first import, back to back with the peer",
                            import_seconds,
                            peer_seconds / import_seconds
                        );
                    }
                }
                Err(why) => {
                    println!("  peer: pandas + python-calamine: peer not available ({why})")
                }
            }
        }
        // The SQLite figures the PostgreSQL column is compared with; it is measured after them,
        // so that its writes of the workbook do not change what SQLite's phases find.
        let mut one_cell_figure = None;
        let mut unchanged_figure = None;
        if wanted("one-cell") {
            let (one_cell, one_cell_base) = measure_paired("one-cell", dir, size, &|| {
                reset_store();
                generate(&path, size, None);
                let _ = child("import", dir, size);
                generate(&path, size, Some(size / 2));
            });
            line(
                "sync after one cell changed",
                one_cell,
                one_cell_base,
                "target ≤ 1.2×",
            );
            one_cell_figure = Some(one_cell);
        }
        if wanted("unchanged") {
            let (unchanged, unchanged_base) = measure_paired("unchanged", dir, size, &|| {
                // Same content, new modification time.
                let bytes = std::fs::read(&path).expect("read");
                std::fs::write(&path, bytes).expect("touch");
            });
            line(
                "sync of an unchanged file (mtime touched)",
                unchanged,
                unchanged_base,
                "target ≤ 0.1×",
            );
            unchanged_figure = Some(unchanged);
        }
        if postgres.is_some() && (one_cell_figure.is_some() || unchanged_figure.is_some()) {
            let reset_postgres = || {
                if let Some(bench) = &postgres {
                    bench.reset().expect("reset the PostgreSQL database");
                }
            };
            // One cell changed after an import; then the same file again, touched.
            let one_cell = on_postgres(&|| {
                measure("one-cell", dir, size, &|| {
                    reset_postgres();
                    generate(&path, size, None);
                    let _ = child("import", dir, size);
                    generate(&path, size, Some(size / 2));
                })
            });
            if let Some(sqlite) = one_cell_figure {
                postgres_line("sync after one cell changed", one_cell, sqlite);
            }
            let unchanged = on_postgres(&|| {
                measure("unchanged", dir, size, &|| {
                    let bytes = std::fs::read(&path).expect("read");
                    std::fs::write(&path, bytes).expect("touch");
                })
            });
            if let Some(sqlite) = unchanged_figure {
                postgres_line("sync of an unchanged file", unchanged, sqlite);
            }
        }
        if wanted("write-one-cell") || wanted("one-cell-write-back") {
            reset_store();
            generate(&path, size, None);
            let _ = child("import-write-back", dir, size);
            let (write_one_cell, write_one_cell_base) =
                measure_paired("write-one-cell", dir, size, &|| {});
            line(
                "write-back of one changed cell, in place (the write)",
                write_one_cell,
                write_one_cell_base,
                "target ≤ 1.2×",
            );
            println!(
                "  {:<58} memory the in-place write adds: {:.1} MB ({:.2}× the baseline's peak; target ≤ 2×)",
                "",
                write_one_cell.1 as f64 / 1024.0,
                write_one_cell.1 as f64 / baseline_kb.max(1) as f64
            );
            // The in-place writes above changed the file behind the store's back: start again.
            reset_store();
            generate(&path, size, None);
            let _ = child("import-write-back", dir, size);
            let (together, together_base) =
                measure_paired("one-cell-write-back", dir, size, &|| {});
            line(
                "one cell changed in the store: sync and write together",
                together,
                together_base,
                "target ≤ 2.5×",
            );
        }
        if wanted("write-back") {
            let write_back = measure("write-back", dir, size, &|| {
                reset_store();
                generate(&path, size, None);
                let _ = child("import", dir, size);
            });
            let alone = measure("xlsxwriter", dir, size, &|| {});
            line(
                "first write of every CRM ID (the write) vs rust_xlsxwriter",
                write_back,
                alone.0,
                "",
            );
            line(
                "rust_xlsxwriter alone writing the same cells",
                alone,
                alone.0,
                "",
            );
        }
    }

    if wanted("daemon") {
        for settle in ["1s", "2s"] {
            match daemon_latency(settle) {
                Ok((in_store, in_master)) => println!(
                    "\ndaemon, settle = \"{settle}\", 10,000-row file: Excel-style save → store {in_store:.2} s, → master file written back {in_master:.2} s"
                ),
                Err(why) => println!("\ndaemon latency: not measured ({why})"),
            }
        }
    }

    if wanted("poll") {
        // One poll pass over 1,000 unchanged files.
        let folder = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(folder.path().join("many")).expect("folder");
        for index in 0..1000 {
            std::fs::write(
                folder.path().join(format!("many/file{index:04}.csv")),
                "Company,Stage\nAcme,Lead\n",
            )
            .expect("file");
        }
        let (seconds, _) = measure("poll", folder.path(), 0, &|| {});
        println!("\npoll pass over 1,000 unchanged files: {:.1} ms (one stat per file, no reads; target < 50 ms)", seconds * 1000.0);
    }
}
