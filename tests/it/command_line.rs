//! The command line says what it means: runs that are not files, history a person can read, filters
//! that refuse what does not exist, tables that line up, and JSON whose keys never change.

use crate::harness::{keys, TestDir, XlsxBuilder};

fn team(test: &TestDir) {
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Company", "Contact", "Email", "Stage", "Amount", "Owner"])
        .row(&[
            "Acme Robotics",
            "Emma Li",
            "emma.li@acme-robotics.example",
            "Lead",
            "1200.5",
            "Alice Wang",
        ])
        .row(&[
            "Beta",
            "Ben",
            "ben@beta.example",
            "Prospect",
            "30000",
            "Bob",
        ])
        .save(&test.path("team.xlsx"));
    test.single_source("team.xlsx", "");
    test.sync().assert_code(0);
}

/// The team file with Beta's row alone, its amount and CRM ID as given.
fn beta_only(test: &TestDir, amount: &str, crm_id: &str) {
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&[
            "Company", "Contact", "Email", "Stage", "Amount", "Owner", "CRM ID",
        ])
        .row(&[
            "Beta",
            "Ben",
            "ben@beta.example",
            "Prospect",
            amount,
            "Bob",
            crm_id,
        ])
        .save(&test.path("team.xlsx"));
}

#[test]
fn cli_and_undo_runs_are_runs_not_files_and_history_reads_whole() {
    let test = TestDir::new();
    team(&test);
    let acme = test.deal_by("company", "Acme Robotics");
    let id = acme["id"].to_string();
    test.run(&["deals", "set", &id, "amount=5000"])
        .assert_code(0);

    let status = test.run(&["status", "--format", "json"]).json();
    assert_eq!(
        status.as_array().map(Vec::len),
        Some(1),
        "files only: {status}"
    );
    let table = test.run(&["status"]).stdout;
    assert!(!table.contains("cli"), "{table}");

    let runs = test.run(&["history", "--format", "json"]).json();
    let cli_run = runs[0]["id"].to_string();
    let shown = test.run(&["history", &cli_run]).stdout;
    assert!(
        shown.starts_with(&format!("run {cli_run} (cli) at ")),
        "{shown}"
    );
    test.run(&["undo", &cli_run]).assert_code(0);
    let undo_run = test.run(&["history", "--format", "json"]).json()[0]["id"].to_string();
    let shown = test.run(&["history", &undo_run]).stdout;
    assert!(
        shown.starts_with(&format!("run {undo_run} (undo of run {cli_run}) at ")),
        "{shown}"
    );
    let list = test.run(&["history"]).stdout;
    assert!(list.contains(&format!("undo of run {cli_run}")), "{list}");

    // The first sync created the deals: every field is shown, none cut.
    let shown = test.run(&["history", "1"]).stdout;
    for expected in [
        "create  company   ",
        "Acme Robotics",
        "Emma Li",
        "emma.li@acme-robotics.example",
        "1200.5",
    ] {
        assert!(
            shown.contains(expected),
            "missing {expected:?} in:\n{shown}"
        );
    }
    assert!(!shown.contains("{\""), "no raw JSON: {shown}");
}

