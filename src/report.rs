//! The funnel as a sales manager reads it: loaded from the store ([`load`]), printed as a text
//! table ([`text_table`]), and written as an Excel workbook with native charts ([`workbook_bytes`],
//! [`write_file`]) — "Funnel" (table and bar chart, stages top to bottom), "Conversion" (rates and
//! a column chart), "Forecast", "By rep" and "Stalled".
//!
//! The numbers come from [`crate::funnel`]; this module only loads and presents them. Writing the
//! file is safe like write-back: never while the file is open, temp file and rename.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rust_xlsxwriter::{Chart, ChartType, Format, Workbook, Worksheet, XlsxError};

use crate::config::{Config, ReportConfig};
use crate::deal::normalize_label;
use crate::funnel::{compute, FunnelReport, Period};
use crate::mail::outbox::{self, DeliveryReport, MessageKind, OutboxError};
use crate::mail::Message;
use crate::remind::Calendar;
use crate::store::{CrmStore, DealFilter, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build the report: {0}")]
    Build(#[from] XlsxError),
    #[error("the weekly digest goes to [remind] manager, which is not set")]
    NoManager,
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("{path} is open in {program}; the report is written once it is closed")]
    Open {
        path: PathBuf,
        program: &'static str,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The period the configured report (`[report]`) covers at `now`: its `period_days` back.
pub fn configured_period(report: &ReportConfig, now: DateTime<Utc>) -> Period {
    Period {
        since: now - chrono::Duration::days(i64::from(report.period_days)),
        until: now,
    }
}

/// Writes the configured report (`[report]`) from the store as it is at `now`: the daemon's
/// refresh, and `sync` after a pass.
pub fn write_configured(
    store: &Store,
    config: &Config,
    report: &ReportConfig,
    now: DateTime<Utc>,
) -> Result<(), ReportError> {
    let funnel = load(store, config, configured_period(report, now), now, None)?;
    write_file(&report.path, &funnel)
}

/// Computes the funnel from the store for a period, optionally for one owner.
pub fn load(
    store: &Store,
    config: &Config,
    period: Period,
    now: DateTime<Utc>,
    owner: Option<&str>,
) -> Result<FunnelReport, StoreError> {
    load_from(&store.db(), config, period, now, owner)
}

fn load_from(
    crm: &crate::store::Db<'_>,
    config: &Config,
    period: Period,
    now: DateTime<Utc>,
    owner: Option<&str>,
) -> Result<FunnelReport, StoreError> {
    let mut deals = crm.list_deals(&DealFilter {
        include_archived: true,
        ..DealFilter::default()
    })?;
    if let Some(owner) = owner {
        let wanted = normalize_label(owner);
        deals.retain(|deal| {
            deal.text(crate::deal::Field::Owner)
                .is_some_and(|name| normalize_label(name) == wanted)
        });
    }
    let ids: std::collections::HashSet<_> = deals.iter().map(|deal| deal.id).collect();
    let mut history = crm.all_stage_history()?;
    history.retain(|change| ids.contains(&change.deal_id));
    let calendar = Calendar::of(config);
    Ok(compute(
        &deals,
        &history,
        &config.stages,
        &calendar,
        period,
        now,
        owner.map(str::to_string),
    ))
}

pub fn money(amount: f64) -> String {
    // An empty sum is -0.0; nobody wants to read "-0".
    crate::text::group_thousands(&format!("{:.0}", amount + 0.0))
}

pub fn percent(rate: Option<f64>) -> String {
    rate.map(|rate| format!("{:.0}%", rate * 100.0))
        .unwrap_or_else(|| "–".to_string())
}

pub fn days(value: Option<f64>) -> String {
    value
        .map(|value| format!("{value:.1}"))
        .unwrap_or_else(|| "–".to_string())
}

/// The funnel for a terminal: aligned columns, thousands separators, a bar per stage.
pub fn text_table(report: &FunnelReport) -> String {
    let mut out = format!(
        "Funnel {} → {}{}\n\n",
        report.period.since.format("%Y-%m-%d"),
        report.period.until.format("%Y-%m-%d"),
        report
            .owner
            .as_ref()
            .map(|owner| format!(" (owner: {owner})"))
            .unwrap_or_default()
    );
    let widest = report
        .stages
        .iter()
        .map(|stage| stage.open_count)
        .max()
        .unwrap_or(0)
        .max(1);
    let mut rows = vec![[
        "stage",
        "",
        "open",
        "amount",
        "weighted",
        "reached",
        "moved on",
        "won",
        "median days",
        "oldest",
        "stalled",
    ]
    .map(String::from)
    .to_vec()];
    for stage in &report.stages {
        let bar_width = (stage.open_count * 20).div_ceil(widest) as usize;
        rows.push(vec![
            stage.stage.clone(),
            "█".repeat(bar_width),
            stage.open_count.to_string(),
            money(stage.open_amount),
            money(stage.weighted_amount),
            stage.entered.to_string(),
            percent(stage.conversion_rate),
            percent(stage.win_rate),
            days(stage.median_days),
            stage
                .oldest_open_days
                .map(|days| format!("{days}d"))
                .unwrap_or_default(),
            stage.n_stalled.to_string(),
        ]);
    }
    let mut table = Vec::new();
    let _ = crate::text::write_table(
        &mut table,
        &rows,
        &[
            false, false, true, true, true, true, true, true, true, true, true,
        ],
    );
    out.push_str(&String::from_utf8_lossy(&table));
    let n_unknown_start: u64 = report
        .stages
        .iter()
        .map(|stage| stage.n_unknown_start)
        .sum();
    if n_unknown_start > 0 {
        out.push_str(&format!(
            "(median days leave out {n_unknown_start} visit(s) whose start is unknown: deals imported without a stage date)\n"
        ));
    }
    let totals = &report.totals;
    out.push_str(&format!(
        "\nwon: {} ({})   lost: {}   lead → won: {}   average days to won: {}\n",
        totals.won_count,
        money(totals.won_amount),
        totals.lost_count,
        percent(totals.lead_to_won_rate),
        days(totals.average_days_to_won)
    ));
    out.push_str(&format!(
        "forecast: weighted pipeline {}   history-based {}\n",
        money(report.forecast.weighted_pipeline),
        money(report.forecast.history_based)
    ));
    let closing: Vec<String> = report
        .forecast
        .deals
        .iter()
        .filter(|line| line.closes_in_period)
        .map(|line| {
            format!(
                "  {} ({}, {}, closes {})",
                line.company.as_deref().unwrap_or("?"),
                line.stage,
                money(line.amount),
                line.expected_close.as_deref().unwrap_or("")
            )
        })
        .collect();
    if !closing.is_empty() {
        out.push_str("expected to close in the period:\n");
        out.push_str(&closing.join("\n"));
        out.push('\n');
    }
    out
}

fn write_row(
    sheet: &mut Worksheet,
    row: u32,
    cells: &[Cell<'_>],
    formats: &Formats,
) -> Result<(), XlsxError> {
    for (column, cell) in cells.iter().enumerate() {
        let column = column as u16;
        match cell {
            Cell::Text(text) => {
                sheet.write_string(row, column, *text)?;
            }
            Cell::Header(text) => {
                sheet.write_string_with_format(row, column, *text, &formats.header)?;
            }
            Cell::Count(value) => {
                sheet.write_number(row, column, *value as f64)?;
            }
            Cell::Money(value) => {
                sheet.write_number_with_format(row, column, *value, &formats.money)?;
            }
            Cell::Rate(Some(value)) => {
                sheet.write_number_with_format(row, column, *value, &formats.percent)?;
            }
            Cell::Days(Some(value)) => {
                sheet.write_number_with_format(row, column, *value, &formats.days)?;
            }
            Cell::Rate(None) | Cell::Days(None) => {}
        }
    }
    Ok(())
}

enum Cell<'a> {
    Text(&'a str),
    Header(&'a str),
    Count(u64),
    Money(f64),
    Rate(Option<f64>),
    Days(Option<f64>),
}

struct Formats {
    header: Format,
    money: Format,
    percent: Format,
    days: Format,
}

/// The report workbook's bytes: one sheet each for the funnel, conversion, the forecast, the
/// reps and the stalled deals.
pub fn workbook_bytes(report: &FunnelReport) -> Result<Vec<u8>, XlsxError> {
    let formats = Formats {
        header: Format::new().set_bold(),
        money: Format::new().set_num_format("#,##0"),
        percent: Format::new().set_num_format("0%"),
        days: Format::new().set_num_format("0.0"),
    };
    let mut workbook = Workbook::new();
    funnel_sheet(workbook.add_worksheet(), report, &formats)?;
    conversion_sheet(workbook.add_worksheet(), report, &formats)?;
    forecast_sheet(workbook.add_worksheet(), report, &formats)?;
    by_rep_sheet(workbook.add_worksheet(), report, &formats)?;
    stalled_sheet(workbook.add_worksheet(), report, &formats)?;
    workbook.save_to_buffer()
}

/// "Funnel": the per-stage table, the totals below it and a bar chart, stages top to bottom.
fn funnel_sheet(
    sheet: &mut Worksheet,
    report: &FunnelReport,
    formats: &Formats,
) -> Result<(), XlsxError> {
    let n_stages = report.stages.len() as u32;
    sheet.set_name("Funnel")?;
    let title = format!(
        "Funnel {} to {}{}",
        report.period.since.format("%Y-%m-%d"),
        report.period.until.format("%Y-%m-%d"),
        report
            .owner
            .as_ref()
            .map(|owner| format!(", owner {owner}"))
            .unwrap_or_default()
    );
    sheet.write_string_with_format(0, 0, &title, &formats.header)?;
    let headers = [
        "Stage",
        "Open deals",
        "Open amount",
        "Weighted amount",
        "Probability",
        "Reached in period",
        "Moved on",
        "Conversion",
        "Won",
        "Win rate",
        "Median days",
        "Mean days",
        "Oldest open (days)",
        "Stalled",
        "Visits with unknown start (not in the days)",
    ];
    write_row(sheet, 2, &headers.map(Cell::Header), formats)?;
    for (index, stage) in report.stages.iter().enumerate() {
        let row = 3 + index as u32;
        write_row(
            sheet,
            row,
            &[
                Cell::Text(&stage.stage),
                Cell::Count(stage.open_count),
                Cell::Money(stage.open_amount),
                Cell::Money(stage.weighted_amount),
                Cell::Rate(Some(stage.probability)),
                Cell::Count(stage.entered),
                Cell::Count(stage.converted),
                Cell::Rate(stage.conversion_rate),
                Cell::Count(stage.won),
                Cell::Rate(stage.win_rate),
                Cell::Days(stage.median_days),
                Cell::Days(stage.mean_days),
                Cell::Days(stage.oldest_open_days.map(|days| days as f64)),
                Cell::Count(stage.n_stalled),
                Cell::Count(stage.n_unknown_start),
            ],
            formats,
        )?;
    }
    let totals_row = 4 + n_stages;
    let totals = &report.totals;
    let total_lines = [
        vec![
            Cell::Header("Won"),
            Cell::Count(totals.won_count),
            Cell::Money(totals.won_amount),
        ],
        vec![Cell::Header("Lost"), Cell::Count(totals.lost_count)],
        vec![
            Cell::Header("Lead to won"),
            Cell::Rate(totals.lead_to_won_rate),
        ],
        vec![
            Cell::Header("Average days to won"),
            Cell::Days(totals.average_days_to_won),
        ],
        vec![
            Cell::Header("Weighted pipeline"),
            Cell::Money(report.forecast.weighted_pipeline),
        ],
        vec![
            Cell::Header("History-based forecast"),
            Cell::Money(report.forecast.history_based),
        ],
    ];
    for (offset, cells) in total_lines.iter().enumerate() {
        write_row(sheet, totals_row + offset as u32, cells, formats)?;
    }
    sheet.set_column_width(0, 22)?;
    for column in 1..headers.len() as u16 {
        sheet.set_column_width(column, 14)?;
    }
    if n_stages > 0 {
        let mut chart = Chart::new(ChartType::Bar);
        chart
            .add_series()
            .set_name("Reached in period")
            .set_categories(("Funnel", 3, 0, 2 + n_stages, 0))
            .set_values(("Funnel", 3, 5, 2 + n_stages, 5));
        chart.title().set_name("Sales funnel");
        // Bar charts draw the first category at the bottom; reversed, the funnel reads top down.
        chart.x_axis().set_reverse();
        chart.legend().set_hidden();
        sheet.insert_chart(totals_row + 8, 0, &chart)?;
    }
    Ok(())
}

/// "Conversion": the rates per stage and a column chart.
fn conversion_sheet(
    sheet: &mut Worksheet,
    report: &FunnelReport,
    formats: &Formats,
) -> Result<(), XlsxError> {
    let n_stages = report.stages.len() as u32;
    sheet.set_name("Conversion")?;
    write_row(
        sheet,
        0,
        &["Stage", "Conversion to a later stage", "Win rate"].map(Cell::Header),
        formats,
    )?;
    for (index, stage) in report.stages.iter().enumerate() {
        write_row(
            sheet,
            1 + index as u32,
            &[
                Cell::Text(&stage.stage),
                Cell::Rate(stage.conversion_rate),
                Cell::Rate(stage.win_rate),
            ],
            formats,
        )?;
    }
    sheet.set_column_width(0, 22)?;
    sheet.set_column_width(1, 26)?;
    sheet.set_column_width(2, 12)?;
    if n_stages > 0 {
        let mut chart = Chart::new(ChartType::Column);
        chart
            .add_series()
            .set_name("Conversion")
            .set_categories(("Conversion", 1, 0, n_stages, 0))
            .set_values(("Conversion", 1, 1, n_stages, 1));
        chart
            .add_series()
            .set_name("Win rate")
            .set_categories(("Conversion", 1, 0, n_stages, 0))
            .set_values(("Conversion", 1, 2, n_stages, 2));
        chart.title().set_name("Conversion by stage");
        chart.y_axis().set_num_format("0%");
        sheet.insert_chart(1, 4, &chart)?;
    }
    Ok(())
}

/// "Forecast": every open deal with its weighted and history-based amounts.
fn forecast_sheet(
    sheet: &mut Worksheet,
    report: &FunnelReport,
    formats: &Formats,
) -> Result<(), XlsxError> {
    sheet.set_name("Forecast")?;
    let forecast_headers = [
        "Company",
        "Owner",
        "Stage",
        "Amount",
        "Probability",
        "Weighted",
        "Historical win rate",
        "History-based",
        "Expected close",
        "Closes in period",
    ];
    write_row(sheet, 0, &forecast_headers.map(Cell::Header), formats)?;
    for (index, line) in report.forecast.deals.iter().enumerate() {
        let row = 1 + index as u32;
        write_row(
            sheet,
            row,
            &[
                Cell::Text(line.company.as_deref().unwrap_or("")),
                Cell::Text(line.owner.as_deref().unwrap_or("")),
                Cell::Text(&line.stage),
                Cell::Money(line.amount),
                Cell::Rate(Some(line.probability)),
                Cell::Money(line.weighted),
                Cell::Rate(line.historical_win_rate),
                Cell::Money(line.history_based),
                Cell::Text(line.expected_close.as_deref().unwrap_or("")),
                Cell::Text(if line.closes_in_period { "yes" } else { "" }),
            ],
            formats,
        )?;
    }
    for column in 0..forecast_headers.len() as u16 {
        sheet.set_column_width(column, if column < 2 { 24 } else { 15 })?;
    }
    Ok(())
}

/// "By rep": open deals, weighted pipeline, wins and stalled deals per owner.
fn by_rep_sheet(
    sheet: &mut Worksheet,
    report: &FunnelReport,
    formats: &Formats,
) -> Result<(), XlsxError> {
    sheet.set_name("By rep")?;
    write_row(
        sheet,
        0,
        &[
            "Owner",
            "Open deals",
            "Weighted pipeline",
            "Won",
            "Won amount",
            "Stalled",
        ]
        .map(Cell::Header),
        formats,
    )?;
    for (index, owner) in report.by_owner.iter().enumerate() {
        write_row(
            sheet,
            1 + index as u32,
            &[
                Cell::Text(if owner.owner.is_empty() {
                    "(no owner)"
                } else {
                    &owner.owner
                }),
                Cell::Count(owner.open_count),
                Cell::Money(owner.weighted_pipeline),
                Cell::Count(owner.won_count),
                Cell::Money(owner.won_amount),
                Cell::Count(owner.n_stalled),
            ],
            formats,
        )?;
    }
    sheet.set_column_width(0, 24)?;
    for column in 1..6 {
        sheet.set_column_width(column, 16)?;
    }
    Ok(())
}

/// "Stalled": the stalled deals, worst first, with why.
fn stalled_sheet(
    sheet: &mut Worksheet,
    report: &FunnelReport,
    formats: &Formats,
) -> Result<(), XlsxError> {
    sheet.set_name("Stalled")?;
    write_row(
        sheet,
        0,
        &["Company", "Owner", "Stage", "Amount", "Why"].map(Cell::Header),
        formats,
    )?;
    for (index, line) in report.stalled.iter().enumerate() {
        let row = 1 + index as u32;
        write_row(
            sheet,
            row,
            &[
                Cell::Text(line.company.as_deref().unwrap_or("")),
                Cell::Text(line.owner.as_deref().unwrap_or("")),
                Cell::Text(&line.stage),
            ],
            formats,
        )?;
        if let Some(amount) = line.amount {
            sheet.write_number_with_format(row, 3, amount, &formats.money)?;
        }
        sheet.write_string(row, 4, &line.reason)?;
    }
    sheet.set_column_width(0, 24)?;
    sheet.set_column_width(1, 16)?;
    sheet.set_column_width(4, 60)?;
    Ok(())
}

/// Writes the report to `path`: never while it is open in Excel or LibreOffice; through a temp
/// file in the same folder, renamed into place.
pub fn write_file(path: &Path, report: &FunnelReport) -> Result<(), ReportError> {
    if let Some((program, _)) = crate::watch::open_by(path) {
        return Err(ReportError::Open {
            path: path.to_path_buf(),
            program,
        });
    }
    let bytes = workbook_bytes(report)?;
    let io_error = |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let folder = path
        .parent()
        .filter(|folder| !folder.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder).map_err(io_error)?;
    let mut temp = tempfile::Builder::new()
        .prefix(".~funnelsync-")
        .suffix(".tmp")
        .tempfile_in(folder)
        .map_err(io_error)?;
    std::io::Write::write_all(&mut temp, &bytes).map_err(io_error)?;
    // The report is for people on the share: keep the old file's permissions, or make a new one
    // readable (the daemon's own umask is strict).
    // Never the mode of what a link points to, and never set-user-ID or set-group-ID bits.
    let permissions = match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_file() => std::os::unix::fs::PermissionsExt::from_mode(
            std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o777,
        ),
        _ => std::os::unix::fs::PermissionsExt::from_mode(0o644),
    };
    std::fs::set_permissions(temp.path(), permissions).map_err(io_error)?;
    temp.as_file().sync_all().map_err(io_error)?;
    temp.persist(path).map_err(|error| io_error(error.error))?;
    Ok(())
}

/// Open deals and amounts per stage, kept each week to say what changed.
type Snapshot = std::collections::BTreeMap<String, (u64, f64)>;

fn snapshot_of(report: &FunnelReport) -> Snapshot {
    report
        .stages
        .iter()
        .map(|stage| (stage.stage.clone(), (stage.open_count, stage.open_amount)))
        .collect()
}

fn signed(value: f64) -> String {
    if value >= 0.0 {
        format!("+{}", money(value))
    } else {
        format!("-{}", money(-value))
    }
}

/// The weekly digest for the manager: the funnel table over the last week, the change since the
/// previous digest, the top stalled deals, and the Excel report attached. Recorded in the outbox
/// as pending, then delivered like the reminders (on `runtime`, see [`outbox::deliver`]). With
/// `due_at` (the daemon's schedule), the digest due then is recorded once for the whole store:
/// when another daemon sharing the store sent it, this one sends nothing (`Ok(None)`).
pub fn send_weekly_digest(
    store: &mut Store,
    config: &Config,
    now: DateTime<Utc>,
    due_at: Option<DateTime<Utc>>,
    runtime: &tokio::runtime::Handle,
) -> Result<Option<DeliveryReport>, ReportError> {
    let recorded = store.exclusively("weekly-digest", |store| -> Result<bool, ReportError> {
        let transaction = store.transaction()?;
        if let Some(due_at) = due_at {
            if !crate::store::jobs::claim_due(&transaction, "weekly-digest", due_at, now)? {
                return Ok(false);
            }
        }
        record_weekly_digest(&transaction, config, now, due_at)?;
        transaction.commit()?;
        Ok(true)
    })?;
    if !recorded {
        return Ok(None);
    }
    let delivery = outbox::deliver(store, config, now, false, runtime)?;
    crate::alerts::mail_refused(store, config, &delivery.refusals, now, runtime);
    Ok(Some(delivery))
}

/// Records the weekly digest (and its snapshot) as pending mail, in the caller's transaction.
fn record_weekly_digest(
    db: &crate::store::Db<'_>,
    config: &Config,
    now: DateTime<Utc>,
    due_at: Option<DateTime<Utc>>,
) -> Result<(), ReportError> {
    let manager = config
        .remind
        .as_ref()
        .and_then(|remind| remind.manager.clone())
        .ok_or(ReportError::NoManager)?;
    let period_days = config
        .report
        .as_ref()
        .map(|report| report.period_days)
        .unwrap_or(90);
    let period = Period {
        since: now - chrono::Duration::days(i64::from(period_days)),
        until: now,
    };
    let report = load_from(db, config, period, now, None)?;
    let previous: Option<Snapshot> =
        crate::store::jobs::last_snapshot(db)?.and_then(|text| serde_json::from_str(&text).ok());
    let current = snapshot_of(&report);
    let mut text = text_table(&report);
    text.push_str("\nchange since the last digest:\n");
    match &previous {
        None => text.push_str("  (this is the first digest)\n"),
        Some(previous) => {
            for (stage, (count, amount)) in &current {
                let (old_count, old_amount) = previous.get(stage).copied().unwrap_or((0, 0.0));
                text.push_str(&format!(
                    "  {stage}: {:+} deal(s), {}\n",
                    *count as i64 - old_count as i64,
                    signed(amount - old_amount)
                ));
            }
        }
    }
    if !report.stalled.is_empty() {
        text.push_str("\ntop stalled deals:\n");
        for line in report.stalled.iter().take(10) {
            text.push_str(&format!(
                "  {} ({}, {}): {}\n",
                line.company.as_deref().unwrap_or("?"),
                line.owner.as_deref().unwrap_or("no owner"),
                line.stage,
                line.reason
            ));
        }
    }
    let html = format!(
        "<!DOCTYPE html><html><body><pre style=\"font-family:monospace\">{}</pre></body></html>",
        html_escape::encode_safe(&text)
    );
    let message = Message {
        recipient: manager,
        subject: format!("Weekly funnel report {}", now.format("%Y-%m-%d")),
        text,
        html,
    };
    let bytes = workbook_bytes(&report)?;
    let name = format!("Funnel report {}.xlsx", now.format("%Y-%m-%d"));
    outbox::enqueue(
        db,
        MessageKind::Weekly,
        &message,
        Some((&name, &bytes)),
        now,
        outbox::give_up_at(config, now),
    )?;
    let snapshot = serde_json::to_string(&current).unwrap_or_default();
    crate::store::jobs::record_snapshot(db, now, &snapshot, due_at)?;
    Ok(())
}
