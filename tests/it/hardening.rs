//! A shared drive is hostile ground: scenarios from probing funnelsync as someone with write
//! access to the share (symbolic links, foreign folders, huge cells, formula text) and as an admin
//! would configure it (owners and modes, secrets, durations).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::harness::{file_report, TestDir};

/// The uid and gid of `nobody`/`nogroup` on Linux: someone who is not the service user.
const NOBODY: u32 = 65_534;

/// Whether the test may change owners (it runs as root). Elsewhere the test is skipped, except in
/// CI, where it must run.
fn running_as_root(test_name: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    crate::harness::skip(test_name, "it changes file owners and needs root");
    false
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o7777
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A CSV pipeline whose rows have no CRM ID yet, so the first sync writes the file back.
fn leads_csv(companies: &[&str]) -> String {
    let mut text = String::from("Company,Stage\r\n");
    for company in companies {
        text.push_str(&format!("{company},Lead\r\n"));
    }
    text
}

fn write_back_of(report: &serde_json::Value, name: &str) -> (String, String) {
    let write_back = &file_report(report, name)["write_back"];
    (
        write_back["status"].as_str().unwrap_or("").to_string(),
        write_back["message"].as_str().unwrap_or("").to_string(),
    )
}

fn names_in(folder: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(folder)
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

#[test]
fn a_symlinked_backup_folder_is_refused_and_nothing_outside_the_share_changes() {
    let test = TestDir::new();
    std::fs::create_dir_all(test.path("share/.funnelsync")).expect("share");
    test.write("victim/a.1-important.csv", "keep");
    std::os::unix::fs::symlink(test.path("victim"), test.path("share/.funnelsync/backups"))
        .expect("link");
    test.write("share/a.csv", leads_csv(&["Acme"]));
    test.config("[[sources]]\nname = \"share\"\npath = \"share/a.csv\"\nbackups = 1\n");
    let report = test.sync().json();
    let (status, message) = write_back_of(&report, "a.csv");
    assert_eq!(status, "failed", "{report}");
    assert!(
        message.contains("backup") && message.contains("symbolic link"),
        "the message says the backup failed and why: {message}"
    );
    assert_eq!(names_in(&test.path("victim")), vec!["a.1-important.csv"]);
    assert_eq!(
        std::fs::read_to_string(test.path("victim/a.1-important.csv")).expect("victim"),
        "keep"
    );
    assert_eq!(
        std::fs::read_to_string(test.path("share/a.csv")).expect("file"),
        leads_csv(&["Acme"]),
        "without its backup the file is not rewritten"
    );
    assert_eq!(test.deals().len(), 1, "the rows themselves were synced");

    // A symlinked `.funnelsync` is refused the same way.
    std::fs::remove_dir_all(test.path("share/.funnelsync")).expect("remove");
    std::os::unix::fs::symlink(test.path("victim"), test.path("share/.funnelsync")).expect("link");
    std::fs::create_dir_all(test.path("victim/backups")).expect("victim backups");
    let report = test.sync().json();
    let (status, message) = write_back_of(&report, "a.csv");
    assert_eq!(status, "failed", "{report}");
    assert!(message.contains("symbolic link"), "{message}");
    assert!(names_in(&test.path("victim/backups")).is_empty());
}

#[test]
fn backup_folders_others_could_write_to_are_closed_to_them_before_a_backup_goes_in() {
    let test = TestDir::new();
    std::fs::create_dir_all(test.path("share/.funnelsync/backups")).expect("folders");
    chmod(&test.path("share/.funnelsync"), 0o777);
    chmod(&test.path("share/.funnelsync/backups"), 0o775);
    test.write("share/a.csv", leads_csv(&["Acme"]));
    test.config("[[sources]]\nname = \"share\"\npath = \"share/a.csv\"\n");
    let run = test.sync();
    let report = run.json();
    assert_eq!(write_back_of(&report, "a.csv").0, "written", "{report}");
    assert_eq!(mode_of(&test.path("share/.funnelsync")), 0o755);
    assert_eq!(mode_of(&test.path("share/.funnelsync/backups")), 0o755);
    assert_eq!(names_in(&test.path("share/.funnelsync/backups")).len(), 1);
    assert!(
        run.stderr
            .contains("could be written by other users (mode 0777)")
            && run
                .stderr
                .contains("could be written by other users (mode 0775)"),
        "the admin is told: {}",
        run.stderr
    );
}

#[test]
fn a_backup_folder_owned_by_someone_else_is_refused() {
    if !running_as_root("a_backup_folder_owned_by_someone_else_is_refused") {
        return;
    }
    let test = TestDir::new();
    std::fs::create_dir_all(test.path("share/.funnelsync/backups")).expect("folders");
    chown(&test.path("share/.funnelsync"), NOBODY, NOBODY);
    test.write("share/a.csv", leads_csv(&["Acme"]));
    test.config("[[sources]]\nname = \"share\"\npath = \"share/a.csv\"\n");
    let report = test.sync().json();
    let (status, message) = write_back_of(&report, "a.csv");
    assert_eq!(status, "failed", "{report}");
    assert!(
        message.contains("backup") && message.contains("not by the service user"),
        "{message}"
    );
    assert!(names_in(&test.path("share/.funnelsync/backups")).is_empty());

    // Once the admin gives the folder back to the service, the write goes through.
    chown(&test.path("share/.funnelsync"), 0, 0);
    let report = test.sync().json();
    assert_eq!(write_back_of(&report, "a.csv").0, "written", "{report}");
    assert_eq!(names_in(&test.path("share/.funnelsync/backups")).len(), 1);
}

#[test]
fn the_admin_is_alerted_when_backups_are_refused() {
    use std::time::Duration;
    let smtp = crate::harness::SmtpServer::start(0);
    let test = TestDir::new();
    std::fs::create_dir_all(test.path("share/.funnelsync")).expect("share");
    std::fs::create_dir_all(test.path("victim")).expect("victim");
    std::os::unix::fs::symlink(test.path("victim"), test.path("share/.funnelsync/backups"))
        .expect("link");
    test.write("share/a.csv", leads_csv(&["Acme"]));
    test.config(&format!(
        "[watch]\nsettle = \"200ms\"\n\n[alerts]\nto = \"it@example.com\"\n\n[smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"funnelsync@example.com\"\n\n[[sources]]\nname = \"share\"\npath = \"share\"\n",
        smtp.port
    ));
    let daemon = test.start_daemon();
    daemon.wait_ready();
    crate::harness::wait_until(Duration::from_secs(15), "the alert", || {
        !smtp.to("it@example.com").is_empty()
    });
    let alert = &smtp.to("it@example.com")[0];
    assert_eq!(alert.subject(), "funnelsync: a.csv cannot be written back");
    let body = alert.bodies().0;
    assert!(
        body.contains("backup") && body.contains("symbolic link"),
        "{body}"
    );
    assert!(
        names_in(&test.path("victim")).is_empty(),
        "{}",
        daemon.log()
    );
}

#[test]
fn write_back_keeps_owner_group_and_mode_and_drops_setuid() {
    if !running_as_root("write_back_keeps_owner_group_and_mode_and_drops_setuid") {
        return;
    }
    let test = TestDir::new();
    test.write("share/private.csv", leads_csv(&["Acme"]));
    test.write("share/team.csv", leads_csv(&["Beta"]));
    test.write("share/setuid.csv", leads_csv(&["Gamma"]));
    chown(&test.path("share/private.csv"), NOBODY, NOBODY);
    chmod(&test.path("share/private.csv"), 0o600);
    chown(&test.path("share/team.csv"), 0, 100);
    chmod(&test.path("share/team.csv"), 0o660);
    chmod(&test.path("share/setuid.csv"), 0o6755);
    test.config("[[sources]]\nname = \"share\"\npath = \"share\"\nbackups = 2\n");
    let report = test.sync().json();
    for name in ["private.csv", "team.csv", "setuid.csv"] {
        assert_eq!(write_back_of(&report, name).0, "written", "{report}");
    }
    let private = std::fs::metadata(test.path("share/private.csv")).expect("private");
    assert_eq!((private.uid(), private.gid()), (NOBODY, NOBODY));
    assert_eq!(mode_of(&test.path("share/private.csv")), 0o600);
    let team = std::fs::metadata(test.path("share/team.csv")).expect("team");
    assert_eq!(team.gid(), 100, "a group-shared file keeps its group");
    assert_eq!(mode_of(&test.path("share/team.csv")), 0o660);
    assert_eq!(
        mode_of(&test.path("share/setuid.csv")),
        0o755,
        "set-user-ID and set-group-ID bits are never copied"
    );
    assert!(std::fs::read_to_string(test.path("share/private.csv"))
        .expect("read")
        .contains("CRM ID"));

    // The backups are no more readable than the files they copy.
    let backups = test.path("share/.funnelsync/backups");
    for entry in std::fs::read_dir(&backups).expect("backups") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let metadata = std::fs::metadata(&path).expect("backup");
        if name.starts_with("private.") {
            assert_eq!((metadata.uid(), metadata.gid()), (NOBODY, NOBODY), "{name}");
            assert_eq!(mode_of(&path), 0o600, "{name}");
        } else if name.starts_with("team.") {
            assert_eq!(metadata.gid(), 100, "{name}");
            assert_eq!(mode_of(&path), 0o660, "{name}");
        } else {
            assert_eq!(mode_of(&path), 0o755, "{name}");
        }
    }
    // Each file was written at least once (the second pass of `sync` writes again the files that
    // other files' new deals reached).
    assert!(names_in(&backups).len() >= 3);
}

#[test]
fn one_files_backup_rotation_never_touches_anothers() {
    let test = TestDir::new();
    test.write("share/q.csv", leads_csv(&["Acme"]));
    test.write("share/q.2025.csv", leads_csv(&["Beta"]));
    // A partial backup left by an interrupted write has a temp name and never counts.
    test.write(
        "share/.funnelsync/backups/.~funnelsync-q.csv.0000000000000000.tmp",
        "Compa",
    );
    test.config("[[sources]]\nname = \"share\"\npath = \"share\"\nbackups = 1\n");
    test.sync().assert_code(0);
    for round in 0..3 {
        let id = test.deal_by("company", "Acme")["id"].to_string();
        test.run(&["deals", "set", &id, &format!("amount={}", 100 + round)])
            .assert_code(0);
        let id = test.deal_by("company", "Beta")["id"].to_string();
        test.run(&["deals", "set", &id, &format!("amount={}", 200 + round)])
            .assert_code(0);
        // Backups are named to the millisecond.
        crate::harness::next_millisecond();
        test.sync().assert_code(0);
    }
    let names = names_in(&test.path("share/.funnelsync/backups"));
    // NAME.STAMP.EXT with a 20-character stamp such as 20261128T101010.123Z.
    let backups_of = |stem: &str| {
        names
            .iter()
            .filter(|name| {
                name.starts_with(&format!("{stem}."))
                    && name.ends_with(".csv")
                    && name.len() == stem.len() + 1 + 20 + 4
            })
            .count()
    };
    let (of_q, of_q2025) = (backups_of("q"), backups_of("q.2025"));
    assert_eq!(
        (of_q, of_q2025),
        (1, 1),
        "each file keeps its own last backup: {names:?}"
    );
    assert!(
        names
            .iter()
            .any(|name| name.starts_with(".~funnelsync-q.csv.")),
        "a temp file is not a backup, so the rotation leaves it: {names:?}"
    );
}

#[test]
fn csv_write_back_keeps_every_formula_escape() {
    let test = TestDir::new();
    // A rep typed a DDE payload as text (Excel saves it with the apostrophe), and a tab-led note.
    test.write(
        "p.csv",
        "Company,Stage,Amount,Notes\r\nAcme,Lead,-500,'=cmd|' /C calc'!A0\r\nBeta,Lead,100,'@SUM(A1)\r\n",
    );
    test.single_source("p.csv", "");
    let report = test.sync();
    report.assert_code(0);
    assert_eq!(write_back_of(&report.json(), "p.csv").0, "written");
    let acme = test.deal_by("company", "Acme");
    assert_eq!(
        acme["extra"]["Notes"], "=cmd|' /C calc'!A0",
        "read without its escape"
    );
    assert_eq!(acme["amount"], -500.0);
    let check = |when: &str| {
        let text = std::fs::read_to_string(test.path("p.csv")).expect("csv");
        for line in text.lines() {
            for field in line.split(',') {
                let live = field.starts_with(['=', '+', '@', '\t', '\r'])
                    || (field.starts_with('-') && field != "-500");
                assert!(!live, "{when}: a live formula in {line:?}\n{text}");
            }
        }
        assert!(text.contains("'=cmd|' /C calc'!A0"), "{when}:\n{text}");
        assert!(text.contains("'@SUM(A1)"), "{when}:\n{text}");
        assert!(
            text.contains(",-500,"),
            "{when}: a negative number is not text:\n{text}"
        );
    };
    check("first write-back");

    // Values from the store keep their escape on every later write-back too.
    let id = acme["id"].to_string();
    test.run(&["deals", "set", &id, "next_step=+1+1", "company=-Acme"])
        .assert_code(0);
    test.sync().assert_code(0);
    check("second write-back");
    let beta = test.deal_by("company", "Beta")["id"].to_string();
    test.run(&["deals", "set", &beta, "amount=200"])
        .assert_code(0);
    test.sync().assert_code(0);
    check("third write-back");
    let text = std::fs::read_to_string(test.path("p.csv")).expect("csv");
    assert!(text.contains("'-Acme"), "{text}");

    // Reading the file back changes nothing: every value round-trips.
    let report = test.sync().json();
    assert_eq!(
        file_report(&report, "p.csv")["counts"]["updated"],
        0,
        "{report}"
    );
    let acme = test.deal_by("company", "-Acme");
    assert_eq!(acme["extra"]["Notes"], "=cmd|' /C calc'!A0");
}

/// The `status --format json` entry whose file ends with `name`, if any.
fn status_of(test: &TestDir, name: &str) -> Option<serde_json::Value> {
    test.run(&["status", "--format", "json"])
        .json()
        .as_array()
        .and_then(|files| {
            files
                .iter()
                .find(|file| {
                    file["file"]
                        .as_str()
                        .is_some_and(|file| file.ends_with(name))
                })
                .cloned()
        })
}

#[test]
fn a_symlink_in_a_watched_folder_is_not_a_source() {
    let test = TestDir::new();
    test.write("private/hr.csv", "Company,Stage\r\nSalary Review,Lead\r\n");
    test.write("share/real.csv", leads_csv(&["Acme"]));
    std::os::unix::fs::symlink(test.path("private/hr.csv"), test.path("share/leads.csv"))
        .expect("link");
    test.config("[[sources]]\nname = \"share\"\npath = \"share\"\n");
    let run = test.sync();
    run.assert_code(0);
    assert!(
        run.stderr.contains("symbolic link"),
        "logged: {}",
        run.stderr
    );
    let companies: Vec<String> = test
        .deals()
        .iter()
        .map(|deal| deal["company"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        companies,
        vec!["Acme"],
        "the private rows were not imported"
    );
    assert!(std::fs::symlink_metadata(test.path("share/leads.csv"))
        .expect("link")
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_to_string(test.path("private/hr.csv")).expect("hr"),
        "Company,Stage\r\nSalary Review,Lead\r\n"
    );
    let real = std::fs::read_to_string(test.path("share/real.csv")).expect("real");
    assert!(!real.contains("Salary"), "{real}");

    let status = status_of(&test, "share/leads.csv").expect("the link is shown by status");
    assert_eq!(status["state"], "ignored", "{status}");
    assert!(
        status["last_message"]
            .as_str()
            .is_some_and(|message| message.contains("symbolic link")),
        "{status}"
    );
    let all = test.run(&["status"]).stdout;
    assert!(
        !all.contains("private"),
        "no row is named by the link's target:\n{all}"
    );
    assert!(
        all.contains("ignored") && all.contains("symbolic link"),
        "{all}"
    );

    // Once the link is gone, so is its line in `status`.
    std::fs::remove_file(test.path("share/leads.csv")).expect("unlink");
    test.sync().assert_code(0);
    assert!(status_of(&test, "share/leads.csv").is_none());
}

#[test]
fn follow_symlinks_reads_links_inside_the_folder_only_and_never_writes_through_them() {
    let test = TestDir::new();
    test.write("private/hr.csv", "Company,Stage\r\nSalary Review,Lead\r\n");
    test.write("share/archive/q1.csv", leads_csv(&["Acme"]));
    std::os::unix::fs::symlink(
        test.path("share/archive/q1.csv"),
        test.path("share/current.csv"),
    )
    .expect("link inside");
    std::os::unix::fs::symlink(test.path("private/hr.csv"), test.path("share/leads.csv"))
        .expect("link outside");
    test.config("[[sources]]\nname = \"share\"\npath = \"share\"\nfollow_symlinks = true\n");
    let report = test.sync();
    report.assert_code(0);
    let report = report.json();
    let current = file_report(&report, "share/current.csv");
    assert_eq!(current["counts"]["created"], 1, "{report}");
    assert_eq!(
        current["write_back"]["status"], "off",
        "a followed link is read-only"
    );
    assert_eq!(
        test.deals().len(),
        1,
        "the link out of the folder is not followed"
    );
    assert_eq!(
        status_of(&test, "share/leads.csv").expect("noted")["state"],
        "ignored"
    );

    // A change in the store does not turn the link into a file, nor rewrite its target.
    let id = test.deal_by("company", "Acme")["id"].to_string();
    test.run(&["deals", "set", &id, "stage=Won"]).assert_code(0);
    test.sync().assert_code(0);
    assert!(std::fs::symlink_metadata(test.path("share/current.csv"))
        .expect("link")
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_to_string(test.path("share/archive/q1.csv")).expect("target"),
        leads_csv(&["Acme"])
    );
    assert!(
        !test.path("share/.funnelsync").exists(),
        "nothing was backed up or written"
    );
    let all = test.run(&["status", "--format", "json"]).stdout;
    assert!(
        !all.contains("archive"),
        "rows are named by the link, not its target:\n{all}"
    );
}

#[test]
fn the_daemon_logs_a_link_that_is_not_a_source_once() {
    use std::time::Duration;
    let test = TestDir::new();
    test.write("private/hr.csv", "Company,Stage\r\nSalary Review,Lead\r\n");
    test.write("share/real.csv", leads_csv(&["Acme"]));
    test.config(
        "[watch]\nsettle = \"200ms\"\npoll_interval = \"200ms\"\n\n[[sources]]\nname = \"share\"\npath = \"share\"\n",
    );
    let daemon = test.start_daemon();
    daemon.wait_ready();
    // A link created while the daemon runs (an inotify event, then every rescan).
    std::os::unix::fs::symlink(test.path("private/hr.csv"), test.path("share/leads.csv"))
        .expect("link");
    crate::harness::wait_until(Duration::from_secs(10), "the link in status", || {
        status_of(&test, "share/leads.csv").is_some_and(|status| status["state"] == "ignored")
    });
    // Several rescans later it is still logged once.
    daemon.wait_rescans(3);
    let log = daemon.log();
    assert_eq!(log.matches("links are not sources").count(), 1, "{log}");
    assert!(!log.contains("Salary"), "{log}");
    assert_eq!(test.deals().len(), 1);
}

#[test]
fn the_store_is_readable_by_the_service_only() {
    if crate::harness::on_postgres() {
        // The store is the server's then: its files are PostgreSQL's to protect.
        eprintln!("the SQLite store file's mode: not a question on the PostgreSQL pass");
        return;
    }
    let test = TestDir::new();
    test.write("share/a.csv", leads_csv(&["Acme"]));
    test.config(
        "[watch]\nsettle = \"200ms\"\n\n[[sources]]\nname = \"share\"\npath = \"share\"\nwrite_back = false\n",
    );
    // The test process's umask is the usual 022: what funnelsync creates must not follow it.
    let daemon = test.start_daemon();
    daemon.wait_ready();
    assert_eq!(mode_of(&test.path("state")), 0o700);
    for name in ["state/crm.db", "state/crm.db-wal", "state/crm.db-shm"] {
        assert_eq!(mode_of(&test.path(name)), 0o600, "{name}");
    }
    drop(daemon);

    // A store folder the admin prepared keeps the mode they gave it.
    let shared = TestDir::new();
    std::fs::create_dir_all(shared.path("state")).expect("state");
    chmod(&shared.path("state"), 0o750);
    shared.write("share/a.csv", leads_csv(&["Acme"]));
    shared.config("[[sources]]\nname = \"share\"\npath = \"share\"\nwrite_back = false\n");
    shared.sync().assert_code(0);
    assert_eq!(mode_of(&shared.path("state")), 0o750);
    assert_eq!(mode_of(&shared.path("state/crm.db")), 0o600);
}

/// The most memory funnelsync may take for a hostile file it refuses (or reads sparsely).
const PEAK_LIMIT: u64 = 100 << 20;

/// An .xlsx with a header row and, in each of `n_rows` rows, one value at column XFD (the
/// last column Excel has); `with_data` adds a company and a stage in A and B.
fn far_column_workbook(path: &Path, n_rows: u32, with_data: bool) {
    let mut workbook = rust_xlsxwriter::Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.write_string(0, 0, "Company").expect("write");
    sheet.write_string(0, 1, "Stage").expect("write");
    for row in 1..=n_rows {
        if with_data {
            sheet
                .write_string(row, 0, format!("Company {row}"))
                .expect("write");
            sheet.write_string(row, 1, "Lead").expect("write");
        }
        sheet.write_string(row, 16_383, "x").expect("write");
    }
    workbook.save(path).expect("save");
}

/// Copies an .xlsx, appending to its shared strings `n_strings` more (unused) strings of
/// `n_chars` characters each, streamed into the zip so the test never holds them.
fn with_unused_shared_strings(from: &Path, to: &Path, n_strings: usize, n_chars: usize) {
    use std::io::{Read, Write};
    let mut archive = zip::ZipArchive::new(std::fs::File::open(from).expect("open")).expect("zip");
    let mut writer = zip::ZipWriter::new(std::fs::File::create(to).expect("create"));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    for entry_idx in 0..archive.len() {
        let mut entry = archive.by_index(entry_idx).expect("entry");
        let name = entry.name().expect("entry name").into_owned();
        let mut content = String::new();
        entry.read_to_string(&mut content).expect("read entry");
        writer.start_file(name.as_str(), options).expect("start");
        if name == "xl/sharedStrings.xml" {
            let count_end = content.find("uniqueCount=\"").expect("uniqueCount") + 13;
            let digits: String = content[count_end..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let unique: u64 = digits.parse().expect("count");
            let content = content.replacen(
                &format!("uniqueCount=\"{digits}\""),
                &format!("uniqueCount=\"{}\"", unique + n_strings as u64),
                1,
            );
            let end = content.rfind("</sst>").expect("end of sst");
            writer.write_all(&content.as_bytes()[..end]).expect("write");
            let block = vec![b'A'; 1 << 20];
            for _ in 0..n_strings {
                writer.write_all(b"<si><t>").expect("write");
                let mut left = n_chars;
                while left > 0 {
                    let n = left.min(block.len());
                    writer.write_all(&block[..n]).expect("write");
                    left -= n;
                }
                writer.write_all(b"</t></si>").expect("write");
            }
            writer.write_all(b"</sst>").expect("write");
        } else {
            writer.write_all(content.as_bytes()).expect("write");
        }
    }
    writer.finish().expect("finish");
}

#[test]
fn hostile_files_are_refused_with_bounded_memory() {
    let test = TestDir::new();
    std::fs::create_dir_all(test.path("share")).expect("share");
    // One value at column XFD in each of 2,000 rows (22 KB) and of 10,000 rows (100 KB).
    far_column_workbook(&test.path("share/xfd-2000.xlsx"), 2_000, false);
    far_column_workbook(&test.path("share/xfd-10000.xlsx"), 10_000, false);
    // A 99 MB line of commas.
    {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(test.path("share/commas.csv")).expect("create"),
        );
        file.write_all(b"Company,Stage\r\n").expect("write");
        let block = vec![b','; 1 << 20];
        for _ in 0..99 {
            file.write_all(&block).expect("write");
        }
        file.write_all(b"x\r\n").expect("write");
    }
    // An ordinary small workbook whose shared strings also hold an unused 1,000 MB string.
    crate::harness::XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Company", "Stage"])
        .row(&["Acme", "Lead"])
        .save(&test.path("small.xlsx"));
    with_unused_shared_strings(
        &test.path("small.xlsx"),
        &test.path("share/strings.xlsx"),
        1,
        1_000 << 20,
    );
    // One whose single unused string (100 MB) is within the size limit of the shared strings
    // but not within `max_cell_chars`.
    with_unused_shared_strings(
        &test.path("small.xlsx"),
        &test.path("share/long-string.xlsx"),
        1,
        100 << 20,
    );
    // And one whose shared strings hold 10,000 unused strings of 30,000 characters: each within
    // `max_cell_chars`, 286 MB together.
    with_unused_shared_strings(
        &test.path("small.xlsx"),
        &test.path("share/many-strings.xlsx"),
        10_000,
        30_000,
    );
    assert!(
        std::fs::metadata(test.path("share/xfd-2000.xlsx"))
            .expect("size")
            .len()
            < 40_000
    );
    assert!(
        std::fs::metadata(test.path("share/strings.xlsx"))
            .expect("size")
            .len()
            < 4 << 20
    );
    assert!(
        std::fs::metadata(test.path("share/many-strings.xlsx"))
            .expect("size")
            .len()
            < 4 << 20
    );
    test.config("[[sources]]\nname = \"share\"\npath = \"share\"\nwrite_back = false\n");

    for (name, fragment) in [
        ("xfd-2000.xlsx", "column XFD"),
        ("xfd-10000.xlsx", "column XFD"),
        ("commas.csv", "fields"),
        ("strings.xlsx", "shared string"),
        ("long-string.xlsx", "shared string"),
        ("many-strings.xlsx", "size of the shared strings"),
    ] {
        // Each file alone, so each peak is that file's.
        test.config(&format!(
            "[[sources]]\nname = \"share\"\npath = \"share/{name}\"\nwrite_back = false\n"
        ));
        let (run, peak) = test.run_measuring_memory(&["sync", "--format", "json"]);
        eprintln!("{name}: peak memory {} MB", peak >> 20);
        run.assert_code(1);
        let report = run.json();
        let file = file_report(&report, name);
        assert_eq!(file["status"], "failed", "{name}: {file}");
        let error = file["error"].as_str().unwrap_or("");
        assert!(
            error.contains(fragment) && error.contains("limit"),
            "{name}: {error}"
        );
        assert!(peak < PEAK_LIMIT, "{name}: peak memory {} MB", peak >> 20);
    }
    assert_eq!(test.deals().len(), 0);
}

/// Writes an .ods whose first sheet's rows are `rows_xml` (`<table:table-row>` elements).
fn ods_file(path: &Path, rows_xml: &str) {
    use std::io::Write;
    let mut writer = zip::ZipWriter::new(std::fs::File::create(path).expect("create"));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    writer.start_file("mimetype", stored).expect("start");
    writer
        .write_all(b"application/vnd.oasis.opendocument.spreadsheet")
        .expect("write");
    let deflated = zip::write::SimpleFileOptions::default();
    writer
        .start_file("META-INF/manifest.xml", deflated)
        .expect("start");
    writer
        .write_all(
            br#"<?xml version="1.0" encoding="UTF-8"?>
<manifest:manifest xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2"><manifest:file-entry manifest:full-path="/" manifest:media-type="application/vnd.oasis.opendocument.spreadsheet"/><manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/></manifest:manifest>"#,
        )
        .expect("write");
    writer.start_file("content.xml", deflated).expect("start");
    write!(
        writer,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" office:version="1.2"><office:body><office:spreadsheet><table:table table:name="Pipeline">{rows_xml}</table:table></office:spreadsheet></office:body></office:document-content>"#
    )
    .expect("write");
    writer.finish().expect("finish");
}

fn ods_text_row(texts: &[&str]) -> String {
    let cells: String = texts
        .iter()
        .map(|text| {
            format!(
                r#"<table:table-cell office:value-type="string"><text:p>{text}</text:p></table:table-cell>"#
            )
        })
        .collect();
    format!("<table:table-row>{cells}</table:table-row>")
}

#[test]
fn an_ods_whose_repeated_cells_would_expand_to_gigabytes_is_refused_in_little_memory() {
    let test = TestDir::new();
    std::fs::create_dir_all(test.path("share")).expect("share");
    // As LibreOffice saves a sheet: a few values, then empty cells and rows repeated to the edge.
    let edge = r#"<table:table-row table:number-rows-repeated="1048573"><table:table-cell table:number-columns-repeated="16384"/></table:table-row>"#;
    let filler = r#"<table:table-cell table:number-columns-repeated="16382"/>"#;
    let header = ods_text_row(&["Company", "Stage"])
        .replace("</table:table-row>", &format!("{filler}</table:table-row>"));
    ods_file(
        &test.path("share/team.ods"),
        &format!(
            "{header}{}{}{edge}",
            ods_text_row(&["Acme", "Lead"]),
            ods_text_row(&["Globex", "Won"])
        ),
    );
    // One value repeated over 16,384 columns in a row repeated 6,000 times: a few hundred bytes
    // that calamine would expand to 98 million cells (just under its own cap), 5 GB.
    ods_file(
        &test.path("share/bomb.ods"),
        &format!(
            r#"{}<table:table-row table:number-rows-repeated="6000"><table:table-cell table:number-columns-repeated="16384" office:value-type="float" office:value="1"/></table:table-row>"#,
            ods_text_row(&["Company", "Stage"])
        ),
    );
    // Within the rows and columns allowed, but 90 million cells, 5 GB, once expanded.
    ods_file(
        &test.path("share/grid.ods"),
        &format!(
            r#"{}<table:table-row table:number-rows-repeated="100000"><table:table-cell table:number-columns-repeated="900" office:value-type="float" office:value="1"/></table:table-row>"#,
            ods_text_row(&["Company", "Stage"])
        ),
    );
    assert!(
        std::fs::metadata(test.path("share/bomb.ods"))
            .expect("size")
            .len()
            < 2_000
    );
    for (name, fragment) in [
        ("team.ods", None),
        ("bomb.ods", Some("column 16384")),
        ("grid.ods", Some("expanded")),
    ] {
        test.config(&format!(
            "[[sources]]\nname = \"share\"\npath = \"share/{name}\"\nwrite_back = false\n"
        ));
        let (run, peak) = test.run_measuring_memory(&["sync", "--format", "json"]);
        eprintln!("{name}: peak memory {} MB", peak >> 20);
        let report = run.json();
        let file = file_report(&report, name);
        match fragment {
            None => {
                run.assert_code(0);
                assert_eq!(file["status"], "synced", "{name}: {file}");
            }
            Some(fragment) => {
                run.assert_code(1);
                assert_eq!(file["status"], "failed", "{name}: {file}");
                let error = file["error"].as_str().unwrap_or("");
                assert!(
                    error.contains(fragment) && error.contains("limit"),
                    "{name}: {error}"
                );
            }
        }
        assert!(peak < PEAK_LIMIT, "{name}: peak memory {} MB", peak >> 20);
    }
    let companies: Vec<String> = test
        .deals()
        .iter()
        .map(|deal| deal["company"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(companies.len(), 2, "{companies:?}");
}

#[test]
fn a_sparse_wide_sheet_within_the_limits_is_read_in_little_memory() {
    let test = TestDir::new();
    far_column_workbook(&test.path("wide.xlsx"), 10_000, true);
    test.single_source("wide.xlsx", "write_back = false");
    test.config(
        "[limits]\nmax_columns = 16384\n\n[[sources]]\nname = \"pipeline\"\npath = \"wide.xlsx\"\nwrite_back = false\n",
    );
    let (run, peak) = test.run_measuring_memory(&["sync", "--format", "json"]);
    eprintln!("wide.xlsx: peak memory {} MB", peak >> 20);
    run.assert_code(0);
    assert_eq!(
        file_report(&run.json(), "wide.xlsx")["counts"]["created"],
        10_000
    );
    assert!(peak < PEAK_LIMIT, "peak memory {} MB", peak >> 20);
    assert_eq!(
        test.deal_by("company", "Company 7")["extra"]["Column XFD"],
        "x"
    );
}

/// Text a hostile or broken generator might put into XML: far cells, huge numbers, entities,
/// a document type, deep nesting, lone brackets.
const XML_SNIPPETS: [&str; 10] = [
    "<c r=\"XFD1048576\"><v>1</v></c>",
    "<c r=\"A99999999999\" t=\"s\"><v>99999999999</v></c>",
    "<!DOCTYPE x [<!ENTITY e \"ee\">]>",
    "&e;&amp;&#0;&#xFFFFFFFF;",
    "<row r=\"0\"><c r=\"A0\"><v>x</v></c></row>",
    "<c t=\"inlineStr\"><is><t>",
    "]]><![CDATA[",
    "<<<>>>\"'",
    "<sst uniqueCount=\"18446744073709551615\">",
    "<c r=\"B2\" t=\"e\"><v>#REF!</v></c>",
];

/// Rewrites a workbook with each XML part mutated: bytes flipped, cut, repeated, and hostile
/// snippets inserted — then zipped again with valid checksums, so the XML reaches the parsers.
fn mutated_workbook(base: &[u8], random: &mut crate::harness::Random) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(base)).expect("zip");
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for entry_idx in 0..archive.len() {
        let mut entry = archive.by_index(entry_idx).expect("entry");
        let name = entry.name().expect("entry name").into_owned();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).expect("read");
        if random.index(3) > 0 && !content.is_empty() {
            for _ in 0..1 + random.index(4) {
                let at = random.index(content.len());
                match random.index(5) {
                    0 => content[at] = random.next() as u8,
                    1 => content.truncate(at),
                    2 => {
                        let snippet = XML_SNIPPETS[random.index(XML_SNIPPETS.len())];
                        content.splice(at..at, snippet.bytes());
                    }
                    3 => {
                        let end = (at + 1 + random.index(64)).min(content.len());
                        let piece = content[at..end].to_vec();
                        for _ in 0..random.index(200) {
                            content.splice(at..at, piece.iter().copied());
                        }
                    }
                    _ => {
                        let noise = random.some_bytes(32);
                        content.splice(at..at, noise);
                    }
                }
                if content.is_empty() {
                    break;
                }
            }
        }
        writer.start_file(name.as_str(), options).expect("start");
        writer.write_all(&content).expect("write");
    }
    writer.finish().expect("finish").into_inner()
}

fn mutated_csv(random: &mut crate::harness::Random) -> Vec<u8> {
    let mut text =
        b"Company,Stage,Amount\r\nAcme,Lead,100\r\n\"Beta\r\nCo\",Won,\"1,200\"\r\n".to_vec();
    if random.index(2) == 0 {
        text = encoding_rs::GB18030
            .encode("公司,阶段\n甲,机会\n")
            .0
            .into_owned();
    }
    for _ in 0..1 + random.index(6) {
        let at = random.index(text.len() + 1);
        match random.index(4) {
            0 => {
                let noise = random.some_bytes(16);
                text.splice(at..at, noise);
            }
            1 => {
                let quotes = vec![b'"'; random.index(5)];
                text.splice(at..at, quotes);
            }
            2 => text.truncate(at),
            _ => {
                let commas = vec![b','; random.index(20_000)];
                text.splice(at..at, commas);
            }
        }
    }
    text
}

#[test]
fn random_and_mutated_files_never_panic_and_stay_in_bounded_memory() {
    let seed: u64 = crate::harness::env_number("FUNNELSYNC_FUZZ_SEED", 0x5eed_f00d);
    let mut random = crate::harness::Random(seed | 1);
    let test = TestDir::new();
    std::fs::create_dir_all(test.path("share")).expect("share");
    let base = crate::harness::XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Company", "Stage", "Amount"])
        .row(&["Acme", "Lead", "100"])
        .cells(vec![
            crate::harness::Cell::from("Beta"),
            crate::harness::Cell::from("Won"),
            crate::harness::Cell::Formula("=1+1".to_string(), "2".to_string()),
        ])
        .sheet("Other")
        .row(&["a", "b"])
        .to_bytes();
    for file_idx in 0..40 {
        test.write(
            &format!("share/random-{file_idx}.xlsx"),
            random.some_bytes(4096),
        );
        test.write(
            &format!("share/random-{file_idx}.csv"),
            random.some_bytes(4096),
        );
        test.write(
            &format!("share/mutated-{file_idx}.xlsx"),
            mutated_workbook(&base, &mut random),
        );
        test.write(
            &format!("share/mutated-{file_idx}.csv"),
            mutated_csv(&mut random),
        );
    }
    test.config("[[sources]]\nname = \"share\"\npath = \"share\"\nwrite_back = false\n");
    let (run, peak) = test.run_measuring_memory(&["sync", "--format", "json"]);
    eprintln!("seed {seed}: peak memory {} MB", peak >> 20);
    // Random bytes named .xlsx are no zip, so those files fail (and nothing else may go wrong
    // worse than a file failing): exit 1.
    assert_eq!(run.code, 1, "seed {seed}:\n{}", run.stderr);
    assert!(
        !run.stderr.contains("panicked"),
        "seed {seed}:\n{}",
        run.stderr
    );
    let report = run.json();
    let statuses: Vec<&str> = report["files"]
        .as_array()
        .map(|files| {
            files
                .iter()
                .filter_map(|file| file["status"].as_str())
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "seed {seed}: {} synced, {} failed",
        statuses
            .iter()
            .filter(|status| **status == "synced")
            .count(),
        statuses
            .iter()
            .filter(|status| **status == "failed")
            .count()
    );
    assert_eq!(
        report["files"].as_array().map(Vec::len),
        Some(160),
        "every file has its report"
    );
    for file in report["files"].as_array().into_iter().flatten() {
        let name = file["file"].as_str().unwrap_or_default();
        if name.contains("/random-") && name.ends_with(".xlsx") {
            assert_eq!(file["status"], "failed", "seed {seed}: {file}");
        }
    }
    assert!(
        peak < PEAK_LIMIT,
        "seed {seed}: peak memory {} MB",
        peak >> 20
    );
}

fn n_runs_of(test: &TestDir, name: &str) -> i64 {
    test.count(&format!(
        "SELECT count(*) FROM sync_runs WHERE file LIKE '%/{name}'"
    ))
}

#[test]
fn a_gbk_file_with_a_row_pasted_from_a_utf8_file_is_refused_naming_that_row() {
    let test = TestDir::new();
    let mut pasted = encoding_rs::GB18030
        .encode("公司,阶段\r\n甲公司,机会\r\n乙公司,成交\r\n")
        .0
        .into_owned();
    pasted.extend_from_slice("上海丙公司,机会\r\n".as_bytes());
    pasted.extend_from_slice(&encoding_rs::GB18030.encode("丁公司,线索\r\n").0);
    test.write("share/pasted.csv", &pasted);
    test.config("[[sources]]\nname = \"share\"\npath = \"share\"\nwrite_back = false\n");
    let run = test.sync();
    run.assert_code(1);
    let report = run.json();
    let file = file_report(&report, "pasted.csv");
    assert_eq!(file["status"], "failed", "{file}");
    let error = file["error"].as_str().unwrap_or("");
    assert!(
        error.contains("row 4") && error.contains("is UTF-8") && error.contains("mixes encodings"),
        "{error}"
    );
    assert_eq!(test.deals().len(), 0, "no row is stored as mojibake");
}

#[test]
fn a_refused_file_is_not_read_again_until_it_changes() {
    use std::time::Duration;
    let test = TestDir::new();
    test.write("share/good.csv", leads_csv(&["Acme"]));
    // A cell over the limit: refused until someone saves a new version.
    test.write(
        "share/long.csv",
        format!("Company,Stage\r\n{},Lead\r\n", "x".repeat(5_000)),
    );
    // Permanently malformed: binary data, and text mixing UTF-8 with GBK bytes.
    test.write("share/nul.csv", b"Company,Stage\r\nAcme\x00,Lead\r\n");
    let mut mixed = "Company,Stage\r\n甲公司,机会\r\n乙公司,成交\r\n"
        .as_bytes()
        .to_vec();
    mixed.extend_from_slice(&encoding_rs::GB18030.encode("丙公司").0);
    mixed.extend_from_slice(b",Lead\r\n");
    test.write("share/mixed.csv", &mixed);
    test.config(
        "[limits]\nmax_cell_chars = 1000\n\n[watch]\nsettle = \"200ms\"\npoll_interval = \"300ms\"\n\n[[sources]]\nname = \"share\"\npath = \"share\"\n",
    );
    // One `sync` reads each refused file once, not once per pass.
    let run = test.sync();
    run.assert_code(1);
    let report = run.json();
    for name in ["long.csv", "nul.csv", "mixed.csv"] {
        let file = file_report(&report, name);
        assert_eq!(file["status"], "failed", "{name}: {file}");
        assert_eq!(file["retryable"], false, "{name}: {file}");
        assert_eq!(n_runs_of(&test, name), 1, "{name}");
    }
    let mixed_error = file_report(&report, "mixed.csv")["error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        mixed_error.contains("row 4") && mixed_error.contains("mixes encodings"),
        "{mixed_error}"
    );
    assert!(test
        .deals()
        .iter()
        .all(|deal| !deal["company"].as_str().unwrap_or("").contains('丙')));

    // The daemon: ten changes in the store reach the good file; the refused ones stay unread,
    // and the malformed ones are failed at once, not retried.
    let daemon = test.start_daemon();
    daemon.wait_ready();
    let runs_at_start: Vec<i64> = ["long.csv", "nul.csv", "mixed.csv"]
        .iter()
        .map(|name| n_runs_of(&test, name))
        .collect();
    let id = test.deal_by("company", "Acme")["id"].to_string();
    for round in 1..=10 {
        test.run(&["deals", "set", &id, &format!("company=Acme {round}")])
            .assert_code(0);
    }
    crate::harness::wait_until(
        Duration::from_secs(15),
        "the last change written back",
        || {
            std::fs::read_to_string(test.path("share/good.csv"))
                .is_ok_and(|text| text.contains("Acme 10,"))
        },
    );
    // Given up on, not waiting to retry; and rescans that could read them again have come and
    // gone.
    for name in ["nul.csv", "mixed.csv", "long.csv"] {
        crate::harness::wait_until(Duration::from_secs(10), "the file to be failed", || {
            status_of(&test, name).is_some_and(|status| status["state"] == "failed")
        });
    }
    daemon.wait_rescans(3);
    let runs_now: Vec<i64> = ["long.csv", "nul.csv", "mixed.csv"]
        .iter()
        .map(|name| n_runs_of(&test, name))
        .collect();
    assert_eq!(runs_now, runs_at_start, "{}", daemon.log());
    for name in ["nul.csv", "mixed.csv", "long.csv"] {
        let status = status_of(&test, name).expect("status");
        assert_eq!(status["state"], "failed", "{name}: {status}");
    }

    // A new version is read.
    test.write("share/long.csv", leads_csv(&["Long Ltd"]));
    crate::harness::wait_until(Duration::from_secs(10), "the fixed file", || {
        test.deals()
            .iter()
            .any(|deal| deal["company"] == "Long Ltd")
    });
}

#[test]
fn durations_that_would_overflow_are_refused_and_the_longest_allowed_are_safe() {
    use std::time::Duration;
    let smtp = crate::harness::SmtpServer::start(0);
    let test = TestDir::new();
    test.write("share/a.csv", leads_csv(&["Acme"]));
    let huge = "18446744073709551615s";
    test.config(&format!(
        "[watch]\npoll_interval = \"{huge}\"\nsettle = \"{huge}\"\n\n[report]\npath = \"report.xlsx\"\nrefresh = \"{huge}\"\n\n[alerts]\nto = \"it@example.com\"\nevery = \"{huge}\"\n\n[smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"funnelsync@example.com\"\ntimeout = \"{huge}\"\n\n[[sources]]\nname = \"share\"\npath = \"share\"\n",
        smtp.port
    ));
    let check = test.run(&["check-config"]);
    check.assert_code(2);
    for key in [
        "watch.poll_interval",
        "watch.settle",
        "report.refresh",
        "alerts.every",
        "smtp.timeout",
    ] {
        assert!(check.stderr.contains(key), "{key}:\n{}", check.stderr);
    }
    assert!(check.stderr.contains("at most"), "{}", check.stderr);

    // The longest values accepted run the daemon, which keeps working and stops cleanly.
    test.config(&format!(
        "[watch]\npoll_interval = \"24h\"\nsettle = \"200ms\"\n\n[report]\npath = \"report.xlsx\"\nrefresh = \"7days\"\n\n[alerts]\nto = \"it@example.com\"\nevery = \"30days\"\n\n[smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"funnelsync@example.com\"\ntimeout = \"10m\"\n\n[[sources]]\nname = \"share\"\npath = \"share\"\n",
        smtp.port
    ));
    test.run(&["check-config"]).assert_code(0);
    let mut daemon = test.start_daemon();
    daemon.wait_ready();
    crate::harness::wait_until(Duration::from_secs(10), "the report", || {
        test.path("report.xlsx").exists()
    });
    test.write("share/b.csv", leads_csv(&["Beta"]));
    crate::harness::wait_until(Duration::from_secs(10), "the new file synced", || {
        test.deals().len() == 2
    });
    assert!(daemon.is_running(), "{}", daemon.log());
    daemon.signal("TERM");
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        daemon.log()
    );
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}

/// An SMTP server on loopback that offers AUTH and answers it with an error that repeats the
/// AUTH line, as some servers do. Returns its port and the lines it received.
fn echoing_smtp_server() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&received);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Ok(reader) = stream.try_clone() else {
                continue;
            };
            let mut reader = BufReader::new(reader);
            let _ = stream.write_all(b"220 echo.test ESMTP\r\n");
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                let command = line.trim_end().to_string();
                seen.lock().expect("lock").push(command.clone());
                let upper = command.to_ascii_uppercase();
                let reply = if upper.starts_with("EHLO") {
                    "250-echo.test\r\n250 AUTH PLAIN LOGIN\r\n".to_string()
                } else if upper.starts_with("AUTH") {
                    format!("535 5.7.8 Authentication failed for: {command}\r\n")
                } else if upper.starts_with("QUIT") {
                    "221 bye\r\n".to_string()
                } else {
                    "250 ok\r\n".to_string()
                };
                if stream.write_all(reply.as_bytes()).is_err() || upper.starts_with("QUIT") {
                    break;
                }
                line.clear();
            }
        }
    });
    (port, received)
}

