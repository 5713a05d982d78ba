//! The test harness: a temp folder per test, builders for real workbooks, and a runner for the
//! real `funnelsync` binary, so each test reads as a user scenario.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rust_xlsxwriter::{ExcelDateTime, Format, Formula, Workbook};
use serde_json::Value;

pub const BINARY: &str = env!("CARGO_BIN_EXE_funnelsync");

/// A cell for [`XlsxBuilder`].
#[derive(Debug, Clone)]
pub enum Cell {
    Text(String),
    Number(f64),
    /// A date cell (a number formatted as a date), year, month, day.
    Date(u16, u8, u8),
    /// A formula with its cached result.
    Formula(String, String),
    Empty,
}

impl From<&str> for Cell {
    fn from(text: &str) -> Cell {
        if text.is_empty() {
            Cell::Empty
        } else {
            Cell::Text(text.to_string())
        }
    }
}

impl From<f64> for Cell {
    fn from(number: f64) -> Cell {
        Cell::Number(number)
    }
}

/// The header of the plain pipeline sheet several scenarios build.
pub const DEAL_HEADER: [&str; 6] = ["Company", "Contact", "Email", "Stage", "Amount", "Owner"];

/// A sheet "Pipeline" with [`DEAL_HEADER`] and these rows.
pub fn deal_sheet(rows: &[[&str; 6]]) -> XlsxBuilder {
    let mut builder = XlsxBuilder::new().sheet("Pipeline").row(&DEAL_HEADER);
    for row in rows {
        builder = builder.row(row);
    }
    builder
}

/// Builds a real .xlsx file with one or more sheets.
/// A sheet being built: its name and its rows by 0-based row index.
type SheetRows = (String, Vec<(u32, Vec<Cell>)>);

#[derive(Debug, Default, Clone)]
pub struct XlsxBuilder {
    sheets: Vec<SheetRows>,
}

impl XlsxBuilder {
    pub fn new() -> XlsxBuilder {
        XlsxBuilder::default()
    }

    /// Starts a sheet; following `row` calls add to it.
    pub fn sheet(mut self, name: &str) -> XlsxBuilder {
        self.sheets.push((name.to_string(), Vec::new()));
        self
    }

    /// Adds a row of text cells ("" is an empty cell) below the previous row.
    pub fn row(self, cells: &[&str]) -> XlsxBuilder {
        self.cells(cells.iter().map(|text| Cell::from(*text)).collect())
    }

    pub fn cells(mut self, cells: Vec<Cell>) -> XlsxBuilder {
        if self.sheets.is_empty() {
            self.sheets.push(("Sheet1".to_string(), Vec::new()));
        }
        let rows = &mut self.sheets.last_mut().expect("a sheet").1;
        let next = rows.last().map(|(row, _)| row + 1).unwrap_or(0);
        rows.push((next, cells));
        self
    }

    /// Leaves `n` empty rows.
    pub fn skip_rows(mut self, n: u32) -> XlsxBuilder {
        if self.sheets.is_empty() {
            self.sheets.push(("Sheet1".to_string(), Vec::new()));
        }
        let rows = &mut self.sheets.last_mut().expect("a sheet").1;
        let next = rows.last().map(|(row, _)| row + 1).unwrap_or(0);
        rows.push((next + n - 1, Vec::new()));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut workbook = Workbook::new();
        let date_format = Format::new().set_num_format("yyyy-mm-dd");
        for (name, rows) in &self.sheets {
            let sheet = workbook.add_worksheet();
            sheet.set_name(name).expect("sheet name");
            for (row, cells) in rows {
                for (column, cell) in cells.iter().enumerate() {
                    let column = column as u16;
                    match cell {
                        Cell::Text(text) => {
                            sheet.write_string(*row, column, text).expect("write");
                        }
                        Cell::Number(number) => {
                            sheet.write_number(*row, column, *number).expect("write");
                        }
                        Cell::Date(year, month, day) => {
                            let date = ExcelDateTime::from_ymd(*year, *month, *day).expect("date");
                            sheet
                                .write_datetime_with_format(*row, column, date, &date_format)
                                .expect("write");
                        }
                        Cell::Formula(formula, result) => {
                            sheet
                                .write_formula(
                                    *row,
                                    column,
                                    Formula::new(formula).set_result(result),
                                )
                                .expect("write");
                        }
                        Cell::Empty => {}
                    }
                }
            }
        }
        workbook.save_to_buffer().expect("xlsx bytes")
    }

    pub fn save(&self, path: &Path) {
        std::fs::write(path, self.to_bytes()).expect("write xlsx");
    }
}

/// A workbook as a user edits it in Excel: the sheet as the file holds it now (read back, with
/// the ids funnelsync wrote into it), cells changed by column header, rows added at the end, then
/// saved the way Excel saves (a new file beside it, renamed over the original).
pub struct UserEdit {
    path: PathBuf,
    sheet: String,
    /// The header row first, then the data rows, as text.
    rows: Vec<Vec<String>>,
}

impl UserEdit {
    pub fn open(path: &Path, sheet: &str) -> UserEdit {
        UserEdit {
            path: path.to_path_buf(),
            sheet: sheet.to_string(),
            rows: read_xlsx(path, sheet).values,
        }
    }

