//! The safety net: the mass-delete guard, history and undo, limits against hostile input, and the
//! defined behaviour for odd workbooks.

use serde_json::{json, Value};

use crate::harness::{file_report, read_xlsx, Cell, TestDir, UserEdit, XlsxBuilder};

const HEADER: [&str; 4] = ["Company", "Email", "Stage", "Amount"];

fn sheet_of(n_rows: usize) -> XlsxBuilder {
    let mut builder = XlsxBuilder::new().sheet("Pipeline").row(&HEADER);
    for index in 0..n_rows {
        let company = format!("Company {index}");
        let email = format!("c{index}@example.com");
        builder = builder.row(&[&company, &email, "Lead", "1000"]);
    }
    builder
}

fn n_live(test: &TestDir) -> i64 {
    test.count("SELECT count(*) FROM deals WHERE archived_at IS NULL")
}

#[test]
fn a_file_that_lost_most_of_its_rows_is_held_until_forced() {
    let test = TestDir::new();
    sheet_of(10).save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "write_back = false");
    test.sync().assert_code(0);

    // Someone sorted and deleted by mistake: 6 of 10 rows gone (more than the default 50%).
    sheet_of(4).save(&test.path("p.xlsx"));
    let run = test.sync();
    run.assert_code(1);
    let report = run.json();
    let file = file_report(&report, "p.xlsx");
    assert_eq!(file["status"], "held");
    assert!(
        file["error"]
            .as_str()
            .is_some_and(|error| error.contains("would remove 6 of the 10 rows")),
        "{file}"
    );
    assert_eq!(n_live(&test), 10, "nothing applied");
    let status = test.run(&["status", "--format", "json"]).json();
    assert_eq!(status[0]["last_status"], "held");

    // An empty sheet (header only) is held the same way.
    sheet_of(0).save(&test.path("p.xlsx"));
    assert_eq!(file_report(&test.sync().json(), "p.xlsx")["status"], "held");
    assert_eq!(n_live(&test), 10);

    // The admin confirms.
    sheet_of(4).save(&test.path("p.xlsx"));
    let forced = test.run(&["sync", "--force", "p.xlsx", "--format", "json"]);
    forced.assert_code(0);
    assert_eq!(
        file_report(&forced.json(), "p.xlsx")["counts"]["archived"],
        6
    );
    assert_eq!(n_live(&test), 4);

    // A few rows removed is normal work, not held.
    sheet_of(3).save(&test.path("p.xlsx"));
    assert_eq!(
        file_report(&test.sync().json(), "p.xlsx")["status"],
        "synced"
    );
}

#[test]
fn max_delete_as_a_count() {
    let test = TestDir::new();
    sheet_of(10).save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "write_back = false\nmax_delete = 1");
    test.sync().assert_code(0);
    sheet_of(8).save(&test.path("p.xlsx"));
    assert_eq!(file_report(&test.sync().json(), "p.xlsx")["status"], "held");
    sheet_of(9).save(&test.path("p.xlsx"));
    assert_eq!(
        file_report(&test.sync().json(), "p.xlsx")["status"],
        "synced"
    );
}

