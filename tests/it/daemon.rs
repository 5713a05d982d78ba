//! `funnelsync run`: the real daemon on a temp folder and a temp store, driven by real file saves
//! and real signals, heard through a real sd_notify socket.

use std::time::Duration;

use crate::harness::{wait_until, TestDir, XlsxBuilder};

const HEADER: [&str; 5] = ["Company", "Contact", "Email", "Stage", "Amount"];

fn pipeline(companies: &[&str]) -> XlsxBuilder {
    let mut builder = XlsxBuilder::new().sheet("Pipeline").row(&HEADER);
    for company in companies {
        let email = format!("{}@example.com", company.to_lowercase());
        builder = builder.row(&[company, "Someone", &email, "Lead", "1000"]);
    }
    builder
}

/// A folder source with fast settling; `mode` is auto unless the test says otherwise.
fn folder_config(test: &TestDir, watch: &str) {
    std::fs::create_dir_all(test.path("share")).expect("share folder");
    test.config(&format!(
        "{watch}\n[[sources]]\nname = \"share\"\npath = \"share\"\n"
    ));
}

fn n_deals(test: &TestDir) -> i64 {
    test.count("SELECT count(*) FROM deals WHERE archived_at IS NULL")
}

fn n_runs(test: &TestDir, file_name: &str) -> i64 {
    test.count(&format!(
        "SELECT count(*) FROM sync_runs WHERE file LIKE '%/{file_name}'"
    ))
}

fn n_archived(test: &TestDir) -> i64 {
    test.count("SELECT count(*) FROM deals WHERE archived_at IS NOT NULL")
}

const FAST: &str = "[watch]\nsettle = \"400ms\"\npoll_interval = \"30s\"\n";
/// The settle of [`FAST`].
const FAST_SETTLE: Duration = Duration::from_millis(400);
/// How long past its settle a change may take to reach the store or the file, for the sync itself
/// and a slow, shared test machine. A bound on a defect (a change missed until the 30 s poll, or
/// until a restart), not a speed figure.
const SYNC_SLACK: Duration = Duration::from_secs(3);

#[test]
fn an_excel_style_save_is_synced_once() {
    let test = TestDir::new();
    // A longer settle than the other tests: the save's steps must land within one settle window
    // even on a loaded CI machine.
    folder_config(&test, "[watch]\nsettle = \"1s\"\npoll_interval = \"30s\"\n");
    pipeline(&["Acme"]).save(&test.path("share/Pipeline.xlsx"));
    let daemon = test.start_daemon();
    daemon.wait_ready();
    assert_eq!(
        n_deals(&test),
        1,
        "the first scan synced the file:\n{}",
        daemon.log()
    );
    assert!(
        daemon
            .notifications()
            .iter()
            .any(|message| message.contains("STATUS=watching 1 file(s)")),
        "{:?}",
        daemon.notifications()
    );

    // Excel: write the new content to a temp file, move the original away, rename the temp file
    // into place, delete the old one.
    pipeline(&["Acme", "Beta"]).save(&test.path("share/A1B2C3D4"));
    std::fs::rename(
        test.path("share/Pipeline.xlsx"),
        test.path("share/B2C3D4E5.tmp"),
    )
    .expect("move away");
    std::fs::rename(
        test.path("share/A1B2C3D4"),
        test.path("share/Pipeline.xlsx"),
    )
    .expect("move into place");
    std::fs::remove_file(test.path("share/B2C3D4E5.tmp")).expect("delete old");

    // A read in the middle of the save would have been recorded (a failed or partial run) before
    // the read of the finished file.
    wait_until(
        Duration::from_secs(10),
        "the saved file to be synced",
        || n_deals(&test) == 2 && n_runs(&test, "Pipeline.xlsx") >= 2,
    );
    assert_eq!(
        n_runs(&test, "Pipeline.xlsx"),
        2,
        "one sync at start, exactly one after the save:\n{}",
        daemon.log()
    );
    assert_eq!(
        test.count("SELECT count(*) FROM sync_runs WHERE file NOT LIKE '%/Pipeline.xlsx'"),
        0,
        "temp files are not sources"
    );
    assert_eq!(n_archived(&test), 0);
}