#[test]
fn a_server_echoing_the_login_never_puts_it_in_output_or_the_store() {
    let (port, received) = echoing_smtp_server();
    let test = TestDir::new();
    test.write("share/a.csv", "Company,Stage,Owner\r\nAcme,Lead,Alice\r\n");
    test.write("smtp-password", "s3cret-Passw0rd\n");
    chmod(&test.path("smtp-password"), 0o600);
    test.config(&format!(
        "[[sources]]\nname = \"share\"\npath = \"share\"\nwrite_back = false\n\n[remind]\nat = \"09:00\"\nmanager = \"lead@example.com\"\nfallback_to = \"lead@example.com\"\n\n[reps]\nAlice = \"alice@example.com\"\n\n[smtp]\nhost = \"127.0.0.1\"\nport = {port}\nsecurity = \"none\"\nallow_plaintext_auth = true\nusername = \"funnelsync\"\npassword_file = \"smtp-password\"\nfrom = \"funnelsync@example.com\"\ntimeout = \"5s\"\n"
    ));
    test.sync().assert_code(0);
    let later = (chrono::Utc::now() + chrono::Duration::days(60)).to_rfc3339();
    let run = crate::harness::Run::from_output(
        test.command(&["--now", &later, "remind"])
            .env("RUST_LOG", "trace")
            .output()
            .expect("run"),
    );
    let all_output = format!("{}{}", run.stdout, run.stderr);
    // The login really went out and was echoed back.
    let auth_line = received
        .lock()
        .expect("lock")
        .iter()
        .find(|line| line.to_ascii_uppercase().starts_with("AUTH"))
        .cloned()
        .expect("the client logged in");
    let credentials = auth_line
        .split_whitespace()
        .last()
        .unwrap_or("")
        .to_string();
    assert!(credentials.len() > 8, "{auth_line}");
    let errors = test.outbox_errors();
    assert!(
        errors.contains("535"),
        "the failure itself is kept: {errors}"
    );
    for secret in [credentials.as_str(), "s3cret-Passw0rd"] {
        assert!(
            !all_output.contains(secret),
            "{secret} in the output:\n{all_output}"
        );
        assert!(!errors.contains(secret), "{secret} in the outbox: {errors}");
    }
}