#[test]
fn history_lists_runs_and_undo_restores_them() {
    let test = TestDir::new();
    sheet_of(3).save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "write_back = false");
    test.sync().assert_code(0);

    // One run changes an amount, a stage, and removes a row.
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&HEADER)
        .row(&["Company 0", "c0@example.com", "Won", "5000"])
        .row(&["Company 1", "c1@example.com", "Lead", "1000"])
        .save(&test.path("p.xlsx"));
    let run_id = file_report(&test.sync().json(), "p.xlsx")["run_id"]
        .as_i64()
        .expect("run id");
    let history = test.run(&["history", "--format", "json"]).json();
    assert_eq!(history[0]["id"], run_id);
    assert_eq!(history[0]["counts"]["updated"], 1);
    assert_eq!(history[0]["counts"]["archived"], 1);
    let changes = test
        .run(&["history", &run_id.to_string(), "--format", "json"])
        .json();
    let kinds: Vec<(&str, &str, &str, &str)> = changes["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|change| {
            (
                change["kind"].as_str().unwrap_or(""),
                change["field"].as_str().unwrap_or(""),
                change["old_value"].as_str().unwrap_or(""),
                change["new_value"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("update", "stage", "Lead", "Won")),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("update", "amount", "1000", "5000")),
        "{kinds:?}"
    );
    assert!(kinds.contains(&("archive", "", "", "")), "{kinds:?}");

    let undo = test.run(&["undo", &run_id.to_string()]);
    undo.assert_code(0);
    let company0 = test.deal_by("company", "Company 0");
    assert_eq!(company0["stage"], "Lead");
    assert_eq!(company0["amount"], 1000.0);
    assert!(
        test.deal_by("company", "Company 2")["archived_at"].is_null(),
        "the archival was undone"
    );
    let stage_history = test.count("SELECT count(*) FROM stage_history WHERE source = 'undo'");
    assert_eq!(
        stage_history, 1,
        "the stage move back is in the stage history"
    );

    // The undo is a run of its own and can be undone too.
    let undo_run = test.run(&["history", "--format", "json"]).json()[0]["id"]
        .as_i64()
        .expect("undo run");
    assert_eq!(
        test.run(&["history", "--format", "json"]).json()[0]["source"],
        "undo"
    );
    test.run(&["undo", &undo_run.to_string()]).assert_code(0);
    assert_eq!(test.deal_by("company", "Company 0")["stage"], "Won");
}

#[test]
fn undo_skips_fields_changed_later_unless_forced() {
    let test = TestDir::new();
    sheet_of(1).save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "write_back = false");
    test.sync().assert_code(0);
    let id = test.deal_by("company", "Company 0")["id"]
        .as_i64()
        .expect("id")
        .to_string();
    test.run(&["deals", "set", &id, "amount=2000", "owner=Alice"])
        .assert_code(0);
    let cli_run = test.run(&["history", "--format", "json"]).json()[0]["id"]
        .as_i64()
        .expect("run");
    test.run(&["deals", "set", &id, "amount=3000"])
        .assert_code(0);

    let undo = test.run(&["undo", &cli_run.to_string()]);
    undo.assert_code(1);
    assert!(
        undo.stdout.contains("skipped: deal") && undo.stdout.contains("amount"),
        "{}",
        undo.stdout
    );
    let deal = test.deal_by("company", "Company 0");
    assert_eq!(
        deal["amount"], 3000.0,
        "the later change is not overwritten"
    );
    assert_eq!(deal["owner"], Value::Null, "the owner change was reverted");
    test.run(&["undo", &cli_run.to_string(), "--force"])
        .assert_code(0);
    assert_eq!(test.deal_by("company", "Company 0")["amount"], 1000.0);
}

#[test]
fn undo_in_a_write_back_file_reaches_the_file() {
    let test = TestDir::new();
    sheet_of(2).save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "");
    test.sync().assert_code(0);
    UserEdit::open(&test.path("p.xlsx"), "Pipeline")
        .set_all("Stage", "Prospect")
        .save();
    let run_id = file_report(&test.sync().json(), "p.xlsx")["run_id"]
        .as_i64()
        .expect("run");
    test.run(&["undo", &run_id.to_string()]).assert_code(0);
    test.sync().assert_code(0);
    assert_eq!(
        read_xlsx(&test.path("p.xlsx"), "Pipeline").column("Stage"),
        vec!["Lead", "Lead"]
    );
}