#[test]
fn a_half_written_workbook_is_retried_and_never_read_as_empty() {
    let test = TestDir::new();
    folder_config(&test, FAST);
    pipeline(&["Acme", "Beta"]).save(&test.path("share/Pipeline.xlsx"));
    let daemon = test.start_daemon();
    daemon.wait_ready();
    assert_eq!(n_deals(&test), 2);

    let complete = pipeline(&["Acme", "Beta", "Gamma"]).to_bytes();
    std::fs::write(
        test.path("share/Pipeline.xlsx"),
        &complete[..complete.len() / 3],
    )
    .expect("write half");
    wait_until(
        Duration::from_secs(10),
        "a failed read of the half-written file",
        || test.count("SELECT count(*) FROM sync_runs WHERE status = 'failed'") >= 1,
    );
    let status = test.run(&["status", "--format", "json"]).json();
    let file = status
        .as_array()
        .and_then(|files| {
            files.iter().find(|file| {
                file["file"]
                    .as_str()
                    .is_some_and(|path| path.ends_with("Pipeline.xlsx"))
            })
        })
        .cloned();
    let file = file.expect("status lists the file");
    assert_eq!(file["state"], "retrying", "{file}");
    assert!(file["next_retry_at"].is_string(), "{file}");
    assert_eq!(
        n_deals(&test),
        2,
        "nothing archived while the file is half-written"
    );

    std::fs::write(test.path("share/Pipeline.xlsx"), &complete).expect("write whole");
    wait_until(
        Duration::from_secs(10),
        "the completed file to be synced",
        || n_deals(&test) == 3,
    );
    assert_eq!(n_archived(&test), 0);
    assert_eq!(
        test.count("SELECT coalesce(sum(n_archived), 0) FROM sync_runs"),
        0,
        "no run ever archived anything"
    );
    let log = daemon.log();
    assert_eq!(
        log.matches("cannot read the file yet, will retry").count(),
        1,
        "the warning is logged once:\n{log}"
    );
}

#[test]
fn lock_files_are_ignored_and_a_deleted_file_archives_nothing() {
    let test = TestDir::new();
    folder_config(&test, FAST);
    pipeline(&["Acme", "Beta"]).save(&test.path("share/Pipeline.xlsx"));
    let daemon = test.start_daemon();
    daemon.wait_ready();
    assert_eq!(n_deals(&test), 2);

    // Excel and LibreOffice open the file.
    test.write("share/~$Pipeline.xlsx", b"owner file, not a workbook");
    test.write(
        "share/.~lock.Pipeline.xlsx#",
        b",alice,host,28.11.2026 10:00,file:///home/alice/.config/libreoffice/4;",
    );
    wait_until(Duration::from_secs(10), "the lock files to be seen", || {
        let log = daemon.log();
        ["~$Pipeline.xlsx", ".~lock.Pipeline.xlsx#"]
            .iter()
            .all(|name| {
                log.lines()
                    .any(|line| line.contains("not a source") && line.contains(name))
            })
    });
    assert_eq!(
        test.count("SELECT count(*) FROM sync_runs WHERE file LIKE '%~%'"),
        0,
        "lock files are never synced"
    );

    std::fs::remove_file(test.path("share/Pipeline.xlsx")).expect("delete");
    wait_until(Duration::from_secs(10), "the removal to be noticed", || {
        test.count("SELECT count(*) FROM file_status WHERE state = 'removed'") == 1
    });
    assert_eq!(
        n_deals(&test),
        2,
        "a deleted file is not 'all rows removed'"
    );
    assert_eq!(n_archived(&test), 0);
    assert!(
        daemon
            .log()
            .contains("file removed from the folder; its deals stay"),
        "{}",
        daemon.log()
    );
}

#[test]
fn poll_mode_picks_up_a_change_without_events() {
    let test = TestDir::new();
    folder_config(
        &test,
        "[watch]\nmode = \"poll\"\nsettle = \"200ms\"\npoll_interval = \"300ms\"\n",
    );
    pipeline(&["Acme"]).save(&test.path("share/Pipeline.xlsx"));
    let daemon = test.start_daemon();
    daemon.wait_ready();
    assert_eq!(n_deals(&test), 1);
    assert!(
        !daemon.log().contains("watching folder"),
        "poll mode starts no watcher"
    );

    pipeline(&["Acme", "Beta"]).save(&test.path("share/Pipeline.xlsx"));
    wait_until(
        Duration::from_secs(10),
        "the poll to find the change",
        || n_deals(&test) == 2,
    );
    // A new file in the folder is found by the poll too.
    pipeline(&["Gamma"]).save(&test.path("share/Second.xlsx"));
    wait_until(
        Duration::from_secs(10),
        "the poll to find the new file",
        || n_deals(&test) == 3,
    );
}

