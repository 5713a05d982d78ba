//! Two-way sync: store changes written back into real workbooks, the three-way merge and its
//! conflict policies, filtered views, safe writes.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{
    deal_sheet, file_report, read_xlsx, wait_until, Cell, TestDir, UserEdit, XlsxBuilder,
};

fn id_of(test: &TestDir, company: &str) -> String {
    test.deal_by("company", company)["id"]
        .as_i64()
        .expect("id")
        .to_string()
}

fn n_conflicts(test: &TestDir) -> usize {
    test.run(&["conflicts", "--format", "json"])
        .json()
        .as_array()
        .map(Vec::len)
        .unwrap_or(0)
}

#[test]
fn new_rows_get_their_crm_id_written_back_and_are_found_by_it() {
    let test = TestDir::new();
    deal_sheet(&[
        ["Acme", "Ann", "", "Lead", "1000", "Alice"],
        ["Beta", "Ben", "", "Lead", "2000", "Bob"],
    ])
    .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "match_on = []");
    let report = test.sync();
    report.assert_code(0);
    assert_eq!(
        file_report(&report.json(), "p.xlsx")["write_back"]["status"],
        "written"
    );

    let written = read_xlsx(&test.path("p.xlsx"), "Pipeline");
    let ids = written.column("CRM ID");
    assert_eq!(ids, vec![id_of(&test, "Acme"), id_of(&test, "Beta")]);
    assert!(
        test.path(".funnelsync/backups")
            .read_dir()
            .expect("backups folder")
            .count()
            >= 1,
        "the previous version is kept"
    );

    // A rep renames both companies: the ids say which deal each row is.
    let mut edited = XlsxBuilder::new().sheet("Pipeline").row(&[
        "Company", "Contact", "Email", "Stage", "Amount", "Owner", "CRM ID",
    ]);
    edited = edited.row(&["Acme Corp", "Ann", "", "Lead", "1000", "Alice", &ids[0]]);
    edited = edited.row(&["Beta GmbH", "Ben", "", "Lead", "2000", "Bob", &ids[1]]);
    edited.save(&test.path("p.xlsx"));
    let report = test.sync().json();
    assert_eq!(file_report(&report, "p.xlsx")["counts"]["updated"], 2);
    assert_eq!(file_report(&report, "p.xlsx")["counts"]["created"], 0);
    assert_eq!(test.deals().len(), 2);
}

#[test]
fn an_edit_in_one_file_reaches_the_other_and_filters_shape_the_view() {
    let test = TestDir::new();
    deal_sheet(&[
        ["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice"],
        ["Beta", "Ben", "ben@beta.com", "Lead", "2000", "Bob"],
    ])
    .save(&test.path("all.xlsx"));
    deal_sheet(&[]).save(&test.path("alice.xlsx"));
    test.config(
        "[[sources]]\nname = \"all\"\npath = \"all.xlsx\"\nview = \"all\"\n\n[[sources]]\nname = \"alice\"\npath = \"alice.xlsx\"\nfilter = { owner = \"Alice\" }\n",
    );
    test.sync().assert_code(0);
    let alice = read_xlsx(&test.path("alice.xlsx"), "Pipeline");
    assert_eq!(
        alice.column("Company"),
        vec!["Acme"],
        "Alice's file shows exactly her deals"
    );

    // Alice moves her deal on in her file and adds a row without an owner.
    let acme_id = id_of(&test, "Acme");
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&[
            "Company", "Contact", "Email", "Stage", "Amount", "Owner", "CRM ID",
        ])
        .row(&[
            "Acme",
            "Ann",
            "ann@acme.com",
            "Opportunity",
            "1000",
            "Alice",
            &acme_id,
        ])
        .row(&["Gamma", "Gus", "gus@gamma.com", "Lead", "500", "", ""])
        .save(&test.path("alice.xlsx"));
    test.sync().assert_code(0);
    assert_eq!(
        test.deal_by("company", "Gamma")["owner"],
        "Alice",
        "a new row in a filtered file takes the filter's values"
    );
    let all = read_xlsx(&test.path("all.xlsx"), "Pipeline");
    let companies = all.column("Company");
    let stages = all.column("Stage");
    let acme_row = companies
        .iter()
        .position(|company| company == "Acme")
        .expect("Acme in all.xlsx");
    assert_eq!(
        stages[acme_row], "Opportunity",
        "the edit in alice.xlsx reached all.xlsx"
    );
    assert!(
        companies.contains(&"Gamma".to_string()),
        "the new deal reached all.xlsx: {companies:?}"
    );

    // In the master file the deal is handed to Bob: it leaves Alice's file, and is not archived.
    UserEdit::open(&test.path("all.xlsx"), "Pipeline")
        .set("Company", "Acme", "Owner", "Bob")
        .save();
    test.sync().assert_code(0);
    let alice = read_xlsx(&test.path("alice.xlsx"), "Pipeline");
    assert_eq!(alice.column("Company"), vec!["Gamma"]);
    let acme = test.deal_by("company", "Acme");
    assert_eq!(acme["owner"], "Bob");
    assert!(
        acme["archived_at"].is_null(),
        "leaving a view is not an archival"
    );
}