#[test]
fn hostile_and_odd_inputs_have_defined_behaviour() {
    let test = TestDir::new();
    std::fs::create_dir_all(test.path("share")).expect("share");
    // Not a zip at all.
    test.write(
        "share/not-a-zip.xlsx",
        b"this is a text file renamed to .xlsx",
    );
    // A workbook Excel saved with a password (Office agile encryption; see
    // tests/fixtures/make_encrypted.py).
    test.write(
        "share/encrypted.xlsx",
        include_bytes!("../fixtures/encrypted.xlsx"),
    );
    // Binary junk in a .csv.
    test.write(
        "share/binary.csv",
        b"Company,Stage\n\x00\x01\x02\xff\xfe,Lead\n",
    );
    // Error cells and a formula with a cached value.
    XlsxBuilder::new()
        .sheet("Pipeline")
        .cells(
            ["Company", "Stage", "Amount", "Notes"]
                .map(Cell::from)
                .to_vec(),
        )
        .cells(vec![
            Cell::from("Acme"),
            Cell::from("Lead"),
            Cell::Formula("=2*500".to_string(), "1000".to_string()),
            Cell::Formula("=NA()".to_string(), "#N/A".to_string()),
        ])
        .cells(vec![
            Cell::from("Beta"),
            Cell::from("Lead"),
            Cell::Formula("=1/0".to_string(), "#DIV/0!".to_string()),
        ])
        .save(&test.path("share/formulas.xlsx"));
    test.config("[[sources]]\nname = \"share\"\npath = \"share\"\nwrite_back = false\n");
    let run = test.sync();
    run.assert_code(1);
    let report = run.json();
    let not_zip = file_report(&report, "not-a-zip.xlsx");
    assert_eq!(not_zip["status"], "failed");
    let encrypted = file_report(&report, "encrypted.xlsx");
    assert_eq!(encrypted["status"], "failed");
    assert_eq!(
        encrypted["error"],
        format!(
            "{} is password-protected; funnelsync cannot read encrypted workbooks",
            test.path("share/encrypted.xlsx").display()
        ),
        "{encrypted}"
    );
    // Waiting does not decrypt it: it is not retried as if half-saved.
    assert_eq!(encrypted["retryable"], false, "{encrypted}");
    let binary = file_report(&report, "binary.csv");
    assert_eq!(binary["status"], "failed");
    assert!(
        binary["error"]
            .as_str()
            .is_some_and(|error| error.contains("binary")),
        "{binary}"
    );
    let formulas = file_report(&report, "formulas.xlsx");
    assert_eq!(formulas["counts"]["created"], 1);
    assert_eq!(formulas["issues"][0]["row_number"], 3);
    let acme = test.deal_by("company", "Acme");
    assert_eq!(acme["amount"], 1000.0, "a formula's cached value is read");
    assert_eq!(
        acme["extra"],
        json!({ "Notes": "#N/A" }),
        "an error cell in an unmapped column is kept as text"
    );
}