#[test]
fn sighup_reloads_the_config_and_sigterm_stops_promptly() {
    let test = TestDir::new();
    folder_config(&test, FAST);
    pipeline(&["Acme"]).save(&test.path("share/Pipeline.xlsx"));
    let mut daemon = test.start_daemon();
    daemon.wait_ready();

    // A broken config: the daemon keeps running on the old one.
    let good_config = std::fs::read_to_string(test.config_path()).expect("config");
    std::fs::write(
        test.config_path(),
        format!("{good_config}\n[[sources]]\nname = \"broken\"\n"),
    )
    .expect("break config");
    daemon.signal("HUP");
    wait_until(Duration::from_secs(5), "the reload to be refused", || {
        daemon.log().contains("the new config is not valid")
    });
    assert!(daemon.is_running());
    pipeline(&["Acme", "Beta"]).save(&test.path("share/Pipeline.xlsx"));
    wait_until(
        Duration::from_secs(10),
        "a change to sync on the old config",
        || n_deals(&test) == 2,
    );

    // A good config with a new source: its file is synced without a restart.
    std::fs::create_dir_all(test.path("leads")).expect("leads folder");
    test.write("leads/new.csv", "Company,Stage\nGamma,Lead\n");
    std::fs::write(
        test.config_path(),
        format!("{good_config}\n[[sources]]\nname = \"leads\"\npath = \"leads\"\n"),
    )
    .expect("fix config");
    daemon.signal("HUP");
    wait_until(
        Duration::from_secs(10),
        "the new source's file to be synced",
        || n_deals(&test) == 3,
    );
    assert!(daemon.log().contains("source added"), "{}", daemon.log());

    let started = std::time::Instant::now();
    daemon.signal("TERM");
    let code = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "SIGTERM exits 0:\n{}", daemon.log());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(daemon
        .notifications()
        .iter()
        .any(|message| message.contains("STOPPING=1")));
}

#[test]
fn sigint_also_stops_cleanly() {
    let test = TestDir::new();
    folder_config(&test, FAST);
    let mut daemon = test.start_daemon();
    daemon.wait_ready();
    daemon.signal("INT");
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        daemon.log()
    );
}

#[test]
fn the_systemd_unit_is_valid_and_hardened() {
    let has_analyze = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if !has_analyze {
        crate::harness::skip(
            "the_systemd_unit_is_valid_and_hardened",
            "systemd-analyze is not installed (apt-get install systemd), so the unit is not checked",
        );
        return;
    }
    let test = TestDir::new();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(repo.join("systemd/funnelsync.service")).expect("unit file");
    // verify checks that ExecStart= points at an executable: use the binary under test.
    let unit = unit.replace("/usr/local/bin/funnelsync", crate::harness::BINARY);
    let unit_path = test.path("funnelsync.service");
    std::fs::write(&unit_path, unit).expect("write unit");

    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .expect("verify");
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let security = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&unit_path)
        .output()
        .expect("security");
    let text = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for funnelsync.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(exposure <= 2.5, "exposure {exposure} is above 2.5");
    // With [http] on, the daemon may bind the default port of `listen` and no other.
    let unit_text = std::fs::read_to_string(&unit_path).expect("unit");
    let port = funnelsync::internals::config::DEFAULT_LISTEN
        .rsplit(':')
        .next()
        .expect("a port");
    assert!(
        unit_text.contains(&format!("SocketBindAllow=tcp:{port}")),
        "{unit_text}"
    );
    assert!(unit_text.contains("SocketBindDeny=any"));
}

#[test]
fn a_saved_file_is_read_after_one_settle_not_two() {
    let test = TestDir::new();
    let settle = Duration::from_secs(1);
    folder_config(&test, "[watch]\nsettle = \"1s\"\npoll_interval = \"30s\"\n");
    pipeline(&["Acme"]).save(&test.path("share/Pipeline.xlsx"));
    let daemon = test.start_daemon();
    daemon.wait_ready();

    // One complete save: the new content is written beside the file and renamed into place, so
    // the file changes exactly once and the watcher reports it.
    pipeline(&["Acme", "Beta"]).save(&test.path("share/next.tmp"));
    std::fs::rename(
        test.path("share/next.tmp"),
        test.path("share/Pipeline.xlsx"),
    )
    .expect("rename into place");
    // Save → store within one settle and the sync (SYNC_SLACK): a bound on a defect (the event
    // lost and the change found only by the 30 s poll), not a speed figure. A second settle
    // would still fit in it; the log says whether there was one.
    wait_until(settle + SYNC_SLACK, "the save to be synced", || {
        n_deals(&test) == 2
    });
    let log = daemon.log();
    assert!(
        !log.contains("settling again"),
        "the event's change settled once; the first look after `settle` must not start a second wait:\n{log}"
    );
}