#[test]
fn filters_that_match_nothing_that_exists_are_errors() {
    let test = TestDir::new();
    team(&test);
    let run = test.run(&["deals", "list", "--stage", "Bogus"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains(
            "\"Bogus\" is not a stage; the stages are Lead, Prospect, Opportunity, Won, Lost"
        ),
        "{}",
        run.stderr
    );
    let run = test.run(&["deals", "list", "--owner", "Nobody"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("the owners are Alice Wang, Bob"),
        "{}",
        run.stderr
    );
    test.run(&["deals", "list", "--owner", " alice wang "])
        .assert_code(0);
    test.run(&["funnel", "--owner", "Nobody"]).assert_code(2);
    let run = test.run(&["funnel", "--since", "2026-11-20", "--until", "2026-11-01"]);
    run.assert_code(2);
    assert!(run.stderr.contains("is after --until"), "{}", run.stderr);
}

#[test]
fn an_owner_of_archived_deals_only_is_found_with_include_archived() {
    let test = TestDir::new();
    team(&test);
    // Carol's one deal joins, then its row is deleted: the deal is archived.
    let carol = ["Gamma", "Gus", "gus@gamma.example", "Lead", "500", "Carol"];
    crate::harness::UserEdit::open(&test.path("team.xlsx"), "Pipeline")
        .add_row(&carol)
        .save();
    test.sync().assert_code(0);
    team(&test);
    assert!(test.deal_by("company", "Gamma")["archived_at"].is_string());

    // Without --include-archived Carol owns no deal, and the owners listed are the live ones.
    let run = test.run(&["deals", "list", "--owner", "carol"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("the owners are Alice Wang, Bob"),
        "{}",
        run.stderr
    );
    // With it, her archived deal is listed.
    let run = test.run(&[
        "deals",
        "list",
        "--owner",
        "carol",
        "--include-archived",
        "--format",
        "json",
    ]);
    run.assert_code(0);
    let deals = run.json();
    let companies: Vec<&str> = deals
        .as_array()
        .map(|deals| {
            deals
                .iter()
                .filter_map(|deal| deal["company"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(companies, ["Gamma"], "{deals}");
    // The funnel counts archived deals, so it knows her too.
    test.run(&["funnel", "--owner", "carol"]).assert_code(0);
}

#[test]
fn tables_line_up_and_empty_columns_say_what_they_mean() {
    let test = TestDir::new();
    team(&test);
    let table = test.run(&["deals", "list"]).stdout;
    // Same decimals on every line, right-aligned: the digits line up.
    assert!(table.contains(" 1,200.50"), "{table}");
    assert!(table.contains("30,000.00"), "{table}");
    let column = |line: &str, text: &str| line.find(text).map(|start| start + text.len());
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        column(lines[1], "1,200.50"),
        column(lines[2], "30,000.00"),
        "{table}"
    );

    test.write("leads.csv", "Company,Stage\nGamma,Lead\n");
    test.config(
        "[[sources]]\nname = \"team\"\npath = \"team.xlsx\"\n\n[[sources]]\nname = \"leads\"\npath = \"leads.csv\"\nwrite_back = false\n",
    );
    let sync = test.run(&["sync"]).stdout;
    let leads_line = sync
        .lines()
        .find(|line| line.contains("leads.csv"))
        .expect("leads line");
    assert!(leads_line.trim_end().ends_with("off"), "{sync}");
    let status = test.run(&["status"]).stdout;
    let leads_line = status
        .lines()
        .find(|line| line.contains("leads.csv"))
        .expect("leads line");
    assert!(
        leads_line.contains("off") && leads_line.contains("not running"),
        "{status}"
    );
}

#[test]
fn status_shows_a_deferred_write_back() {
    let test = TestDir::new();
    team(&test);
    test.write(
        ".~lock.team.xlsx#",
        ",alice,host,28.11.2026 10:00,file:///home/alice/.config/libreoffice/4;",
    );
    let beta = test.deal_by("company", "Beta");
    test.run(&["deals", "set", &beta["id"].to_string(), "amount=4444"])
        .assert_code(0);
    test.sync().assert_code(0);
    let table = test.run(&["status"]).stdout;
    assert!(
        table.contains("deferred") && table.contains("is open in LibreOffice"),
        "{table}"
    );
    let json = test.run(&["status", "--format", "json"]).json();
    assert_eq!(json[0]["write_back"]["status"], "deferred", "{json}");
}

/// The README's JSON section, pinned: each command's keys.
#[test]
fn the_json_of_every_command_has_the_same_keys_every_time() {
    let test = TestDir::new();
    team(&test);
    let deal_keys = [
        "amount",
        "archived_at",
        "company",
        "contact",
        "created_at",
        "created_on",
        "currency",
        "email",
        "expected_close",
        "extra",
        "id",
        "last_contact",
        "next_step",
        "owner",
        "phone",
        "stage",
        "stage_entered_at",
        "stage_since",
        "updated_at",
    ];
    let deals = test.run(&["deals", "list", "--format", "json"]).json();
    for deal in deals.as_array().expect("deals") {
        assert_eq!(keys(deal), deal_keys);
    }

    // A sync that changes something, and one that finds the file unchanged: the same keys.
    let beta = test.deal_by("company", "Beta");
    test.run(&["deals", "set", &beta["id"].to_string(), "amount=31000"])
        .assert_code(0);
    for _ in 0..2 {
        let sync = test.sync().json();
        assert_eq!(keys(&sync), ["files", "ok"]);
        let file = &sync["files"][0];
        assert_eq!(
            keys(file),
            [
                "conflicts",
                "counts",
                "error",
                "file",
                "issues",
                "retryable",
                "run_id",
                "sheet",
                "source",
                "status",
                "write_back"
            ],
            "{file}"
        );
        assert_eq!(
            keys(&file["counts"]),
            [
                "archived",
                "created",
                "deleted",
                "errors",
                "unchanged",
                "updated",
                "warnings"
            ]
        );
        assert_eq!(keys(&file["write_back"]), ["message", "status"], "{file}");
        assert_eq!(file["sheet"], "Pipeline", "{file}");
    }

    let status = test.run(&["status", "--format", "json"]).json();
    assert_eq!(
        keys(&status[0]),
        [
            "attempts",
            "file",
            "last_checked_at",
            "last_message",
            "last_run_at",
            "last_status",
            "last_synced_at",
            "n_row_errors",
            "n_rows",
            "n_warnings",
            "next_retry_at",
            "source",
            "state",
            "write_back"
        ]
    );
    assert_eq!(keys(&status[0]["write_back"]), ["message", "status"]);

    let history = test.run(&["history", "--format", "json"]).json();
    assert_eq!(
        keys(&history[0]),
        [
            "counts",
            "file",
            "finished_at",
            "id",
            "message",
            "source",
            "started_at",
            "status"
        ]
    );
    let run = test
        .run(&["history", &history[0]["id"].to_string(), "--format", "json"])
        .json();
    assert_eq!(keys(&run), ["changes", "run"]);
    assert_eq!(
        keys(&run["changes"][0]),
        [
            "deal_id",
            "field",
            "id",
            "kind",
            "new_value",
            "old_value",
            "run_id"
        ]
    );

    // A conflict (the CLI and the sheet both change Beta's amount), then a row error.
    let beta_id = beta["id"].to_string();
    test.run(&["deals", "set", &beta_id, "amount=32000"])
        .assert_code(0);
    beta_only(&test, "33000", &beta_id);
    test.sync();
    let conflicts = test.run(&["conflicts", "--format", "json"]).json();
    assert_eq!(
        keys(&conflicts[0]),
        [
            "at",
            "base_value",
            "deal_id",
            "field",
            "file",
            "id",
            "policy",
            "sheet_value",
            "source",
            "store_value",
            "winner"
        ],
        "{conflicts}"
    );
    beta_only(&test, "twelve", "");
    test.sync();
    let errors = test.run(&["errors", "--format", "json"]).json();
    assert_eq!(
        keys(&errors[0]),
        [
            "column",
            "file",
            "message",
            "row_number",
            "seen_at",
            "severity",
            "sheet",
            "source",
            "value"
        ]
    );
}