#[test]
fn check_config_warns_about_password_files_and_refuses_a_login_in_clear() {
    let test = TestDir::new();
    test.write("share/a.csv", leads_csv(&["Acme"]));
    let smtp = |extra: &str| {
        format!(
            "[[sources]]\nname = \"share\"\npath = \"share\"\n\n[smtp]\nhost = \"mail.example.com\"\nfrom = \"funnelsync@example.com\"\n{extra}\n"
        )
    };
    // A login in clear is an error unless the admin says so.
    test.config(&smtp("security = \"none\"\nusername = \"funnelsync\""));
    let check = test.run(&["check-config"]);
    check.assert_code(2);
    assert!(
        check.stderr.contains("smtp.username") && check.stderr.contains("allow_plaintext_auth"),
        "{}",
        check.stderr
    );
    test.config(&smtp(
        "security = \"none\"\nusername = \"funnelsync\"\nallow_plaintext_auth = true",
    ));
    let check = test.run(&["check-config"]);
    check.assert_code(0);
    assert!(check.stderr.contains("in clear"), "{}", check.stderr);

    // The password file: missing, then readable by the group, then by everyone, then private.
    test.config(&smtp(
        "username = \"funnelsync\"\npassword_file = \"smtp-password\"",
    ));
    let check = test.run(&["check-config"]);
    check.assert_code(0);
    assert!(
        check.stderr.contains("warning: smtp.password_file")
            && check.stderr.contains("cannot be read"),
        "{}",
        check.stderr
    );
    test.write("smtp-password", "s3cret\n");
    for (mode, who) in [(0o640, "its group"), (0o644, "everyone")] {
        chmod(&test.path("smtp-password"), mode);
        let check = test.run(&["check-config"]);
        check.assert_code(0);
        assert!(check.stderr.contains(who), "{mode:o}: {}", check.stderr);
        assert!(!check.stderr.contains("s3cret"), "{}", check.stderr);
    }
    chmod(&test.path("smtp-password"), 0o600);
    let check = test.run(&["check-config"]);
    check.assert_code(0);
    assert!(!check.stderr.contains("warning"), "{}", check.stderr);
}