    #[track_caller]
    fn column(&self, header: &str) -> usize {
        self.rows[0]
            .iter()
            .position(|cell| cell == header)
            .unwrap_or_else(|| panic!("no column {header} in {:?}", self.rows[0]))
    }

    /// Sets `column` to `value` in every data row `which` picks (by the row's cells, by header).
    pub fn set_where(
        mut self,
        which: impl Fn(&dyn Fn(&str) -> String) -> bool,
        column: &str,
        value: &str,
    ) -> UserEdit {
        let column_idx = self.column(column);
        let headers = self.rows[0].clone();
        for row in self.rows.iter_mut().skip(1) {
            let cell = |header: &str| {
                headers
                    .iter()
                    .position(|name| name == header)
                    .and_then(|idx| row.get(idx).cloned())
                    .unwrap_or_default()
            };
            if which(&cell) {
                if row.len() <= column_idx {
                    row.resize(column_idx + 1, String::new());
                }
                row[column_idx] = value.to_string();
            }
        }
        self
    }

    /// Sets `column` to `value` in the row whose `key` column holds `key_value`.
    pub fn set(self, key: &str, key_value: &str, column: &str, value: &str) -> UserEdit {
        self.set_where(|cell| cell(key) == key_value, column, value)
    }

    /// Sets `column` to `value` in every data row.
    pub fn set_all(self, column: &str, value: &str) -> UserEdit {
        self.set_where(|_| true, column, value)
    }

    /// Adds a row at the end.
    pub fn add_row(mut self, cells: &[&str]) -> UserEdit {
        self.rows
            .push(cells.iter().map(|cell| cell.to_string()).collect());
        self
    }

    /// The workbook as it will be saved.
    pub fn builder(&self) -> XlsxBuilder {
        let mut builder = XlsxBuilder::new().sheet(&self.sheet);
        for row in &self.rows {
            builder = builder.row(&row.iter().map(String::as_str).collect::<Vec<_>>());
        }
        builder
    }

    /// Saves like Excel: the new content to a temp file beside the original (an extension-less
    /// name, as Excel's are), renamed over it.
    pub fn save(self) {
        let folder = self.path.parent().expect("a folder");
        let temp = folder.join(format!("{:08X}", std::process::id()));
        self.builder().save(&temp);
        std::fs::rename(&temp, &self.path).expect("rename into place");
    }
}

