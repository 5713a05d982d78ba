//! The command line: the clap definitions of every subcommand and the code that runs each one and
//! prints its result as a table or as JSON.
//!
//! This module owns presentation and exit codes. It must not contain sync, mapping or store logic
//! of its own; it calls the library modules and formats what they return.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::config::{Config, ConfigError, SourcePath, DEFAULT_CONFIG_PATH};
use crate::deal::Field;
use crate::mapping::Severity;
use crate::store::{CrmStore, DealFilter, Store};
use crate::sync::{self, FileReport, FileStatus};
use crate::text::{amount_column, write_table};

/// Exit code: everything applied.
pub const EXIT_OK: u8 = 0;
/// Exit code: some rows or files had errors and were not applied.
pub const EXIT_ROW_ERRORS: u8 = 1;
/// Exit code: the config or the command line is wrong.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code: funnelsync could not run (store unreadable, disk full, …).
pub const EXIT_FAILURE: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "funnelsync",
    version,
    about = "Keeps sales pipeline spreadsheets and a CRM store in sync"
)]
pub struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "FUNNELSYNC_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Pretend it is this moment (RFC 3339), for `remind` and `deals list --stalled`: lets an
    /// admin preview a future run, and tests use a fixed clock.
    #[arg(long, global = true, hide = true, value_parser = parse_now)]
    pub now: Option<chrono::DateTime<chrono::Utc>>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One pass over every source: read, clean, diff, apply.
    Sync(SyncArgs),
    /// Work with the deals in the store.
    #[command(subcommand)]
    Deals(DealsCommand),
    /// List the row errors and warnings of the latest sync of each file.
    Errors(FormatArgs),
    /// Validate the config file and print a summary.
    CheckConfig,
    /// Run the daemon in the foreground: sync every source now, then whenever a file changes.
    Run,
    /// Per source file: last sync and its result, row errors, pending retries.
    Status(FormatArgs),
    /// Fields changed both in a sheet and in the store, and which value was kept.
    Conflicts(ConflictArgs),
    /// Email each rep a digest of their stalled deals now (and the manager the escalations).
    Remind(RemindArgs),
    /// The sales funnel: open deals per stage, conversion, time in stage, forecast.
    Funnel(FunnelArgs),
    /// Sync runs with their counts, or with RUN, every change that run applied.
    History(HistoryArgs),
    /// Revert every change a run applied (recorded as a run of its own).
    Undo(UndoArgs),
    /// Serve the HTTP API and the pages of `[http]` without watching files (a reporting host on
    /// a shared store).
    Serve,
    /// Make API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Look after the store: bring its schema up to date, or copy it into PostgreSQL.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Apply the schema migrations this funnelsync knows to the store (creating it if needed).
    Migrate,
    /// Copy this SQLite store (deals, history, runs, mirror, outbox, …) into an empty PostgreSQL
    /// database, check counts and checksums, and say which config line to change. The password
    /// comes from FUNNELSYNC_STORE_PASSWORD or the store-password credential.
    Copy {
        /// The database: postgresql://USER@HOST/DATABASE[?sslmode=require].
        #[arg(long)]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a fresh token for user NAME and the `[[http.users]]` lines to paste into the config.
    New {
        name: String,
        /// The user's role: admin, manager, rep or readonly.
        #[arg(long, default_value = "readonly")]
        role: String,
        /// For role rep: the owner name they are in the sheets.
        #[arg(long)]
        rep: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// A run's id: list its changes.
    pub run: Option<i64>,
    /// Only runs of this source.
    #[arg(long)]
    pub source: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct UndoArgs {
    pub run: i64,
    /// Also revert fields that later runs changed again.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct FunnelArgs {
    /// First day of the period (YYYY-MM-DD); default 90 days before --until.
    #[arg(long)]
    pub since: Option<chrono::NaiveDate>,
    /// Last day of the period (YYYY-MM-DD); default today.
    #[arg(long)]
    pub until: Option<chrono::NaiveDate>,
    /// Only this owner's deals (case and surrounding spaces ignored).
    #[arg(long)]
    pub owner: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Also write the report as an Excel workbook with charts.
    #[arg(long)]
    pub xlsx: Option<PathBuf>,
    /// Email the manager the weekly digest now (what `[report] weekly_digest` sends on schedule).
    #[arg(long)]
    pub send_digest: bool,
}

#[derive(Debug, Args)]
pub struct RemindArgs {
    /// Print each digest that would be sent, without sending or recording anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Ignore `repeat_every_days`: remind about every stalled deal.
    #[arg(long)]
    pub force: bool,
}

fn parse_now(text: &str) -> Result<chrono::DateTime<chrono::Utc>, chrono::ParseError> {
    chrono::DateTime::parse_from_rfc3339(text).map(|at| at.with_timezone(&chrono::Utc))
}

#[derive(Debug, Args)]
pub struct ConflictArgs {
    /// How many of the latest conflicts to show.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Subcommand)]
pub enum DealsCommand {
    /// List deals.
    List(ListArgs),
    /// Change fields of a deal: `deals set 42 amount=12000 owner="Alice Wang"` (an empty value
    /// clears the field). Values are cleaned and checked like sheet cells.
    Set {
        id: i64,
        /// FIELD=VALUE pairs.
        #[arg(required = true)]
        assignments: Vec<String>,
    },
    /// Move a deal to a stage (canonical name or alias).
    Move { id: i64, stage: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Apply this file's sync even if the mass-delete guard would hold it (repeatable).
    #[arg(long = "force", value_name = "FILE")]
    pub force: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only deals in this stage (canonical name or alias).
    #[arg(long)]
    pub stage: Option<String>,
    /// Only deals of this owner (case and surrounding spaces ignored).
    #[arg(long)]
    pub owner: Option<String>,
    /// Include archived deals.
    #[arg(long)]
    pub include_archived: bool,
    /// Only stalled deals, worst first, with the reason.
    #[arg(long)]
    pub stalled: bool,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Loads the config, printing every problem and mapping failure to exit code 2.
pub fn load_config(cli: &Cli) -> Result<Config, ExitCode> {
    match Config::load(&cli.config) {
        Ok(config) => Ok(config),
        Err(error @ ConfigError::Read { .. }) => {
            eprintln!("error: {error}");
            if cli.config == std::path::Path::new(DEFAULT_CONFIG_PATH) {
                eprintln!("hint: pass --config FILE or set FUNNELSYNC_CONFIG");
            }
            Err(ExitCode::from(EXIT_CONFIG))
        }
        Err(error) => {
            eprintln!("error: {error}");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

pub fn check_config(config: &Config) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    // The store's folder must exist or be creatable, and be writable: found now, not at the
    // daemon's first start. Said with the other problems and warnings, not instead of them.
    let store_problem = config.store.path().and_then(store_folder_problem);
    match &store_problem {
        Some(problem) => eprintln!(
            "error: config file {} is valid, but the store cannot be used: {problem}",
            config.path.display()
        ),
        None => writeln!(out, "config {} is valid", config.path.display())?,
    }
    for warning in config.warnings() {
        eprintln!("warning: {warning}");
    }
    writeln!(out, "store: {}", store_summary(config))?;
    writeln!(out, "sources:")?;
    for source in &config.sources {
        let files = crate::watch::source_files(config, source);
        writeln!(
            out,
            "  {}",
            source_summary(source, files.as_ref().ok().map(Vec::as_slice))
        )?;
        if let Err(error) = files {
            eprintln!("warning: source \"{}\": {error}", source.name);
        }
    }
    writeln!(out, "stages: {}", stages_summary(&config.stages))?;
    write_optional_sections(&mut out, config)?;
    Ok(ExitCode::from(if store_problem.is_some() {
        EXIT_CONFIG
    } else {
        EXIT_OK
    }))
}

/// Where the store is, for `check-config`.
fn store_summary(config: &Config) -> String {
    match &config.store.location {
        crate::config::StoreLocation::Sqlite(path) => format!("{} (SQLite)", path.display()),
        crate::config::StoreLocation::Postgres(postgres) => format!(
            "{} (PostgreSQL), site \"{}\"",
            postgres.shown_url(),
            config.store.site
        ),
    }
}

/// A source's line of `check-config`: what it names, how many files it has now (`None` when they
/// cannot be listed, which a warning says) and how they are synced.
fn source_summary(source: &crate::config::SourceConfig, files: Option<&[PathBuf]>) -> String {
    let (kind, path) = match &source.path {
        SourcePath::File(path) => ("file", path.display().to_string()),
        SourcePath::Folder(path) => ("folder", path.display().to_string()),
        SourcePath::Glob(pattern) => ("glob", pattern.clone()),
    };
    let n_files = match files {
        Some(files) => files.len().to_string(),
        None => "none, see the warning".to_string(),
    };
    let mut details = vec![format!("files now: {n_files}")];
    // A .csv has no sheets: naming one would only confuse.
    if !holds_only_csv(source, files) {
        details.push(format!(
            "sheet: {}",
            source.sheet.as_deref().unwrap_or("the first visible one")
        ));
    }
    details.push(format!("key column: \"{}\"", source.key_column));
    details.push(format!(
        "match on: {}",
        source
            .match_on
            .iter()
            .map(|field| field.name())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    details.push(if source.write_back {
        format!(
            "write-back: on, showing {}",
            match (source.view, source.filter.is_empty()) {
                (crate::config::View::Rows, _) => "the deals of its own rows",
                (crate::config::View::All, true) => "every deal",
                (crate::config::View::All, false) => "every deal its filter lets through",
            }
        )
    } else {
        "write-back: off".to_string()
    });
    format!("{}: {kind} {path} ({})", source.name, details.join("; "))
}

/// Whether a source names .csv files only: by its path or pattern, or by the files it has now.
fn holds_only_csv(source: &crate::config::SourceConfig, files: Option<&[PathBuf]>) -> bool {
    let is_csv = |path: &std::path::Path| {
        path.extension()
            .is_some_and(|extension| extension.eq_ignore_ascii_case("csv"))
    };
    match &source.path {
        SourcePath::Glob(pattern) => pattern.to_ascii_lowercase().ends_with(".csv"),
        SourcePath::File(path) | SourcePath::Folder(path) => {
            is_csv(path)
                || files
                    .is_some_and(|files| !files.is_empty() && files.iter().all(|file| is_csv(file)))
        }
    }
}

/// The stages in order, each with its probability or its end, for `check-config`.
fn stages_summary(stages: &crate::config::Stages) -> String {
    let stages: Vec<String> = stages
        .stages
        .iter()
        .map(|stage| match stage.terminal {
            Some(crate::config::Terminal::Won) => format!("{} (won)", stage.name),
            Some(crate::config::Terminal::Lost) => format!("{} (lost)", stage.name),
            None => format!("{} ({:.0}%)", stage.name, stage.probability * 100.0),
        })
        .collect();
    stages.join(" → ")
}

/// One line of `check-config` for each optional section the config has.
fn write_optional_sections(out: &mut impl Write, config: &Config) -> std::io::Result<()> {
    if let Some(remind) = &config.remind {
        writeln!(
            out,
            "reminders: daily at {} ({}{}), {} rep address(es), manager {}",
            remind.at.format("%H:%M"),
            remind.timezone,
            if remind.weekdays_only {
                ", weekdays"
            } else {
                ""
            },
            config.reps.len(),
            remind.manager.as_deref().unwrap_or("none")
        )?;
    }
    if let Some(smtp) = &config.smtp {
        writeln!(out, "mail: {}:{} as {}", smtp.host, smtp.port, smtp.from)?;
    }
    if let Some(report) = &config.report {
        writeln!(out, "report: {}", report.path.display())?;
    }
    if let Some(alerts) = &config.alerts {
        writeln!(out, "alerts: to {}", alerts.to)?;
    }
    if let Some(http) = &config.http {
        let users: Vec<String> = http
            .users
            .iter()
            .map(|user| format!("{} ({})", user.name, user.role.name()))
            .collect();
        writeln!(
            out,
            "http: {}://{} (API, pages, /metrics, /healthz); users: {}",
            if http.tls.is_some() { "https" } else { "http" },
            http.listen,
            users.join(", ")
        )?;
    }
    Ok(())
}

/// Why the store at `path` could not be created or written, if it could not: its folder, or the
/// nearest folder above it that exists, must be a writable folder. An existing store must be
/// writable, and so must its folder: SQLite makes its `-wal` and `-shm` files beside it.
fn store_folder_problem(path: &std::path::Path) -> Option<String> {
    use rustix::fs::{access, Access};
    let writable =
        |folder: &std::path::Path| access(folder, Access::WRITE_OK | Access::EXEC_OK).is_ok();
    if path.exists() {
        if access(path, Access::WRITE_OK).is_err() {
            return Some(format!("{} is not writable", path.display()));
        }
        let folder = path
            .parent()
            .filter(|folder| !folder.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        return (!writable(folder)).then(|| {
            format!(
                "the folder {} is not writable, so SQLite cannot make the store's -wal and -shm files beside {}",
                folder.display(),
                path.display()
            )
        });
    }
    let mut folder = path.parent()?;
    loop {
        match std::fs::metadata(folder) {
            Ok(metadata) if metadata.is_dir() => {
                return (!writable(folder)).then(|| {
                    format!(
                        "the folder {} is not writable, so {} cannot be created",
                        folder.display(),
                        path.display()
                    )
                });
            }
            Ok(_) => {
                return Some(format!(
                    "{} is a file, not a folder, so {} cannot be created",
                    folder.display(),
                    path.display()
                ));
            }
            Err(_) => folder = folder.parent()?,
        }
    }
}

/// `funnelsync store migrate`.
pub fn store_migrate(config: &Config) -> anyhow::Result<ExitCode> {
    // Like every command but `sync` and `run`, it does not create a store at a mistyped path.
    let (_, migrated) = Store::open_existing_migrating(&config.store)?;
    let mut out = std::io::stdout().lock();
    if migrated.from == migrated.to {
        writeln!(
            out,
            "the store {} is up to date (schema version {})",
            config.store.describe(),
            migrated.to
        )?;
    } else {
        writeln!(
            out,
            "migrated the store {} from schema version {} to {}",
            config.store.describe(),
            migrated.from,
            migrated.to
        )?;
    }
    Ok(ExitCode::from(EXIT_OK))
}

/// `funnelsync store copy --to URL`.
pub fn store_copy(config: &Config, to: &str) -> anyhow::Result<ExitCode> {
    let to_postgres = crate::config::PostgresConfig {
        url: to.to_string(),
        password_file: None,
    };
    // The URL is printed below and goes into connection errors: a password in it would too.
    if to_postgres.holds_password() {
        eprintln!("error: --to holds a password (as user:password@ or ?password=); give it in FUNNELSYNC_STORE_PASSWORD or the store-password credential instead");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    let crate::config::StoreLocation::Sqlite(path) = &config.store.location else {
        eprintln!("error: store copy copies a SQLite store ([store] path); this config's store is already PostgreSQL");
        return Ok(ExitCode::from(EXIT_CONFIG));
    };
    let shown = to_postgres.shown_url();
    let target = crate::config::StoreConfig {
        location: crate::config::StoreLocation::Postgres(crate::config::PostgresConfig {
            url: to.to_string(),
            password_file: None,
        }),
        site: config.store.site.clone(),
    };
    let from = Store::open_existing(&config.store)?;
    let mut into = Store::open(&target)?;
    let report = crate::store::copy_to_postgres(&from, &mut into)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "copied {} into {} (site \"{}\"), and checked:",
        path.display(),
        shown,
        config.store.site
    )?;
    let rows: Vec<Vec<String>> =
        std::iter::once(vec![
            "table".to_string(),
            "rows".to_string(),
            "checksum".to_string(),
        ])
        .chain(report.tables.iter().map(|(table, n_rows, checksum)| {
            vec![table.clone(), n_rows.to_string(), checksum.clone()]
        }))
        .collect();
    write_table(&mut out, &rows, &[false, true, false])?;
    writeln!(
        out,
        "\nTo use it, stop funnelsync and replace in [store] of {}:\n    path = \"{}\"\nwith:\n    url = \"{}\"\n    site = \"{}\"\nThen start funnelsync again. The SQLite file is left as it was.",
        config.path.display(),
        path.display(),
        shown,
        config.store.site
    )?;
    Ok(ExitCode::from(EXIT_OK))
}

pub(crate) fn open_store(config: &Config) -> anyhow::Result<Store> {
    Ok(Store::open(&config.store)?)
}

/// Opens the store that must already exist: every command but `sync` and `run`, so that a
/// mistyped path says so instead of leaving an empty store behind.
pub(crate) fn open_existing_store(config: &Config) -> anyhow::Result<Store> {
    Ok(Store::open_existing(&config.store)?)
}

/// The runtime a command's mail goes out on: the SMTP transport is async, a command is not.
fn mail_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the mail runtime")
}

pub fn sync(config: &Config, args: &SyncArgs) -> anyhow::Result<ExitCode> {
    let mut store = open_store(config)?;
    let forced: Vec<String> = args.force.iter().map(|path| sync::file_key(path)).collect();
    let reports = sync::sync_all_forcing(&mut store, config, chrono::Utc::now(), &forced)?;
    let mut runtime = None;
    for report in &reports {
        if let sync::WriteBack::Failed(message) = &report.write_back {
            let runtime = match runtime.as_mut() {
                Some(runtime) => runtime,
                None => runtime.insert(mail_runtime()?),
            };
            // The admin hears of it as from the daemon (rate-limited per file).
            let subject = format!("{} cannot be written back", display_file(&report.file));
            let key = format!("write-back:{}", display_file(&report.file));
            if let Err(error) = crate::alerts::raise(
                &mut store,
                config,
                &key,
                &subject,
                message,
                chrono::Utc::now(),
                runtime.handle(),
            ) {
                eprintln!("warning: cannot send an alert: {error}");
            }
        }
    }
    let report_written = write_report_after_sync(&mut store, config, &reports);
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            let document = json!({ "ok": !sync::has_problems(&reports), "files": reports });
            writeln!(out, "{}", serde_json::to_string_pretty(&document)?)?;
        }
        Format::Table => {
            print_sync_table(&mut out, config, &reports)?;
            if let Some(path) = report_written {
                writeln!(
                    out,
                    "\nfunnel report written to {}",
                    display_file(&path.display().to_string())
                )?;
            }
        }
    }
    Ok(ExitCode::from(if sync::has_problems(&reports) {
        EXIT_ROW_ERRORS
    } else {
        EXIT_OK
    }))
}

/// Writes the configured funnel report (`[report]`) after a pass, as the daemon keeps it fresh:
/// when the pass changed the store, or when the report is not there yet. A report that cannot be
/// written (open in Excel, say) is a warning; the sync's outcome stands. The path when written.
fn write_report_after_sync(
    store: &mut Store,
    config: &Config,
    reports: &[FileReport],
) -> Option<std::path::PathBuf> {
    let report = config.report.as_ref()?;
    let changed = reports
        .iter()
        .any(|report| report.status == FileStatus::Synced);
    if !changed && report.path.exists() {
        return None;
    }
    let now = chrono::Utc::now();
    // Daemons sharing the store write the report one at a time; so does this.
    match store.exclusively("report", |store| {
        crate::report::write_configured(store, config, report, now)
    }) {
        Ok(()) => Some(report.path.clone()),
        Err(error) => {
            eprintln!("warning: the funnel report was not written: {error}");
            None
        }
    }
}

/// Whether a failed report is about its source's folder (it could not be listed: a share that is
/// not mounted) rather than about one of its files.
fn is_listing_failure(config: &Config, report: &FileReport) -> bool {
    config.source(&report.source).is_some_and(|source| {
        report.file == crate::watch::source_folder(source).display().to_string()
            || matches!(&source.path, SourcePath::Glob(pattern) if *pattern == report.file)
    })
}

fn print_sync_table(
    out: &mut impl Write,
    config: &Config,
    reports: &[FileReport],
) -> anyhow::Result<()> {
    if reports.is_empty() {
        writeln!(out, "no source files found")?;
        return Ok(());
    }
    let mut rows = vec![[
        "source",
        "file",
        "status",
        "created",
        "updated",
        "archived",
        "unchanged",
        "errors",
        "written back",
    ]
    .map(String::from)
    .to_vec()];
    for report in reports {
        let status = match report.status {
            FileStatus::Synced => "synced",
            FileStatus::Unchanged => "unchanged",
            FileStatus::Failed => "FAILED",
            FileStatus::Held => "HELD",
        };
        let counts = &report.counts;
        rows.push(vec![
            report.source.clone(),
            display_file(&report.file),
            status.to_string(),
            counts.created.to_string(),
            counts.updated.to_string(),
            (counts.archived + counts.deleted).to_string(),
            counts.unchanged.to_string(),
            report.n_row_errors().to_string(),
            match &report.write_back {
                // A file that failed or was held did not get as far as a write-back.
                sync::WriteBack::Off
                    if matches!(report.status, FileStatus::Failed | FileStatus::Held) =>
                {
                    "—"
                }
                sync::WriteBack::Off => "off",
                sync::WriteBack::UpToDate => "up to date",
                sync::WriteBack::Written => "yes",
                sync::WriteBack::Deferred(_) => "deferred",
                sync::WriteBack::Failed(_) => "FAILED",
            }
            .to_string(),
        ]);
    }
    write_table(
        out,
        &rows,
        &[false, false, false, true, true, true, true, true, false],
    )?;
    for report in reports {
        match &report.write_back {
            sync::WriteBack::Deferred(message) => {
                writeln!(out, "\nwrite-back deferred: {message}")?
            }
            sync::WriteBack::Failed(message) => writeln!(out, "\nwrite-back failed: {message}")?,
            _ => {}
        }
        if let Some(error) = &report.error {
            writeln!(out, "\nerror: {error}")?;
            // A folder that cannot be listed says why itself (a share that is not mounted); the
            // hint is about a file read in the middle of its save.
            if report.retryable && !is_listing_failure(config, report) {
                writeln!(
                    out,
                    "  (the file may still be being saved; it will be read again on the next sync)"
                )?;
            }
        }
        if !report.issues.is_empty() {
            writeln!(
                out,
                "\n{} (sheet \"{}\"):",
                display_file(&report.file),
                report.sheet.as_deref().unwrap_or("")
            )?;
            for issue in &report.issues {
                let label = match issue.severity {
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                };
                writeln!(out, "  {label}: {issue}")?;
            }
        }
    }
    Ok(())
}

/// Shows a path relative to the working directory when it is below it.
fn display_file(file: &str) -> String {
    let path = std::path::Path::new(file);
    std::env::current_dir()
        .ok()
        .and_then(|current| {
            path.strip_prefix(&current)
                .ok()
                .map(|relative| relative.display().to_string())
        })
        .unwrap_or_else(|| file.to_string())
}

pub fn deals_list(
    config: &Config,
    args: &ListArgs,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<ExitCode> {
    // A stage given by alias ("成交") lists the canonical stage ("Won"); a stage that is no stage
    // is a mistake, not an empty list.
    let stage = match args.stage.as_deref() {
        None => None,
        Some(written) => match config.stages.resolve(written) {
            Some(stage) => Some(stage.name.clone()),
            None => {
                eprintln!(
                    "error: --stage \"{written}\" is not a stage; the stages are {} (or their aliases)",
                    config.stages.names().join(", ")
                );
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        },
    };
    let store = open_existing_store(config)?;
    if let Some(owner) = args.owner.as_deref() {
        if !owns_deals(&store, owner, args.include_archived)? {
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    }
    let filter = DealFilter {
        stage,
        owner: args.owner.clone(),
        include_archived: args.include_archived,
    };
    let mut deals = store.crm().list_deals(&filter)?;
    let reasons = if args.stalled {
        crate::remind::keep_stalled(&mut deals, config, now)
    } else {
        std::collections::HashMap::new()
    };
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            let array: Vec<Value> = deals
                .iter()
                .map(|deal| {
                    let mut value = deal.to_json();
                    if let Some(reason) = reasons.get(&deal.id) {
                        value["stalled"] = json!(reason);
                    }
                    value
                })
                .collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&array)?)?;
        }
        Format::Table => {
            let mut header = [
                "id",
                "company",
                "contact",
                "stage",
                "amount",
                "currency",
                "owner",
                "next step",
            ]
            .map(String::from)
            .to_vec();
            if args.stalled {
                header.push("stalled".to_string());
            }
            let mut rows = vec![header];
            let amounts: Vec<Option<f64>> = deals
                .iter()
                .map(|deal| {
                    deal.fields
                        .get(&Field::Amount)
                        .and_then(|value| value.as_amount())
                })
                .collect();
            let amounts = amount_column(&amounts);
            for (deal, amount) in deals.iter().zip(amounts) {
                let text = |field: Field| {
                    deal.fields
                        .get(&field)
                        .map(|value| value.to_string())
                        .unwrap_or_default()
                };
                let mut stage = text(Field::Stage);
                if deal.archived_at.is_some() {
                    stage.push_str(" (archived)");
                }
                let mut row = vec![
                    deal.id.to_string(),
                    text(Field::Company),
                    text(Field::Contact),
                    stage,
                    amount,
                    text(Field::Currency),
                    text(Field::Owner),
                    text(Field::NextStep),
                ];
                if let Some(reason) = reasons.get(&deal.id) {
                    row.push(reason.clone());
                }
                rows.push(row);
            }
            write_table(
                &mut out,
                &rows,
                &[true, false, false, false, true, false, false, false, false],
            )?;
            writeln!(out, "{} deal(s)", deals.len())?;
        }
    }
    Ok(ExitCode::from(EXIT_OK))
}

pub fn remind(
    config: &Config,
    args: &RemindArgs,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<ExitCode> {
    if config.remind.is_none() {
        eprintln!("error: reminders are not configured: add [remind] and [smtp] sections (see config/funnelsync.example.toml)");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    let mut store = open_existing_store(config)?;
    let runtime = mail_runtime()?;
    let report = crate::remind::outbox::run(
        &mut store,
        config,
        now,
        now,
        args.force,
        args.dry_run,
        runtime.handle(),
    )?;
    let mut out = std::io::stdout().lock();
    if args.dry_run {
        if report.messages.is_empty() {
            writeln!(
                out,
                "no reminders due ({} stalled deal(s))",
                report.n_stalled
            )?;
        }
        for message in &report.messages {
            writeln!(
                out,
                "To: {}\nSubject: {}\n\n{}\n----",
                message.message.recipient, message.message.subject, message.message.text
            )?;
        }
    } else {
        writeln!(
            out,
            "{} stalled deal(s); {} message(s) sent, {} waiting to retry, {} refused by the server, {} given up",
            report.n_stalled,
            report.delivery.sent,
            report.delivery.retrying,
            report.delivery.refused,
            report.delivery.failed
        )?;
        for error in &report.delivery.errors {
            writeln!(out, "mail error: {error}")?;
        }
    }
    for deal_id in &report.unaddressed {
        eprintln!("warning: deal {deal_id} is stalled but its owner has no address in [reps] and no fallback_to is set");
    }
    let failed = report.delivery.retrying + report.delivery.refused + report.delivery.failed > 0;
    Ok(ExitCode::from(if failed {
        EXIT_ROW_ERRORS
    } else {
        EXIT_OK
    }))
}

pub fn errors(config: &Config, args: &FormatArgs) -> anyhow::Result<ExitCode> {
    let store = open_existing_store(config)?;
    let issues = crate::store::mirror::current_issues(&store.db())?;
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&issues)?)?,
        Format::Table => {
            if issues.is_empty() {
                writeln!(out, "no row errors")?;
            }
            // A store several daemons share holds every site's files: each says whose it is.
            for stored in &issues {
                let label = match stored.issue.severity {
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                };
                let site = match &stored.site {
                    Some(site) => format!("site \"{site}\", "),
                    None => String::new(),
                };
                writeln!(
                    out,
                    "{label}: {site}{}, sheet \"{}\", {}",
                    display_file(&stored.file),
                    stored.sheet.as_deref().unwrap_or(""),
                    stored.issue
                )?;
            }
        }
    }
    Ok(ExitCode::from(EXIT_OK))
}

fn local_time(at: chrono::DateTime<chrono::Utc>) -> String {
    at.with_timezone(&chrono::Local)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

pub fn status(config: &Config, args: &FormatArgs) -> anyhow::Result<ExitCode> {
    let store = open_existing_store(config)?;
    let overview = crate::store::files::file_overview(&store.db())?;
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&overview)?)?,
        Format::Table => {
            if overview.is_empty() {
                writeln!(out, "no file has been synced yet")?;
                return Ok(ExitCode::from(EXIT_OK));
            }
            // A store several daemons share holds every site's files: a column says whose each
            // is, and only this daemon's config tells whether a file writes back.
            let several_sites = overview.iter().any(|file| file.site.is_some());
            let own_site = config.store.site.as_str();
            let mut rows = vec![[
                "site",
                "source",
                "file",
                "last change",
                "result",
                "last checked",
                "rows",
                "errors",
                "write-back",
                "daemon",
            ]
            .map(String::from)
            .to_vec()];
            for file in &overview {
                let state = match (file.state, file.next_retry_at) {
                    (Some(crate::store::files::FileState::Retrying), Some(retry_at)) => {
                        format!(
                            "retry {} at {}",
                            file.attempts + 1,
                            retry_at.with_timezone(&chrono::Local).format("%H:%M:%S")
                        )
                    }
                    (Some(state), _) => state.name().to_string(),
                    (None, _) => "not running".to_string(),
                };
                let writes_back = file.site.as_deref().is_some_and(|site| site != own_site)
                    || config
                        .source(&file.source)
                        .is_some_and(|source| source.write_back);
                let write_back = match &file.write_back {
                    _ if !writes_back => "off".to_string(),
                    Some(state) => state.status.replace('_', " "),
                    None => "not yet".to_string(),
                };
                rows.push(vec![
                    file.site.clone().unwrap_or_default(),
                    file.source.clone(),
                    display_file(&file.file),
                    file.last_run_at.map(local_time).unwrap_or_default(),
                    file.last_status.clone().unwrap_or_default(),
                    file.last_checked_at.map(local_time).unwrap_or_default(),
                    file.n_rows.to_string(),
                    file.n_row_errors.to_string(),
                    write_back,
                    state,
                ]);
            }
            let mut right_aligned = vec![
                false, false, false, false, false, false, true, true, false, false,
            ];
            if !several_sites {
                for row in &mut rows {
                    row.remove(0);
                }
                right_aligned.remove(0);
            }
            write_table(&mut out, &rows, &right_aligned)?;
            for file in &overview {
                let ignored = file.state == Some(crate::store::files::FileState::Ignored);
                if file.last_status.as_deref() == Some("failed") || ignored {
                    if let Some(message) = &file.last_message {
                        writeln!(out, "\n{}: {message}", display_file(&file.file))?;
                    }
                }
                if let Some(crate::store::files::WriteBackState {
                    status,
                    message: Some(message),
                }) = &file.write_back
                {
                    writeln!(
                        out,
                        "\n{}: write-back {status}: {message}",
                        display_file(&file.file)
                    )?;
                }
            }
        }
    }
    Ok(ExitCode::from(EXIT_OK))
}

pub fn history(config: &Config, args: &HistoryArgs) -> anyhow::Result<ExitCode> {
    let store = open_existing_store(config)?;
    let crm = store.crm();
    let mut out = std::io::stdout().lock();
    if let Some(run_id) = args.run {
        let Some(run) = crm.run(run_id)? else {
            eprintln!("error: there is no run {run_id}");
            return Ok(ExitCode::from(EXIT_ROW_ERRORS));
        };
        let changes = crm.changes_of_run(run_id)?;
        match args.format {
            Format::Json => writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&json!({ "run": run, "changes": changes }))?
            )?,
            Format::Table => {
                writeln!(
                    out,
                    "run {} ({}) at {}: {}",
                    run.id,
                    run_origin(&run),
                    local_time(run.started_at),
                    run.status
                )?;
                if let Some(message) = &run.message {
                    writeln!(out, "{message}")?;
                }
                let mut rows = vec![["deal", "change", "field", "old", "new"]
                    .map(String::from)
                    .to_vec()];
                for change in &changes {
                    rows.extend(change_lines(change));
                }
                write_table(&mut out, &rows, &[true, false, false, false, false])?;
            }
        }
        return Ok(ExitCode::from(EXIT_OK));
    }
    let mut runs = crm.last_runs(10_000)?;
    if let Some(source) = &args.source {
        runs.retain(|run| &run.source == source);
    }
    runs.truncate(args.limit);
    match args.format {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&runs)?)?,
        Format::Table => {
            let mut rows = vec![[
                "run",
                "when",
                "source",
                "file",
                "status",
                "created",
                "updated",
                "archived",
                "unchanged",
                "errors",
            ]
            .map(String::from)
            .to_vec()];
            for run in &runs {
                rows.push(vec![
                    run.id.to_string(),
                    local_time(run.started_at),
                    run.source.clone(),
                    run_file(run),
                    run.status.clone(),
                    run.counts.created.to_string(),
                    run.counts.updated.to_string(),
                    (run.counts.archived + run.counts.deleted).to_string(),
                    run.counts.unchanged.to_string(),
                    run.counts.errors.to_string(),
                ]);
            }
            write_table(
                &mut out,
                &rows,
                &[
                    true, false, false, false, false, true, true, true, true, true,
                ],
            )?;
        }
    }
    Ok(ExitCode::from(EXIT_OK))
}