#[test]
fn sheet_and_cli_changes_to_different_fields_are_both_kept() {
    let test = TestDir::new();
    deal_sheet(&[["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice"]])
        .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "");
    test.sync().assert_code(0);
    let id = id_of(&test, "Acme");
    test.run(&[
        "deals",
        "set",
        &id,
        "amount=¥5,000",
        "next_step=Send contract",
    ])
    .assert_code(0);

    UserEdit::open(&test.path("p.xlsx"), "Pipeline")
        .set("Company", "Acme", "Stage", "Prospect")
        .save();
    test.sync().assert_code(0);

    let acme = test.deal_by("company", "Acme");
    assert_eq!(acme["stage"], "Prospect", "the sheet's change");
    assert_eq!(acme["amount"], 5000.0, "the CLI's change");
    assert_eq!(acme["currency"], "CNY");
    assert_eq!(
        acme["extra"]["Next Step"],
        Value::Null,
        "next_step is a field, not an extra"
    );
    assert_eq!(acme["next_step"], "Send contract");
    let written = read_xlsx(&test.path("p.xlsx"), "Pipeline");
    assert_eq!(written.column("Amount"), vec!["5000"]);
    assert_eq!(written.column("Stage"), vec!["Prospect"]);
    assert_eq!(n_conflicts(&test), 0);
    let history = test.count("SELECT count(*) FROM stage_history WHERE source = 'pipeline'");
    assert_eq!(
        history, 2,
        "created in Lead, moved to Prospect by the sheet"
    );
}

/// The same field changed in the sheet and through the CLI between two syncs.
fn conflict_case(policy: &str, cli_first: bool) -> (TestDir, Value) {
    let test = TestDir::new();
    deal_sheet(&[["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice"]])
        .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", &format!("conflict = \"{policy}\""));
    test.sync().assert_code(0);
    let id = id_of(&test, "Acme");
    // The rep's edit of the file as it was before either change.
    let edit =
        UserEdit::open(&test.path("p.xlsx"), "Pipeline").set("Company", "Acme", "Amount", "2000");
    let save_sheet = move || edit.save();
    // Time stamps have millisecond precision: keep the two edits apart.
    if cli_first {
        test.run(&["deals", "set", &id, "amount=3000"])
            .assert_code(0);
        crate::harness::next_millisecond();
        save_sheet();
    } else {
        save_sheet();
        crate::harness::next_millisecond();
        test.run(&["deals", "set", &id, "amount=3000"])
            .assert_code(0);
    }
    let report = test.sync();
    report.assert_code(0);
    (test, report.json())
}

#[test]
fn conflicts_follow_the_policy_and_are_recorded() {
    for (policy, cli_first, expected) in [
        ("store", false, 3000.0),
        ("sheet", false, 2000.0),
        ("newest", true, 2000.0),
        ("newest", false, 3000.0),
    ] {
        let (test, report) = conflict_case(policy, cli_first);
        let acme = test.deal_by("company", "Acme");
        assert_eq!(
            acme["amount"], expected,
            "{policy} (cli first: {cli_first})"
        );
        let written = read_xlsx(&test.path("p.xlsx"), "Pipeline");
        assert_eq!(
            written.column("Amount"),
            vec![expected.to_string()],
            "{policy}: the file shows the winner"
        );
        let conflicts = test.run(&["conflicts", "--format", "json"]).json();
        let conflicts = conflicts.as_array().expect("array");
        assert_eq!(conflicts.len(), 1, "{policy}: one conflict record");
        assert_eq!(conflicts[0]["field"], "amount");
        assert_eq!(conflicts[0]["base_value"], "1000");
        assert_eq!(conflicts[0]["sheet_value"], "2000");
        assert_eq!(conflicts[0]["store_value"], "3000");
        assert_eq!(
            conflicts[0]["winner"],
            if expected == 2000.0 { "sheet" } else { "store" }
        );
        assert_eq!(conflicts[0]["policy"], policy);
        assert_eq!(file_report(&report, "p.xlsx")["conflicts"], 1);
        let table = test.run(&["conflicts"]);
        assert!(table.stdout.contains("amount"), "{}", table.stdout);
    }
}