#[test]
fn check_config_says_when_the_store_folder_is_not_writable_for_the_service() {
    if !running_as_root("check_config_says_when_the_store_folder_is_not_writable_for_the_service") {
        return;
    }
    if crate::harness::on_postgres() {
        return; // a SQLite store's folder
    }
    let test = TestDir::new();
    test.write("leads.csv", leads_csv(&["Acme"]));
    test.single_source("leads.csv", "write_back = false");
    test.sync().assert_code(0);
    chmod(test.dir.path(), 0o755);
    // The store file is the service's, but its folder is root's: SQLite cannot make the -wal and
    // -shm files beside it.
    chown(&test.store_path(), NOBODY, NOBODY);
    chmod(&test.path("state"), 0o755);
    let check_config_as_nobody = || {
        let output = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(crate::harness::BINARY)
            .arg("--config")
            .arg(test.config_path())
            .arg("check-config")
            .current_dir(test.dir.path())
            .env_remove("RUST_LOG")
            .output()
            .expect("setpriv");
        crate::harness::Run::from_output(output)
    };
    let run = check_config_as_nobody();
    run.assert_code(2);
    assert!(
        run.stderr.contains(&format!(
            "the folder {} is not writable, so SQLite cannot make the store's -wal and -shm files",
            test.path("state").display()
        )),
        "{}",
        run.stderr
    );
    chown(&test.path("state"), NOBODY, NOBODY);
    check_config_as_nobody().assert_code(0);
}