/// What a run was of: its file, or the command line, or the run an undo reverted.
fn run_file(run: &crate::store::SyncRun) -> String {
    if run.file.starts_with('/') {
        display_file(&run.file)
    } else if run.source == "undo" {
        format!("undo of {}", run.file)
    } else {
        String::new()
    }
}

/// "pipeline, p.xlsx", or "cli", or "undo of run 3".
fn run_origin(run: &crate::store::SyncRun) -> String {
    if run.file.starts_with('/') {
        format!("{}, {}", run.source, display_file(&run.file))
    } else if run.source == "undo" {
        run_file(run)
    } else {
        run.source.clone()
    }
}

/// The table lines of one change: an update is one line; a created or deleted deal is a line per
/// field it had, so nothing is cut.
fn change_lines(change: &crate::store::ChangeRecord) -> Vec<Vec<String>> {
    let line = |field: String, old: String, new: String| {
        vec![
            change.deal_id.to_string(),
            change.kind.name().to_string(),
            field,
            old,
            new,
        ]
    };
    let snapshot = match change.kind {
        crate::store::ChangeKind::Create => change.new_value.as_deref(),
        crate::store::ChangeKind::Delete => change.old_value.as_deref(),
        _ => None,
    };
    let fields: Option<Vec<(String, String)>> = snapshot.and_then(|text| {
        let value: Value = serde_json::from_str(text).ok()?;
        // A deleted deal is kept whole (fields, extra, times); a created one as its fields.
        let object = value.get("fields").unwrap_or(&value).as_object()?;
        Some(
            object
                .iter()
                .map(|(name, value)| {
                    let text = match value {
                        Value::String(text) => text.clone(),
                        Value::Number(number) => number
                            .as_f64()
                            .map(crate::deal::format_amount)
                            .unwrap_or_else(|| number.to_string()),
                        other => other.to_string(),
                    };
                    (name.clone(), text)
                })
                .collect(),
        )
    });
    match fields {
        Some(fields) if !fields.is_empty() => fields
            .into_iter()
            .map(|(name, text)| match change.kind {
                crate::store::ChangeKind::Delete => line(name, text, String::new()),
                _ => line(name, String::new(), text),
            })
            .collect(),
        _ => vec![line(
            change.field.clone().unwrap_or_default(),
            change.old_value.clone().unwrap_or_default(),
            change.new_value.clone().unwrap_or_default(),
        )],
    }
}