#[test]
fn an_open_file_is_written_once_it_is_closed() {
    let test = TestDir::new();
    deal_sheet(&[["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice"]])
        .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "");
    test.sync().assert_code(0);
    let id = id_of(&test, "Acme");

    test.write("~$p.xlsx", b"owner file");
    test.run(&["deals", "move", &id, "Won"]).assert_code(0);
    let before = std::fs::read(test.path("p.xlsx")).expect("read");
    let report = test.sync().json();
    let write_back = &file_report(&report, "p.xlsx")["write_back"];
    assert_eq!(write_back["status"], "deferred", "{write_back}");
    assert!(
        write_back["message"]
            .as_str()
            .is_some_and(|message| message.contains("open in Excel")),
        "{write_back}"
    );
    assert_eq!(
        std::fs::read(test.path("p.xlsx")).expect("read"),
        before,
        "an open file is not written"
    );

    std::fs::remove_file(test.path("~$p.xlsx")).expect("close");
    test.sync().assert_code(0);
    assert_eq!(
        read_xlsx(&test.path("p.xlsx"), "Pipeline").column("Stage"),
        vec!["Won"]
    );
}

#[test]
fn a_formula_from_the_store_is_written_as_text() {
    let test = TestDir::new();
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Company", "Email", "Stage", "Next Step"])
        .row(&["Acme", "ann@acme.com", "Lead", "Call"])
        .save(&test.path("p.xlsx"));
    test.write(
        "p.csv",
        "Company;Email;Stage;Next Step\r\nBeta;ben@beta.com;Lead;Call\r\n",
    );
    test.config("[[sources]]\nname = \"xlsx\"\npath = \"p.xlsx\"\nview = \"all\"\n\n[[sources]]\nname = \"csv\"\npath = \"p.csv\"\nview = \"all\"\n");
    test.sync().assert_code(0);
    let id = id_of(&test, "Acme");
    let hyperlink = "=HYPERLINK(\"http://x\",\"y\")";
    test.run(&["deals", "set", &id, &format!("next_step={hyperlink}")])
        .assert_code(0);
    test.sync().assert_code(0);

    let written = read_xlsx(&test.path("p.xlsx"), "Pipeline");
    let next_steps = written.column("Next Step");
    let companies = written.column("Company");
    let acme_row = companies
        .iter()
        .position(|company| company == "Acme")
        .expect("Acme row");
    assert_eq!(
        next_steps[acme_row], hyperlink,
        "read back as the literal text"
    );
    assert!(
        written.formulas.is_empty(),
        "no formula was written: {:?}",
        written.formulas
    );

    let csv = std::fs::read_to_string(test.path("p.csv")).expect("csv");
    assert!(csv.contains("'=HYPERLINK("), "escaped in the CSV:\n{csv}");
    assert!(
        csv.contains(';') && csv.contains("\r\n"),
        "delimiter and line ending kept:\n{csv}"
    );
    // Reading the escaped CSV back gives the value, so nothing changes on the next sync.
    let report = test.sync().json();
    assert_eq!(
        file_report(&report, "p.csv")["counts"]["updated"],
        0,
        "{report}"
    );
    assert_eq!(test.deal_by("company", "Acme")["next_step"], hyperlink);
}

#[test]
fn other_sheets_unmapped_columns_and_their_formulas_survive() {
    let test = TestDir::new();
    XlsxBuilder::new()
        .sheet("Pipeline")
        .cells(
            ["Company", "Stage", "Amount", "Weighted", "Notes"]
                .map(Cell::from)
                .to_vec(),
        )
        .cells(vec![
            Cell::from("Acme"),
            Cell::from("Lead"),
            Cell::Number(1000.0),
            Cell::Formula("=C2*0.1".to_string(), "100".to_string()),
            Cell::from("VIP"),
        ])
        .sheet("Summary")
        .cells(vec![
            Cell::from("Total"),
            Cell::Formula("=SUM(Pipeline!C:C)".to_string(), "1000".to_string()),
        ])
        .cells(vec![Cell::from("Target"), Cell::Number(50000.0)])
        .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "sheet = \"Pipeline\"");
    test.sync().assert_code(0);
    let id = id_of(&test, "Acme");
    test.run(&["deals", "move", &id, "Prospect"]).assert_code(0);
    test.sync().assert_code(0);

    let pipeline = read_xlsx(&test.path("p.xlsx"), "Pipeline");
    assert_eq!(pipeline.sheet_names, vec!["Pipeline", "Summary"]);
    assert_eq!(pipeline.column("Stage"), vec!["Prospect"]);
    assert_eq!(pipeline.column("Notes"), vec!["VIP"]);
    assert_eq!(
        pipeline.formulas.get(&(1, 3)).map(String::as_str),
        Some("C2*0.1"),
        "{:?}",
        pipeline.formulas
    );
    let summary = read_xlsx(&test.path("p.xlsx"), "Summary");
    assert_eq!(summary.values[1], vec!["Target", "50000"]);
    assert_eq!(
        summary.formulas.get(&(0, 1)).map(String::as_str),
        Some("SUM(Pipeline!C:C)")
    );
    assert_eq!(test.deal_by("company", "Acme")["extra"]["Notes"], "VIP");
}