#[test]
fn a_service_that_may_not_give_files_away_keeps_the_group_or_drops_group_access() {
    if !running_as_root("a_service_that_may_not_give_files_away") {
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let test = TestDir::new();
    // The service runs as `nobody`, a member of group 100 only.
    std::fs::set_permissions(test.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::create_dir_all(test.path("state")).expect("state");
    chown(&test.path("state"), NOBODY, NOBODY);
    test.write("share/team.csv", leads_csv(&["Acme"]));
    test.write("share/other.csv", leads_csv(&["Beta"]));
    chown(&test.path("share"), NOBODY, NOBODY);
    chown(&test.path("share/team.csv"), 0, 100);
    chmod(&test.path("share/team.csv"), 0o664);
    chown(&test.path("share/other.csv"), 0, 0);
    chmod(&test.path("share/other.csv"), 0o666);
    test.config("[[sources]]\nname = \"share\"\npath = \"share\"\nbackups = 0\n");
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--groups=100", "--"])
        .arg(crate::harness::BINARY)
        .arg("--config")
        .arg(test.config_path())
        .args(["sync", "--format", "json"])
        .current_dir(test.dir.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("setpriv");
    let run = crate::harness::Run::from_output(output);
    let report = run.json();
    for name in ["team.csv", "other.csv"] {
        assert_eq!(
            write_back_of(&report, name).0,
            "written",
            "{name}: {report}\n{}",
            run.stderr
        );
    }
    // The group is kept where the service belongs to it.
    let team = std::fs::metadata(test.path("share/team.csv")).expect("team");
    assert_eq!((team.uid(), team.gid()), (NOBODY, 100));
    assert_eq!(mode_of(&test.path("share/team.csv")), 0o664);
    // Elsewhere the file loses its group permissions rather than open up to the service's group.
    let other = std::fs::metadata(test.path("share/other.csv")).expect("other");
    assert_eq!(other.uid(), NOBODY);
    assert_eq!(mode_of(&test.path("share/other.csv")), 0o606);
    // One warning per file, even when the second pass of `sync` writes a file again.
    assert_eq!(
        run.stderr
            .matches("may not give the rewritten file its owner")
            .count(),
        2,
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.matches("other.csv").count(), 1, "{}", run.stderr);
}