pub fn undo(config: &Config, args: &UndoArgs) -> anyhow::Result<ExitCode> {
    let mut store = open_existing_store(config)?;
    let report = match crate::history::undo(&mut store, args.run, args.force, chrono::Utc::now()) {
        Ok(report) => report,
        Err(crate::history::UndoError::NoSuchRun(run)) => {
            eprintln!("error: there is no run {run}");
            return Ok(ExitCode::from(EXIT_ROW_ERRORS));
        }
        Err(error) => return Err(error.into()),
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "undid run {}: {} change(s) reverted (recorded as run {})",
        report.undone_run,
        report.n_reverted,
        report.run_id.map(|id| id.to_string()).unwrap_or_default()
    )?;
    for skipped in &report.skipped {
        writeln!(
            out,
            "skipped: deal {} {} {}: {}",
            skipped.change.deal_id,
            skipped.change.kind.name(),
            skipped.change.field.as_deref().unwrap_or(""),
            skipped.reason
        )?;
    }
    Ok(ExitCode::from(if report.skipped.is_empty() {
        EXIT_OK
    } else {
        EXIT_ROW_ERRORS
    }))
}

pub fn funnel(
    config: &Config,
    args: &FunnelArgs,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<ExitCode> {
    if let (Some(since), Some(until)) = (args.since, args.until) {
        if since > until {
            eprintln!("error: --since {since} is after --until {until}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    }
    let store = open_existing_store(config)?;
    if let Some(owner) = args.owner.as_deref() {
        // The funnel counts archived deals too (won and lost ones whose rows are gone).
        if !owns_deals(&store, owner, true)? {
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    }
    let period = crate::funnel::Period::between(args.since, args.until, now);
    let report = crate::report::load(&store, config, period, now, args.owner.as_deref())?;
    if let Some(path) = &args.xlsx {
        crate::report::write_file(path, &report)?;
    }
    if args.send_digest {
        if config
            .remind
            .as_ref()
            .and_then(|remind| remind.manager.as_ref())
            .is_none()
            || config.smtp.is_none()
        {
            eprintln!("error: the digest goes to [remind] manager over [smtp]; configure both");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        let mut store = open_existing_store(config)?;
        let runtime = mail_runtime()?;
        let delivery =
            crate::report::send_weekly_digest(&mut store, config, now, None, runtime.handle())?
                .unwrap_or_default();
        for error in &delivery.errors {
            eprintln!("mail error: {error}");
        }
        if delivery.sent == 0 {
            return Ok(ExitCode::from(EXIT_ROW_ERRORS));
        }
    }
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
        Format::Table => {
            write!(out, "{}", crate::report::text_table(&report))?;
            if let Some(path) = &args.xlsx {
                writeln!(out, "\nwrote {}", path.display())?;
            }
        }
    }
    Ok(ExitCode::from(EXIT_OK))
}

/// `token new NAME`: a fresh token on stdout's first line and the config lines below it. Only the
/// token's hash goes into the config; the token itself is shown once.
pub fn token_new(name: &str, role: &str, rep: Option<&str>) -> anyhow::Result<ExitCode> {
    let Some(role) = crate::config::Role::from_name(role) else {
        eprintln!("error: --role \"{role}\" is not one of admin, manager, rep, readonly");
        return Ok(ExitCode::from(EXIT_CONFIG));
    };
    if name.trim().is_empty() || name.contains(['"', '\\', '\n']) {
        eprintln!(
            "error: a user name must not be empty or hold quotes, backslashes or line breaks"
        );
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    if role == crate::config::Role::Rep && rep.is_none() {
        eprintln!("error: a rep needs --rep \"OWNER NAME\" (as the sheets write it)");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    let token = crate::http::auth::new_token()?;
    let hash = crate::http::auth::hex(&crate::http::auth::hash_token(&token));
    let mut out = std::io::stdout().lock();
    writeln!(out, "{token}")?;
    writeln!(out)?;
    writeln!(
        out,
        "# Give the token above to {} (it is shown only once); paste these lines into the config:",
        name.trim()
    )?;
    writeln!(out, "[[http.users]]")?;
    writeln!(out, "name = \"{}\"", name.trim())?;
    writeln!(out, "role = \"{}\"", role.name())?;
    if let Some(rep) = rep.filter(|_| role == crate::config::Role::Rep) {
        writeln!(out, "rep = {}", toml::Value::String(rep.trim().to_string()))?;
    }
    writeln!(out, "token_sha256 = \"{hash}\"")?;
    Ok(ExitCode::from(EXIT_OK))
}

/// `funnelsync run`: the daemon, until SIGTERM or SIGINT.
pub fn run(config: Config) -> anyhow::Result<ExitCode> {
    crate::daemon::run(config)?;
    Ok(ExitCode::SUCCESS)
}

pub fn serve(config: Config) -> anyhow::Result<ExitCode> {
    if config.http.is_none() {
        eprintln!("error: {}", crate::http::HttpError::NotConfigured);
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    crate::http::serve(config)?;
    Ok(ExitCode::from(EXIT_OK))
}

/// Applies field changes made on the command line through [`crate::edit::apply_changes`] (a run
/// of source "cli") and prints what changed.
fn apply_cli_changes(
    config: &Config,
    id: i64,
    changes: crate::edit::Changes,
) -> anyhow::Result<ExitCode> {
    let mut store = open_existing_store(config)?;
    let outcome = match crate::edit::apply_changes(
        &mut store,
        config,
        id,
        changes.into(),
        crate::edit::Origin::CLI,
        |_| Ok(()),
        chrono::Utc::now(),
    ) {
        Ok(outcome) => outcome,
        Err(crate::edit::EditError::NoSuchDeal(id)) => {
            eprintln!("error: there is no deal {id}");
            return Ok(ExitCode::from(EXIT_ROW_ERRORS));
        }
        Err(error) => return Err(error.into()),
    };
    if outcome.run_id.is_none() {
        println!("deal {id} already has these values");
    }
    for (field, value) in &outcome.applied {
        let shown = value
            .as_ref()
            .map(|value| format!("\"{value}\""))
            .unwrap_or_else(|| "(empty)".to_string());
        println!("deal {id}: {field} = {shown}");
    }
    Ok(ExitCode::from(EXIT_OK))
}

pub fn deals_set(config: &Config, id: i64, assignments: &[String]) -> anyhow::Result<ExitCode> {
    let mut pairs = Vec::new();
    let mut problems = Vec::new();
    for assignment in assignments {
        match assignment.split_once('=') {
            Some(pair) => pairs.push(pair),
            None => problems.push(format!("\"{assignment}\" is not FIELD=VALUE")),
        }
    }
    let changes = match crate::edit::clean_assignments(config, pairs) {
        Ok(changes) if problems.is_empty() => changes,
        Ok(_) => Vec::new(),
        Err(more) => {
            problems.extend(more.into_iter().map(|problem| problem.message));
            Vec::new()
        }
    };
    if !problems.is_empty() {
        for problem in problems {
            eprintln!("error: {problem}");
        }
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    apply_cli_changes(config, id, changes)
}

pub fn deals_move(config: &Config, id: i64, stage: &str) -> anyhow::Result<ExitCode> {
    match crate::edit::clean_stage(config, stage) {
        Ok(changes) => apply_cli_changes(config, id, changes),
        Err(problem) => {
            eprintln!("error: {problem}");
            Ok(ExitCode::from(EXIT_CONFIG))
        }
    }
}

pub fn conflicts(config: &Config, args: &ConflictArgs) -> anyhow::Result<ExitCode> {
    let store = open_existing_store(config)?;
    let conflicts = store.crm().conflicts(args.limit)?;
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&conflicts)?)?,
        Format::Table => {
            if conflicts.is_empty() {
                writeln!(out, "no conflicts")?;
                return Ok(ExitCode::from(EXIT_OK));
            }
            let mut rows = vec![[
                "when", "deal", "field", "was", "sheet", "store", "kept", "policy", "file",
            ]
            .map(String::from)
            .to_vec()];
            for conflict in &conflicts {
                rows.push(vec![
                    conflict
                        .at
                        .with_timezone(&chrono::Local)
                        .format("%Y-%m-%d %H:%M")
                        .to_string(),
                    conflict.deal_id.to_string(),
                    conflict.field.clone(),
                    conflict.base_value.clone().unwrap_or_default(),
                    conflict.sheet_value.clone().unwrap_or_default(),
                    conflict.store_value.clone().unwrap_or_default(),
                    conflict.winner.clone(),
                    conflict.policy.clone(),
                    display_file(&conflict.file),
                ]);
            }
            write_table(
                &mut out,
                &rows,
                &[false, true, false, false, false, false, false, false, false],
            )?;
        }
    }
    Ok(ExitCode::from(EXIT_OK))
}

/// Whether some live deal (or any deal, with `include_archived`) has this owner (case and spaces
/// ignored); if none has, says so with the owners there are, since a mistyped name is likelier
/// than an owner without deals.
fn owns_deals(store: &Store, owner: &str, include_archived: bool) -> anyhow::Result<bool> {
    let owners = store.crm().owners(include_archived)?;
    let wanted = crate::deal::normalize_label(owner);
    if owners
        .iter()
        .any(|known| crate::deal::normalize_label(known) == wanted)
    {
        return Ok(true);
    }
    eprintln!(
        "error: --owner \"{owner}\" owns no deal; the owners are {}",
        if owners.is_empty() {
            "none yet".to_string()
        } else {
            owners.join(", ")
        }
    );
    Ok(false)
}