#[test]
fn an_unchanged_store_leaves_the_file_untouched() {
    let test = TestDir::new();
    deal_sheet(&[["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice"]])
        .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "");
    test.sync().assert_code(0);
    let bytes = std::fs::read(test.path("p.xlsx")).expect("read");
    let modified = std::fs::metadata(test.path("p.xlsx"))
        .and_then(|metadata| metadata.modified())
        .expect("mtime");
    crate::harness::next_millisecond();
    let report = test.sync().json();
    assert_eq!(
        file_report(&report, "p.xlsx")["write_back"]["status"],
        "up_to_date"
    );
    assert_eq!(std::fs::read(test.path("p.xlsx")).expect("read"), bytes);
    assert_eq!(
        std::fs::metadata(test.path("p.xlsx"))
            .and_then(|metadata| metadata.modified())
            .expect("mtime"),
        modified
    );
}

#[test]
fn a_gb18030_csv_is_written_back_in_gb18030_with_its_delimiter() {
    let test = TestDir::new();
    let (bytes, _, _) = encoding_rs::GB18030.encode("公司;阶段;负责人\r\n甲公司;线索;王伟\r\n");
    test.write("leads.csv", &bytes);
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Company", "Stage", "Owner"])
        .row(&["乙公司", "机会", "王伟"])
        .save(&test.path("p.xlsx"));
    test.config("[[sources]]\nname = \"leads\"\npath = \"leads.csv\"\nview = \"all\"\n\n[[sources]]\nname = \"p\"\npath = \"p.xlsx\"\n");
    test.sync().assert_code(0);
    let written = std::fs::read(test.path("leads.csv")).expect("read");
    assert!(std::str::from_utf8(&written).is_err(), "still not UTF-8");
    let (text, _, had_errors) = encoding_rs::GB18030.decode(&written);
    assert!(!had_errors);
    assert!(text.starts_with("公司;阶段;负责人;CRM ID\r\n"), "{text}");
    assert!(
        text.contains("乙公司;Opportunity;王伟;"),
        "the other file's deal is shown: {text}"
    );
}

#[test]
fn the_cli_change_reaches_the_file_through_the_running_daemon() {
    let test = TestDir::new();
    std::fs::create_dir_all(test.path("share")).expect("share");
    deal_sheet(&[["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice"]])
        .save(&test.path("share/p.xlsx"));
    test.config("[watch]\nsettle = \"300ms\"\npoll_interval = \"30s\"\n\n[[sources]]\nname = \"share\"\npath = \"share\"\n");
    let daemon = test.start_daemon();
    daemon.wait_ready();
    let id = id_of(&test, "Acme");
    test.run(&["deals", "move", &id, "Opportunity"])
        .assert_code(0);
    wait_until(
        Duration::from_secs(10),
        "the daemon to write the move into the file",
        || read_xlsx(&test.path("share/p.xlsx"), "Pipeline").column("Stage") == vec!["Opportunity"],
    );
    let n_runs = test.count("SELECT count(*) FROM sync_runs");
    // The daemon sees its own write as a change of the file, lets it settle, and finds it holds
    // what it wrote.
    wait_until(
        Duration::from_secs(10),
        "the daemon to look at its own write",
        || {
            daemon
                .log()
                .lines()
                .any(|line| line.contains("nothing to do") && line.contains("p.xlsx"))
        },
    );
    assert_eq!(
        test.count("SELECT count(*) FROM sync_runs"),
        n_runs,
        "the daemon's own write does not trigger another sync:\n{}",
        daemon.log()
    );
    let history = test.count("SELECT count(*) FROM stage_history WHERE source = 'cli'");
    assert_eq!(history, 1);
}