#[test]
fn a_write_back_deferred_while_the_file_is_open_happens_once_it_is_closed() {
    let test = TestDir::new();
    folder_config(&test, FAST);
    pipeline(&["Acme", "Beta"]).save(&test.path("share/team.xlsx"));
    let daemon = test.start_daemon();
    daemon.wait_ready();
    let beta = test.deal_by("company", "Beta");
    let id = beta["id"].to_string();

    // LibreOffice opens the file; meanwhile the CLI changes the deal.
    let lock = test.path("share/.~lock.team.xlsx#");
    std::fs::write(
        &lock,
        ",alice,host,28.11.2026 10:00,file:///home/alice/.config/libreoffice/4;",
    )
    .expect("lock file");
    test.run(&["deals", "set", &id, "amount=4444"])
        .assert_code(0);
    wait_until(
        Duration::from_secs(15),
        "the write-back to be deferred",
        || daemon.log().contains("waits until it is closed"),
    );
    let amounts =
        crate::harness::read_xlsx(&test.path("share/team.xlsx"), "Pipeline").column("Amount");
    assert!(
        !amounts.contains(&"4444".to_string()),
        "nothing is written while the file is open: {amounts:?}"
    );

    // LibreOffice closes the file without saving: the deferred write-back happens now, without
    // any further change to the file or the store.
    // Within one settle of the lock file's removal, and the sync (SYNC_SLACK): a bound on a
    // defect (a deferred write-back that waited for a restart, or for the 30 s poll), not a
    // speed figure.
    std::fs::remove_file(&lock).expect("close");
    wait_until(
        FAST_SETTLE + SYNC_SLACK,
        "the deferred write-back once the lock file is gone",
        || {
            crate::harness::read_xlsx(&test.path("share/team.xlsx"), "Pipeline")
                .column("Amount")
                .contains(&"4444".to_string())
        },
    );
    assert!(
        daemon.log().contains("closed; writing back"),
        "{}",
        daemon.log()
    );
}

/// The bytes of every file in a folder, by name.
fn contents(folder: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(folder)
        .expect("list folder")
        .filter_map(Result::ok)
        .filter(|entry| entry.path().is_file())
        .map(|entry| {
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).expect("read file"),
            )
        })
        .collect()
}

#[test]
fn a_folder_of_lead_lists_keeps_each_list_to_its_own_deals() {
    const N_FILES: usize = 300;
    let test = TestDir::new();
    folder_config(
        &test,
        "[watch]\nsettle = \"200ms\"\npoll_interval = \"60s\"\n",
    );
    for index in 0..N_FILES {
        test.write(
            &format!("share/leads-{index:03}.csv"),
            format!(
                "Company,Contact,Email,Stage\nFirm {index} A,Ann,a{index}@example.com,Lead\n\
                 Firm {index} B,Ben,b{index}@example.com,Lead\n"
            ),
        );
    }
    let daemon = test.start_daemon();
    daemon.wait_ready_within(Duration::from_secs(180));
    assert_eq!(n_deals(&test), 2 * N_FILES as i64);
    // Each list was written once, for its own new CRM IDs, and holds only its own two deals.
    let log = daemon.log();
    assert_eq!(
        log.matches("wrote the store's changes back into the file")
            .count(),
        N_FILES,
        "one write per file"
    );
    let after_import = contents(&test.path("share"));
    for (name, bytes) in &after_import {
        let text = String::from_utf8_lossy(bytes);
        assert_eq!(
            text.lines().count(),
            3,
            "{name} holds its own rows only:\n{text}"
        );
        assert!(
            text.starts_with("Company,Contact,Email,Stage,CRM ID"),
            "{text}"
        );
    }
    drop(daemon);

    // A restart with nothing changed writes nothing.
    let daemon = test.start_daemon();
    daemon.wait_ready_within(Duration::from_secs(180));
    assert_eq!(
        contents(&test.path("share")),
        after_import,
        "no file was written at start:\n{}",
        daemon.log()
    );

    // A change to one deal rewrites only the file that shows it.
    let firm = test.deal_by("company", "Firm 7 B");
    test.run(&["deals", "set", &firm["id"].to_string(), "stage=Prospect"])
        .assert_code(0);
    wait_until(
        Duration::from_secs(20),
        "the change in leads-007.csv",
        || {
            std::fs::read_to_string(test.path("share/leads-007.csv"))
                .is_ok_and(|text| text.contains("Firm 7 B,Ben,b7@example.com,Prospect"))
        },
    );
    let now = contents(&test.path("share"));
    let changed: Vec<&String> = now
        .iter()
        .filter(|(name, bytes)| after_import.get(*name) != Some(*bytes))
        .map(|(name, _)| name)
        .collect();
    assert_eq!(changed, ["leads-007.csv"]);
}