/// The outcome of one run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(output: Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|error| {
            panic!(
                "stdout is not JSON ({error}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    #[track_caller]
    pub fn assert_code(&self, expected: i32) -> &Run {
        assert_eq!(
            self.code, expected,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// A temp folder with a config file, a store and spreadsheets.
/// Whether this run of the suite is the PostgreSQL pass (`FUNNELSYNC_TEST_STORE=postgres`, set
/// by `tests/run`): every scenario's store is then a fresh database on the server
/// `FUNNELSYNC_TEST_POSTGRES` names, instead of a SQLite file in its temp folder.
pub fn on_postgres() -> bool {
    std::env::var("FUNNELSYNC_TEST_STORE").is_ok_and(|store| store == "postgres")
}

/// The URL of the test server's maintenance database (`FUNNELSYNC_TEST_POSTGRES`, exported by
/// `tests/run` after it started a throwaway cluster). `None` outside CI when no server was
/// started; in CI a missing server fails the test instead.
pub fn postgres_server() -> Option<String> {
    match std::env::var("FUNNELSYNC_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "FUNNELSYNC_TEST_POSTGRES is not set: run the tests with tests/run, which starts a throwaway PostgreSQL cluster"
            );
            None
        }
    }
}

/// A fresh, empty database on the test server, dropped with its [`TestDatabase`].
pub struct TestDatabase {
    pub url: String,
    name: String,
    server: String,
}

impl TestDatabase {
    /// Creates one; panics when the server cannot be reached (a PostgreSQL test must fail, not
    /// skip, when its server is missing).
    pub fn create(server: &str) -> TestDatabase {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "funnelsync_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut client =
            postgres::Client::connect(server, postgres::NoTls).unwrap_or_else(|error| {
                panic!("cannot reach the test PostgreSQL server {server}: {error}")
            });
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create the test database");
        let (base, _) = server
            .rsplit_once('/')
            .unwrap_or_else(|| panic!("no database in {server}"));
        let query = server
            .split_once('?')
            .map(|(_, query)| format!("?{query}"))
            .unwrap_or_default();
        TestDatabase {
            url: format!("{base}/{name}{query}"),
            name,
            server: server.to_string(),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.server, postgres::NoTls) {
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

pub struct TestDir {
    pub dir: tempfile::TempDir,
    /// The scenario's store on the PostgreSQL pass; `None` on SQLite.
    pub database: Option<TestDatabase>,
    /// Another scenario's PostgreSQL store this one's daemon shares (a second office).
    shared_url: Option<String>,
    /// `[store] site`, when the scenario names one.
    site: Option<String>,
}

impl TestDir {
    pub fn new() -> TestDir {
        let database = if on_postgres() {
            let server = postgres_server().unwrap_or_else(|| {
                panic!("FUNNELSYNC_TEST_STORE=postgres needs FUNNELSYNC_TEST_POSTGRES (tests/run sets both)")
            });
            Some(TestDatabase::create(&server))
        } else {
            None
        };
        TestDir {
            dir: tempfile::tempdir().expect("temp dir"),
            database,
            shared_url: None,
            site: None,
        }
    }

    /// A scenario on the PostgreSQL pass whose config names this site (`[store] site`).
    pub fn for_site(site: &str) -> TestDir {
        let mut test = TestDir::new();
        test.site = Some(site.to_string());
        test
    }

    /// A second office: its own temp folder (its share, config and logs), the same PostgreSQL
    /// store as `other`, and its own site name.
    pub fn joining(other: &TestDir, site: &str) -> TestDir {
        TestDir {
            dir: tempfile::tempdir().expect("temp dir"),
            database: None,
            shared_url: Some(other.store_url().expect("a PostgreSQL store to share")),
            site: Some(site.to_string()),
        }
    }

    /// The PostgreSQL store's URL; `None` on SQLite.
    pub fn store_url(&self) -> Option<String> {
        self.database
            .as_ref()
            .map(|database| database.url.clone())
            .or_else(|| self.shared_url.clone())
    }

    /// The `[store]` section of this scenario's config: two lines, as tests that count config
    /// lines expect.
    pub fn store_section(&self) -> String {
        let mut section = match self.store_url() {
            Some(url) => format!("[store]\nurl = \"{url}\"\n"),
            None => "[store]\npath = \"state/crm.db\"\n".to_string(),
        };
        if let Some(site) = &self.site {
            section.push_str(&format!("site = \"{site}\"\n"));
        }
        section
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("funnelsync.toml")
    }

    pub fn store_path(&self) -> PathBuf {
        self.path("state/crm.db")
    }

    /// Writes the config: a `[store]` in the temp folder plus the given text.
    pub fn config(&self, sources_and_more: &str) -> &TestDir {
        let text = format!("{}\n{sources_and_more}", self.store_section());
        std::fs::write(self.config_path(), text).expect("write config");
        self
    }

    /// A config with one source on one file.
    pub fn single_source(&self, file: &str, extra: &str) -> &TestDir {
        self.config(&format!(
            "[[sources]]\nname = \"pipeline\"\npath = \"{file}\"\n{extra}\n"
        ))
    }

    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create folder");
        }
        std::fs::write(path, bytes).expect("write file");
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.command_with_config(&self.config_path(), args)
    }

    /// The binary with another config of this scenario (a second store, a second office).
    pub fn command_with_config(&self, config: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(BINARY);
        command
            .current_dir(self.dir.path())
            .env_remove("FUNNELSYNC_CONFIG")
            .env_remove("RUST_LOG")
            .arg("--config")
            .arg(config)
            .args(args);
        command
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from_output(self.command(args).output().expect("run funnelsync"))
    }

    /// [`TestDir::run`] with another config of this scenario.
    pub fn run_with_config(&self, config: &Path, args: &[&str]) -> Run {
        Run::from_output(
            self.command_with_config(config, args)
                .output()
                .expect("run funnelsync"),
        )
    }

    /// Runs the binary and measures its peak memory: the high-water mark of its resident set, in
    /// bytes, as GNU time reports it.
    ///
    /// The figure cannot come from this process's own `wait4`: a child started from here begins
    /// as a copy of (or shares) the test process, and Linux carries that address space's
    /// high-water mark over `exec` into the child's `ru_maxrss`, so the figure would be the test
    /// process's size, large while other tests run. GNU time forks the binary from a process of a
    /// megabyte or two and reports only that child's figure.
    pub fn run_measuring_memory(&self, args: &[&str]) -> (Run, u64) {
        const TIME: &str = "/usr/bin/time";
        assert!(
            std::path::Path::new(TIME).exists(),
            "{TIME} (Debian package time) is needed to measure peak memory; .ci/run installs it"
        );
        let inner = self.command(args);
        let report = self.path(".peak-memory");
        let mut command = Command::new(TIME);
        command
            .arg("--format=%M")
            .arg(format!("--output={}", report.display()))
            .arg(inner.get_program())
            .args(inner.get_args());
        if let Some(directory) = inner.get_current_dir() {
            command.current_dir(directory);
        }
        for (name, value) in inner.get_envs() {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        let run = Run::from_output(command.output().expect("run funnelsync under time"));
        let text = std::fs::read_to_string(&report).expect("time's report");
        // GNU time prints "Command exited with non-zero status N" before the figure when the
        // command fails, and reports the resident set in kilobytes.
        let kilobytes: u64 = text
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .next_back()
            .unwrap_or_else(|| panic!("no figure in time's report: {text:?}"));
        (run, kilobytes * 1024)
    }

    pub fn sync(&self) -> Run {
        self.run(&["sync", "--format", "json"])
    }

    /// Every deal, archived ones included, as `deals list --format json` prints them.
    pub fn deals(&self) -> Vec<Value> {
        let run = self.run(&["deals", "list", "--include-archived", "--format", "json"]);
        run.assert_code(0);
        match run.json() {
            Value::Array(deals) => deals,
            other => panic!("deals list printed {other}"),
        }
    }

    /// The deal whose `field` equals `value`.
    #[track_caller]
    pub fn deal_by(&self, field: &str, value: &str) -> Value {
        let deals = self.deals();
        let matching: Vec<&Value> = deals.iter().filter(|deal| deal[field] == value).collect();
        assert_eq!(
            matching.len(),
            1,
            "expected one deal with {field} = {value}, got {matching:?}"
        );
        matching[0].clone()
    }

    /// Runs SQL on the scenario's store (SQLite or PostgreSQL) and returns every row, each value
    /// as text (`None` for NULL). For checks that look beneath the commands; the SQL must be
    /// what both engines understand.
    #[track_caller]
    pub fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        match self.store_url() {
            Some(url) => {
                let mut client = postgres::Client::connect(&url, postgres::NoTls)
                    .expect("connect to the test database");
                let messages = client
                    .simple_query(sql)
                    .unwrap_or_else(|error| panic!("{sql}: {error}"));
                messages
                    .into_iter()
                    .filter_map(|message| match message {
                        postgres::SimpleQueryMessage::Row(row) => Some(
                            (0..row.len())
                                .map(|column| row.get(column).map(str::to_string))
                                .collect(),
                        ),
                        _ => None,
                    })
                    .collect()
            }
            None => {
                let connection = rusqlite::Connection::open(self.store_path()).expect("open store");
                connection
                    .busy_timeout(std::time::Duration::from_secs(10))
                    .expect("busy timeout");
                let mut statement = connection
                    .prepare(sql)
                    .unwrap_or_else(|error| panic!("{sql}: {error}"));
                let n_columns = statement.column_count();
                let rows = statement
                    .query_map([], |row| {
                        (0..n_columns)
                            .map(|column| {
                                use rusqlite::types::ValueRef;
                                Ok(match row.get_ref(column)? {
                                    ValueRef::Null => None,
                                    ValueRef::Integer(number) => Some(number.to_string()),
                                    ValueRef::Real(number) => Some(number.to_string()),
                                    ValueRef::Text(text) | ValueRef::Blob(text) => {
                                        Some(String::from_utf8_lossy(text).into_owned())
                                    }
                                })
                            })
                            .collect::<rusqlite::Result<Vec<Option<String>>>>()
                    })
                    .unwrap_or_else(|error| panic!("{sql}: {error}"));
                rows.collect::<Result<_, _>>()
                    .unwrap_or_else(|error| panic!("{sql}: {error}"))
            }
        }
    }

    /// The one value a query returns (`None` for NULL or no row).
    #[track_caller]
    pub fn query_value(&self, sql: &str) -> Option<String> {
        self.query(sql)
            .into_iter()
            .next()
            .and_then(|row| row.into_iter().next().flatten())
    }

    /// Runs a statement that changes the store (a test setting the scene).
    #[track_caller]
    pub fn execute(&self, sql: &str) {
        self.query(sql);
    }

    #[track_caller]
    pub fn count(&self, sql: &str) -> i64 {
        let value = self.query_value(sql);
        value
            .as_deref()
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| panic!("{sql}: not a number: {value:?}"))
    }
}

/// The keys of a JSON object, sorted (empty for anything else).
pub fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .map(|object| object.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

impl TestDir {
    /// Every `last_error` of the mail outbox, joined with `|`.
    pub fn outbox_errors(&self) -> String {
        self.query("SELECT coalesce(last_error, '') FROM outbox ORDER BY id")
            .into_iter()
            .map(|row| row.into_iter().next().flatten().unwrap_or_default())
            .collect::<Vec<String>>()
            .join("|")
    }
}

/// A number from the environment (to vary a randomised test), else `default`.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic random source (xorshift), so a failing round can be replayed with the
/// same seed.
pub struct Random(pub u64);

impl Random {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// An index below `len` (0 when `len` is 0).
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Up to `most` random bytes.
    pub fn some_bytes(&mut self, most: usize) -> Vec<u8> {
        let n = self.index(most);
        self.bytes(n)
    }
}

/// The report of the file whose path ends with `name` in `sync --format json` output.
#[track_caller]
pub fn file_report<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["files"]
        .as_array()
        .and_then(|files| {
            files.iter().find(|file| {
                file["file"]
                    .as_str()
                    .is_some_and(|path| path.ends_with(name))
            })
        })
        .unwrap_or_else(|| panic!("no report for {name} in {report}"))
}

/// Waits until `condition` holds, checking every 50 ms; panics with `what` after `timeout`.
#[track_caller]
pub fn wait_until(timeout: std::time::Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A test that cannot run here says so loudly — on the terminal, past the test harness's capture
/// of its output, so a passing run still shows what it did not test — and fails in CI (where
/// `CI` is set), where everything it needs is installed (.ci/run).
#[track_caller]
pub fn skip(test_name: &str, why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test_name} cannot be skipped in CI: {why}"
    );
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n*** SKIPPED {test_name}: {why} ***\n"
    );
}