#[test]
fn limits_stop_oversized_files_and_nothing_is_applied() {
    let test = TestDir::new();
    sheet_of(30).save(&test.path("p.xlsx"));
    test.write(
        "wide.csv",
        format!(
            "Company,Stage,{}\nAcme,Lead\n",
            (0..50)
                .map(|index| format!("c{index}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
    );
    test.write(
        "long.csv",
        format!("Company,Stage\n{},Lead\n", "x".repeat(5000)),
    );
    test.config(
        "[limits]\nmax_rows = 20\nmax_columns = 40\nmax_cell_chars = 1000\n\n[[sources]]\nname = \"p\"\npath = \"p.xlsx\"\nwrite_back = false\n\n[[sources]]\nname = \"wide\"\npath = \"wide.csv\"\nwrite_back = false\n\n[[sources]]\nname = \"long\"\npath = \"long.csv\"\nwrite_back = false\n",
    );
    let run = test.sync();
    run.assert_code(1);
    let report = run.json();
    for (file, fragment) in [
        ("p.xlsx", "rows"),
        ("wide.csv", "columns"),
        ("long.csv", "characters"),
    ] {
        let file_report = file_report(&report, file);
        assert_eq!(file_report["status"], "failed", "{file}");
        assert!(
            file_report["error"]
                .as_str()
                .is_some_and(|error| error.contains(fragment) && error.contains("limit")),
            "{file}: {file_report}"
        );
    }
    assert_eq!(n_live(&test), 0);
}

#[test]
fn a_zip_bomb_is_refused() {
    let test = TestDir::new();
    // 20 MB of near-identical text compresses to a small file.
    let mut builder = XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Company", "Stage"]);
    for index in 0..700 {
        let company = format!("{index}{}", "A".repeat(30_000));
        builder = builder.row(&[&company, "Lead"]);
    }
    builder.save(&test.path("bomb.xlsx"));
    assert!(
        std::fs::metadata(test.path("bomb.xlsx"))
            .expect("size")
            .len()
            < 1_000_000
    );
    test.config("[limits]\nmax_unzipped_mb = 10\n\n[[sources]]\nname = \"p\"\npath = \"bomb.xlsx\"\nwrite_back = false\n");
    let report = test.sync().json();
    let file = file_report(&report, "bomb.xlsx");
    assert_eq!(file["status"], "failed");
    assert!(
        file["error"]
            .as_str()
            .is_some_and(|error| error.contains("uncompressed")),
        "{file}"
    );
}

#[test]
fn the_admin_is_alerted_once_when_a_file_is_held() {
    use std::time::Duration;
    let smtp = crate::harness::SmtpServer::start(0);
    let test = TestDir::new();
    std::fs::create_dir_all(test.path("share")).expect("share");
    sheet_of(10).save(&test.path("share/p.xlsx"));
    test.config(&format!(
        "[watch]\nsettle = \"300ms\"\npoll_interval = \"30s\"\n\n[alerts]\nto = \"it@example.com\"\n\n[smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"funnelsync@example.com\"\n\n[[sources]]\nname = \"share\"\npath = \"share\"\nwrite_back = false\n",
        smtp.port
    ));
    let daemon = test.start_daemon();
    daemon.wait_ready();
    sheet_of(2).save(&test.path("share/p.xlsx"));
    crate::harness::wait_until(Duration::from_secs(10), "the alert", || {
        !smtp.to("it@example.com").is_empty()
    });
    let alert = &smtp.to("it@example.com")[0];
    assert_eq!(alert.subject(), "funnelsync: p.xlsx is held");
    assert!(
        alert.bodies().0.contains("would remove 8 of the 10 rows"),
        "{}",
        alert.bodies().0
    );
    assert_eq!(n_live(&test), 10);
    // The same file held again within the hour: no second email.
    sheet_of(1).save(&test.path("share/p.xlsx"));
    crate::harness::wait_until(Duration::from_secs(10), "the second hold", || {
        test.count("SELECT count(*) FROM sync_runs WHERE status = 'held'") >= 2
    });
    crate::harness::wait_until(
        Duration::from_secs(10),
        "the second alert held back",
        || daemon.log().contains("not sent again"),
    );
    assert_eq!(smtp.to("it@example.com").len(), 1, "{}", daemon.log());
    let status = test.run(&["status"]);
    assert!(status.stdout.contains("held"), "{}", status.stdout);
}

#[test]
fn merged_header_cells_and_hidden_rows_have_defined_behaviour() {
    let test = TestDir::new();
    let mut workbook = rust_xlsxwriter::Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.set_name("Pipeline").expect("name");
    // "Company" merged over A1:B1: its text is in A1 only.
    sheet
        .merge_range(0, 0, 0, 1, "Company", &rust_xlsxwriter::Format::new())
        .expect("merge");
    sheet.write_string(0, 2, "Stage").expect("write");
    for (row, company) in [(1, "Acme"), (2, "Hidden Co")] {
        sheet.write_string(row, 0, company).expect("write");
        sheet.write_string(row, 1, "second half").expect("write");
        sheet.write_string(row, 2, "Lead").expect("write");
    }
    sheet.set_row_hidden(2).expect("hide");
    workbook.save(test.path("p.xlsx")).expect("save");
    test.single_source("p.xlsx", "write_back = false");
    test.sync().assert_code(0);
    let hidden = test.deal_by("company", "Hidden Co");
    assert_eq!(
        hidden["stage"], "Lead",
        "hidden rows are read like visible ones"
    );
    assert_eq!(
        hidden["extra"],
        json!({ "Column B": "second half" }),
        "the merged part's data is kept by column letter"
    );
}