/// Waits until a later millisecond than now has begun on the wall clock (the store's time stamps
/// have millisecond precision) and on the clock the kernel stamps files with, which is coarser and
/// can lag the wall clock by a tick (up to 10 ms): two changes made either side of this, in the
/// store or in a file, are told apart and come in order.
pub fn next_millisecond() {
    let as_millis = |time: std::time::SystemTime| {
        time.duration_since(std::time::UNIX_EPOCH)
            .map(|since| since.as_millis())
            .unwrap_or(0)
    };
    let now = as_millis(std::time::SystemTime::now());
    // One probe per test thread, so that tests running side by side do not share one.
    let probe = std::env::temp_dir().join(format!(
        "funnelsync-clock-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    for _ in 0..10_000 {
        std::fs::write(&probe, b"tick").expect("write the clock probe");
        let stamped = std::fs::metadata(&probe)
            .and_then(|metadata| metadata.modified())
            .map(as_millis)
            .expect("read the clock probe");
        if stamped > now {
            let _ = std::fs::remove_file(&probe);
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    panic!("files are never stamped after {now} ms");
}

/// A running `funnelsync run`, with a real sd_notify socket to hear what it tells systemd. Killed
/// when dropped.
pub struct Daemon {
    pub child: std::process::Child,
    pub log_path: PathBuf,
    notifications: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl TestDir {
    /// Starts the daemon on this folder's config.
    pub fn start_daemon(&self) -> Daemon {
        self.start_process(&["run"])
    }

    /// Starts the binary with these arguments as a long-running process (`run`, `serve`), with a
    /// notify socket and its log in `daemon.log`.
    pub fn start_process(&self, args: &[&str]) -> Daemon {
        let socket_path = self.path(&format!("notify-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket_path);
        let socket =
            std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("timeout");
        let notifications = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let collected = std::sync::Arc::clone(&notifications);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            loop {
                match socket.recv(&mut buffer) {
                    Ok(n) => collected
                        .lock()
                        .expect("lock")
                        .push(String::from_utf8_lossy(&buffer[..n]).into_owned()),
                    Err(error)
                        if matches!(
                            error.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if std::sync::Arc::strong_count(&collected) == 1 {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let log_path = self.path("daemon.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = self
            .command(args)
            .env("RUST_LOG", "funnelsync=debug")
            .env("NOTIFY_SOCKET", &socket_path)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start daemon");
        Daemon {
            child,
            log_path,
            notifications,
        }
    }
}

impl Daemon {
    pub fn notifications(&self) -> Vec<String> {
        self.notifications.lock().expect("lock").clone()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// How many lines of the log contain `text`.
    pub fn log_count(&self, text: &str) -> usize {
        self.log()
            .lines()
            .filter(|line| line.contains(text))
            .count()
    }

    /// Waits until the daemon has looked at every source file `n` more times (each rescan logs
    /// one line), so that whatever a rescan would do has had its chances.
    #[track_caller]
    pub fn wait_rescans(&self, n: usize) {
        let target = self.log_count("rescanned the sources") + n;
        wait_until(std::time::Duration::from_secs(20), "the rescans", || {
            self.log_count("rescanned the sources") >= target
        });
    }

    /// Waits for READY=1 (sent after the first scan's syncs), up to 20 s.
    #[track_caller]
    pub fn wait_ready(&self) {
        self.wait_ready_within(std::time::Duration::from_secs(20));
    }

    /// Waits for READY=1 up to `timeout` (a first scan of many files takes longer).
    #[track_caller]
    pub fn wait_ready_within(&self, timeout: std::time::Duration) {
        wait_until(timeout, "READY=1", || {
            self.notifications()
                .iter()
                .any(|message| message.lines().any(|line| line == "READY=1"))
        });
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cells of a sheet of a real .xlsx file, read back with calamine, as text by (row, column)
/// from 0, and the formulas by the same positions.
pub struct ReadBack {
    pub values: Vec<Vec<String>>,
    pub formulas: std::collections::HashMap<(usize, usize), String>,
    pub sheet_names: Vec<String>,
}

impl ReadBack {
    /// The text of the cell in the column with this header (header on the first row that has it).
    #[track_caller]
    pub fn column(&self, header: &str) -> Vec<String> {
        let (header_row, column) = self
            .values
            .iter()
            .enumerate()
            .find_map(|(row_idx, row)| {
                row.iter()
                    .position(|cell| cell == header)
                    .map(|column| (row_idx, column))
            })
            .unwrap_or_else(|| panic!("no column {header} in {:?}", self.values));
        self.values
            .iter()
            .skip(header_row + 1)
            .map(|row| row.get(column).cloned().unwrap_or_default())
            .collect()
    }
}

pub fn read_xlsx(path: &Path, sheet: &str) -> ReadBack {
    use calamine::Reader;
    let mut workbook: calamine::Xlsx<_> = calamine::open_workbook(path).expect("open xlsx");
    let sheet_names = workbook.sheet_names();
    let range = workbook.worksheet_range(sheet).expect("sheet");
    let (start_row, start_column) = range.start().unwrap_or((0, 0));
    let (end_row, end_column) = range.end().unwrap_or((0, 0));
    let mut values = vec![vec![String::new(); end_column as usize + 1]; end_row as usize + 1];
    for (row, column, value) in range.used_cells() {
        let text = match value {
            calamine::Data::DateTime(datetime) => datetime
                .as_datetime()
                .map(|at| at.date().to_string())
                .unwrap_or_default(),
            other => other.to_string(),
        };
        values[start_row as usize + row][start_column as usize + column] = text;
    }
    let formula_range = workbook.worksheet_formula(sheet).expect("formulas");
    let (start_row, start_column) = formula_range.start().unwrap_or((0, 0));
    let mut formulas = std::collections::HashMap::new();
    for (row, column, formula) in formula_range.used_cells() {
        if !formula.is_empty() {
            formulas.insert(
                (start_row as usize + row, start_column as usize + column),
                formula.clone(),
            );
        }
    }
    ReadBack {
        values,
        formulas,
        sheet_names,
    }
}

/// A message the test SMTP server accepted.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    pub to: Vec<String>,
    pub raw: Vec<u8>,
}

impl ReceivedMail {
    pub fn subject(&self) -> String {
        let parsed = mailparse::parse_mail(&self.raw).expect("parse mail");
        use mailparse::MailHeaderMap;
        parsed
            .headers
            .get_first_value("Subject")
            .unwrap_or_default()
    }

    /// The decoded text/plain and text/html parts.
    pub fn bodies(&self) -> (String, String) {
        fn walk(part: &mailparse::ParsedMail<'_>, text: &mut String, html: &mut String) {
            match part.ctype.mimetype.as_str() {
                "text/plain" => *text = part.get_body().unwrap_or_default(),
                "text/html" => *html = part.get_body().unwrap_or_default(),
                _ => {}
            }
            for subpart in &part.subparts {
                walk(subpart, text, html);
            }
        }
        let parsed = mailparse::parse_mail(&self.raw).expect("parse mail");
        let mut text = String::new();
        let mut html = String::new();
        walk(&parsed, &mut text, &mut html);
        (text, html)
    }

    pub fn header_names(&self) -> Vec<String> {
        let parsed = mailparse::parse_mail(&self.raw).expect("parse mail");
        parsed
            .headers
            .iter()
            .map(|header| header.get_key().to_lowercase())
            .collect()
    }
}

#[derive(Clone)]
struct SmtpHandler {
    messages: std::sync::Arc<std::sync::Mutex<Vec<ReceivedMail>>>,
    refuse: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The reply code of a refusal: 451 (try later) or 550 (never).
    refuse_code: u16,
    to: Vec<String>,
    data: Vec<u8>,
}

impl mailin_embedded::Handler for SmtpHandler {
    fn data_start(
        &mut self,
        _domain: &str,
        _from: &str,
        _is8bit: bool,
        to: &[String],
    ) -> mailin_embedded::Response {
        self.to = to.to_vec();
        self.data.clear();
        mailin_embedded::response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.data.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> mailin_embedded::Response {
        use std::sync::atomic::Ordering;
        let refused = self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if refused {
            let mut response = mailin_embedded::Response::custom(
                self.refuse_code,
                "the test server says no".to_string(),
            );
            // mailin stays in its DATA state after an error reply to the end of the data; a real
            // server (Postfix, aiosmtpd) is ready for the next command, as it is with this flag.
            response.is_error = false;
            return response;
        }
        self.messages.lock().expect("lock").push(ReceivedMail {
            to: self.to.clone(),
            raw: self.data.clone(),
        });
        mailin_embedded::response::OK
    }
}

/// A real SMTP server on loopback, in this test process, that keeps what it receives and can
/// refuse the first few messages with a temporary error.
pub struct SmtpServer {
    pub port: u16,
    messages: std::sync::Arc<std::sync::Mutex<Vec<ReceivedMail>>>,
}

impl SmtpServer {
    /// A server that refuses its first `refuse_first` messages with a temporary error (451).
    pub fn start(refuse_first: usize) -> SmtpServer {
        SmtpServer::start_refusing(refuse_first, 451)
    }

    /// A server that refuses its first `refuse_first` messages, at the end of their data, with
    /// this reply code.
    pub fn start_refusing(refuse_first: usize, refuse_code: u16) -> SmtpServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind smtp");
        let port = listener.local_addr().expect("address").port();
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let handler = SmtpHandler {
            messages: std::sync::Arc::clone(&messages),
            refuse: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(refuse_first)),
            refuse_code,
            to: Vec::new(),
            data: Vec::new(),
        };
        let mut server = mailin_embedded::Server::new(handler);
        server.with_name("test.local").with_tcp_listener(listener);
        // serve() never returns; the thread ends with the test process.
        std::thread::spawn(move || {
            let _ = server.serve();
        });
        SmtpServer { port, messages }
    }

    pub fn messages(&self) -> Vec<ReceivedMail> {
        self.messages.lock().expect("lock").clone()
    }

    pub fn to(&self, address: &str) -> Vec<ReceivedMail> {
        self.messages()
            .into_iter()
            .filter(|mail| mail.to.iter().any(|to| to.contains(address)))
            .collect()
    }
}

/// A port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// A user of `[http]` made with `funnelsync token new`: their token and config lines.
#[derive(Debug, Clone)]
pub struct HttpUser {
    pub token: String,
    pub config_lines: String,
}

impl TestDir {
    /// Runs `funnelsync token new NAME --role ROLE [--rep REP]` and keeps what it printed.
    pub fn token(&self, name: &str, role: &str, rep: Option<&str>) -> HttpUser {
        let mut args = vec!["token", "new", name, "--role", role];
        if let Some(rep) = rep {
            args.extend(["--rep", rep]);
        }
        let run = self.run(&args);
        run.assert_code(0);
        let token = run.stdout.lines().next().expect("a token line").to_string();
        let config_lines = run
            .stdout
            .lines()
            .skip_while(|line| !line.starts_with("[[http.users]]"))
            .collect::<Vec<_>>()
            .join("\n");
        HttpUser {
            token,
            config_lines,
        }
    }

    /// A config with one source on `file` and `[http]` on a free port of 127.0.0.1 (plus
    /// `http_extra` lines) for these users; returns the port.
    pub fn http_source(&self, file: &str, http_extra: &str, users: &[&HttpUser]) -> u16 {
        let port = free_port();
        let users: Vec<&str> = users
            .iter()
            .map(|user| user.config_lines.as_str())
            .collect();
        self.single_source(
            file,
            &format!(
                "\n[http]\nlisten = \"127.0.0.1:{port}\"\n{http_extra}\n\n{}\n",
                users.join("\n\n")
            ),
        );
        port
    }

    /// Starts `funnelsync ARGS` (run or serve) and waits until its `/healthz` answers 200.
    #[track_caller]
    pub fn start_serving(&self, args: &[&str], port: u16) -> (Daemon, Http) {
        let daemon = self.start_process(args);
        let http = Http::new(port);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if http.answers_healthy() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/healthz did not answer 200 in 30 s; log:\n{}",
                daemon.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        (daemon, http)
    }
}

/// An HTTP reply: status, headers (names in lower case) and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {} {}", self.status, self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    #[track_caller]
    pub fn assert_status(&self, expected: u16) -> &Reply {
        assert_eq!(self.status, expected, "status; body: {}", self.body);
        self
    }
}

/// A client for the server on 127.0.0.1:PORT (statuses are answers, not errors).
pub struct Http {
    pub base: String,
    agent: ureq::Agent,
}

impl Http {
    pub fn new(port: u16) -> Http {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build()
            .into();
        Http {
            base: format!("http://127.0.0.1:{port}"),
            agent,
        }
    }

    fn reply(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        let mut response = result.expect("HTTP request");
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_string(),
                    value.to_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let body = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .unwrap_or_default();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// Whether `/healthz` answers 200 (false while nothing listens yet).
    pub fn answers_healthy(&self) -> bool {
        self.agent
            .get(format!("{}/healthz", self.base))
            .call()
            .is_ok_and(|response| response.status().as_u16() == 200)
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.get_with(path, token, &[])
    }

    pub fn get_with(&self, path: &str, token: Option<&str>, headers: &[(&str, &str)]) -> Reply {
        let mut request = self.agent.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Http::reply(request.call())
    }

    /// A request with a body (POST, PATCH), with extra headers such as If-Match.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: impl AsRef<[u8]>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut builder = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("Content-Type", content_type);
        if let Some(token) = token {
            builder = builder.header("Authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(body.as_ref().to_vec()).expect("request");
        Http::reply(self.agent.run(request))
    }

    /// Sends a request whose body the server may refuse before reading it (413 on its
    /// Content-Length), as curl or a browser would: the body is written on another thread while
    /// the reply is read, and a write the server cut short is not an error. (A client that writes
    /// the whole body first, as `send` does, gets a broken pipe instead of the reply whenever the
    /// body outgrows the socket buffers.)
    pub fn send_streaming(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Reply {
        use std::io::{Read, Write};
        let address = self.base.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(address).expect("connect");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .expect("read timeout");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        if let Some(token) = token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        head.push_str("\r\n");
        let mut writer = stream.try_clone().expect("clone stream");
        let writing = std::thread::spawn(move || {
            // The server may answer and close before reading it all: the write then fails.
            let _ = writer
                .write_all(head.as_bytes())
                .and_then(|()| writer.write_all(&body));
        });
        let mut raw = Vec::new();
        let mut buffer = [0u8; 8192];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buffer[..n]),
                // A reset after the reply arrived (the server closed with body bytes unread).
                Err(error)
                    if !raw.is_empty() && error.kind() == std::io::ErrorKind::ConnectionReset =>
                {
                    break
                }
                Err(error) => panic!("reading the reply: {error}"),
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let _ = writing.join();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no reply head: {text:?}"));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {head:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
        let body = if chunked {
            let mut decoded = String::new();
            let mut rest = body;
            while let Some((size, after)) = rest.split_once("\r\n") {
                let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                if size == 0 || after.len() < size {
                    break;
                }
                decoded.push_str(&after[..size]);
                rest = after[size..].trim_start_matches("\r\n");
            }
            decoded
        } else {
            body.to_string()
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    /// Logs in on the pages with a token; returns the session cookie (`name=value`).
    #[track_caller]
    pub fn log_in(&self, token: &str) -> String {
        let login = self.send(
            "POST",
            "/login",
            None,
            "application/x-www-form-urlencoded",
            format!("token={token}"),
            &[],
        );
        login
            .header("set-cookie")
            .and_then(|cookie| cookie.split(';').next())
            .unwrap_or_else(|| panic!("no session cookie: {} {}", login.status, login.body))
            .to_string()
    }

    /// JSON to the API with a token.
    pub fn json(&self, method: &str, path: &str, token: &str, body: &Value) -> Reply {
        self.send(
            method,
            path,
            Some(token),
            "application/json",
            body.to_string(),
            &[],
        )
    }
}

/// A certificate authority made for one test, and server certificates it signs.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The authority's certificate, PEM: what a client that trusts it is given.
    pub pem: String,
}

/// A server's certificate and key, PEM.
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().expect("a CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let certificate = params.self_signed(&key).expect("the CA certificate");
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            pem: certificate.pem(),
        }
    }

    /// A server certificate for these host names, signed by this authority.
    pub fn server_cert(&self, names: &[&str]) -> ServerCert {
        let key = rcgen::KeyPair::generate().expect("a server key");
        let mut params = rcgen::CertificateParams::new(
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>(),
        )
        .expect("server params");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        let certificate = params
            .signed_by(&key, &self.issuer)
            .expect("the server certificate");
        ServerCert {
            cert_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A throwaway PostgreSQL cluster of a test's own, started from the server binaries the machine
/// has (`/usr/lib/postgresql/<version>/bin`) — as the `postgres` user when the tests run as root,
/// since PostgreSQL refuses to run as root — on 127.0.0.1 and a free port, with password
/// (`scram-sha-256`) authentication over TCP and, when given a certificate, `ssl = on` and TCP
/// connections refused without TLS (`hostssl`). The Unix socket in its folder trusts the local
/// `postgres` superuser, for setting the scene. Stopped and removed when dropped.
pub struct TestCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

/// The server binaries' folder, newest version first; `None` when PostgreSQL is not installed.
fn postgres_bin() -> Option<PathBuf> {
    let mut folders: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path().join("bin")))
        .filter(|bin| bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
        .collect();
    folders.sort_by_key(|bin| {
        bin.parent()
            .and_then(|version| version.file_name())
            .and_then(|version| version.to_str())
            .and_then(|version| version.parse::<u32>().ok())
            .unwrap_or(0)
    });
    folders.pop()
}

impl TestCluster {
    /// Starts one; `None` (after [`skip`], which fails in CI) when there are no server binaries.
    pub fn start(test_name: &str, tls: Option<&ServerCert>) -> Option<TestCluster> {
        let Some(bin) = postgres_bin() else {
            skip(
                test_name,
                "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (install postgresql)",
            );
            return None;
        };
        use std::os::unix::fs::PermissionsExt;
        let as_postgres = rustix::process::geteuid().is_root();
        let dir = tempfile::Builder::new()
            .prefix("fs-pg-")
            .tempdir()
            .expect("cluster folder");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("cluster folder mode");
        let mut cluster = TestCluster {
            dir,
            bin,
            port: 0,
            as_postgres,
        };
        cluster.give_to_server(cluster.dir.path());
        let data = cluster.path("data");
        let initdb = cluster
            .server_command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .output()
            .expect("run initdb");
        assert!(
            initdb.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let host_line = if tls.is_some() { "hostssl" } else { "host" };
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all all trust\n{host_line} all all 127.0.0.1/32 scram-sha-256\n"),
        )
        .expect("pg_hba.conf");
        let mut options = format!(
            "-c listen_addresses=127.0.0.1 -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            cluster.dir.path().display()
        );
        if let Some(tls) = tls {
            let (cert, key) = (cluster.path("server.crt"), cluster.path("server.key"));
            std::fs::write(&cert, &tls.cert_pem).expect("server certificate");
            std::fs::write(&key, &tls.key_pem).expect("server key");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .expect("key mode");
            cluster.give_to_server(&cert);
            cluster.give_to_server(&key);
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            ));
        }
        cluster.give_to_server(&data.join("pg_hba.conf"));
        for _ in 0..8 {
            let port = free_port();
            let started = cluster
                .server_command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(cluster.path("server.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(format!("{options} -p {port}"))
                .arg("start")
                .output()
                .expect("run pg_ctl");
            if started.status.success() {
                cluster.port = port;
                return Some(cluster);
            }
        }
        panic!(
            "the test cluster did not start: {}",
            std::fs::read_to_string(cluster.path("server.log")).unwrap_or_default()
        );
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A server binary, run as the `postgres` user when the tests run as root.
    fn server_command(&self, program: &str) -> Command {
        let binary = self.bin.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(binary);
            command
        } else {
            Command::new(binary)
        }
    }

    /// Hands a file or folder to the user the server runs as.
    fn give_to_server(&self, path: &Path) {
        if !self.as_postgres {
            return;
        }
        let id = |flag: &str| -> u32 {
            let output = Command::new("id")
                .args([flag, "postgres"])
                .output()
                .expect("run id");
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("no `postgres` user to run the test cluster as"))
        };
        std::os::unix::fs::chown(path, Some(id("-u")), Some(id("-g"))).expect("chown");
    }

    /// The superuser over the cluster's Unix socket (trusted), on `database`.
    pub fn admin(&self, database: &str) -> postgres::Client {
        postgres::Client::connect(
            &format!(
                "host={} port={} user=postgres dbname={database}",
                self.dir.path().display(),
                self.port
            ),
            postgres::NoTls,
        )
        .expect("the test cluster's superuser")
    }

    /// A login role with this password, owning a new database of the same name.
    pub fn create_login(&self, name: &str, password: &str) {
        let mut admin = self.admin("postgres");
        // Two statements: CREATE DATABASE cannot run in the transaction a batch is.
        admin
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN PASSWORD '{}'",
                password.replace('\'', "''")
            ))
            .expect("create the login");
        admin
            .batch_execute(&format!("CREATE DATABASE {name} OWNER {name}"))
            .expect("create its database");
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if self.port != 0 {
            let _ = self
                .server_command("pg_ctl")
                .arg("-D")
                .arg(self.path("data"))
                .args(["-m", "immediate", "stop"])
                .output();
        }
    }
}
