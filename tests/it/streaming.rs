//! The sync as a stream: rows unchanged since the last sync are not cleaned again, yet still
//! receive store-side changes and still count for removals; a sync killed in the middle of a
//! streamed import leaves the store as it was.

use std::time::Duration;

use crate::harness::{file_report, wait_until, TestDir};

/// A CSV of `n_rows` leads.
fn leads(n_rows: usize, changed: Option<usize>) -> String {
    let mut text = String::from("Company,Contact,Email,Stage,Amount\n");
    for row in 0..n_rows {
        let amount = if Some(row) == changed {
            99_999
        } else {
            1000 + row
        };
        text.push_str(&format!(
            "Company {row},Contact {row},contact{row}@example.com,Lead,{amount}\n"
        ));
    }
    text
}

fn sync_logging(test: &TestDir) -> (serde_json::Value, String) {
    let output = test
        .command(&["sync", "--format", "json"])
        .env("RUST_LOG", "funnelsync=debug")
        .output()
        .expect("run funnelsync");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|error| panic!("not JSON ({error}): {stdout}\n{stderr}"));
    (report, stderr)
}

#[test]
fn rows_unchanged_since_the_last_sync_are_not_cleaned_but_still_hear_of_the_store() {
    let test = TestDir::new();
    test.write("leads.csv", leads(50, None));
    test.single_source("leads.csv", "");
    let (_, log) = sync_logging(&test);
    assert!(
        log.contains("quiet=0 cleaned=50"),
        "a first import cleans every row:\n{log}"
    );

    // One cell edited in the sheet: one row is cleaned, 49 are not.
    test.write(
        "leads.csv",
        std::fs::read_to_string(test.path("leads.csv"))
            .expect("read")
            .replace("1007", "7777"),
    );
    let (report, log) = sync_logging(&test);
    assert!(log.contains("quiet=49 cleaned=1"), "{log}");
    assert_eq!(file_report(&report, "leads.csv")["counts"]["updated"], 1);
    assert_eq!(test.deal_by("company", "Company 7")["amount"], 7777.0);

    // A deal changed in the store: its row, unchanged in the sheet, is looked at again and the
    // change reaches the file.
    let deal = test.deal_by("company", "Company 20")["id"].to_string();
    test.run(&["deals", "set", &deal, "stage=Won"])
        .assert_code(0);
    let (report, log) = sync_logging(&test);
    assert!(log.contains("quiet=49 cleaned=1"), "{log}");
    assert_eq!(
        file_report(&report, "leads.csv")["write_back"]["status"],
        "written"
    );
    let written = std::fs::read_to_string(test.path("leads.csv")).expect("read");
    let row = written
        .lines()
        .find(|line| line.starts_with("Company 20,"))
        .expect("row of Company 20");
    assert!(row.contains(",Won,"), "{row}");

    // A row taken out of the sheet is still seen as gone. (The row the write-back changed is
    // cleaned once more: its cells no longer hash as they were read.)
    let without: String = written
        .lines()
        .filter(|line| !line.starts_with("Company 30,"))
        .map(|line| format!("{line}\n"))
        .collect();
    test.write("leads.csv", without);
    let (report, log) = sync_logging(&test);
    assert_eq!(
        file_report(&report, "leads.csv")["counts"]["archived"],
        1,
        "{log}"
    );
    assert!(log.contains("quiet=48 cleaned=1"), "{log}");
    let (_, log) = sync_logging(&test);
    assert!(
        log.contains("not parsed"),
        "after that the file is known unchanged and not even parsed: {log}"
    );
}

#[test]
fn a_sync_killed_in_the_middle_of_a_streamed_import_leaves_the_store_as_it_was() {
    let test = TestDir::new();
    let n_rows = 40_000;
    test.write("leads.csv", leads(n_rows, None));
    test.single_source("leads.csv", "write_back = false");
    // A store that exists before the import, so the kill can only undo the import.
    test.run(&["check-config"]).assert_code(0);
    test.write(
        "other.csv",
        leads(3, None)
            .replace("Company", "Other")
            .replace("contact", "other"),
    );
    test.config("[[sources]]\nname = \"other\"\npath = \"other.csv\"\nwrite_back = false\n");
    test.sync().assert_code(0);
    assert_eq!(test.deals().len(), 3);
    test.single_source("leads.csv", "write_back = false");

    let mut child = test.command(&["sync"]).spawn().expect("start sync");
    // Kill it once the import's transaction has written a good part of its pages (SQLite), or
    // has been writing for a moment (PostgreSQL: the server gave it a transaction id).
    let wal = test.path("state/crm.db-wal");
    wait_until(
        Duration::from_secs(60),
        "the import to be under way",
        || match &test.database {
            None => std::fs::metadata(&wal).is_ok_and(|metadata| metadata.len() > 1 << 20),
            Some(_) => {
                test.count(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND application_name = 'funnelsync' AND backend_xid IS NOT NULL",
                ) > 0
            }
        },
    );
    if test.database.is_some() {
        std::thread::sleep(Duration::from_millis(300));
    }
    child.kill().expect("kill");
    let _ = child.wait();
    assert_eq!(
        test.count("SELECT count(*) FROM deals"),
        3,
        "nothing of the killed import is in the store"
    );
    assert_eq!(
        test.count("SELECT count(*) FROM mirror_rows WHERE file LIKE '%leads.csv'"),
        0
    );

    // The next sync imports every row, once.
    test.sync().assert_code(0);
    assert_eq!(test.count("SELECT count(*) FROM deals"), n_rows as i64 + 3);
    assert_eq!(
        test.count("SELECT count(DISTINCT email) FROM deals"),
        n_rows as i64 + 3
    );
}

#[test]
fn a_sheet_reordered_across_batches_loses_only_the_rows_taken_out() {
    // Far more rows than one batch of the stream (512 rows read at a time, 2,048 applied at a
    // time), so that a row moved from the top to the bottom is read in a different batch than the
    // one its deal was matched in last time.
    let n_rows = 6_000;
    let test = TestDir::new();
    test.write("leads.csv", leads(n_rows, None));
    test.single_source("leads.csv", "write_back = false");
    test.sync().assert_code(0);
    assert_eq!(test.count("SELECT count(*) FROM deals"), n_rows as i64);

    let moved_ids: Vec<(&str, serde_json::Value)> = ["Company 0", "Company 99", "Company 5999"]
        .into_iter()
        .map(|company| (company, test.deal_by("company", company)["id"].clone()))
        .collect();

    // The first 100 rows go to the bottom and the last 100 to the top; three rows, each in another
    // batch, are taken out; one cell changes in the middle.
    let text = leads(n_rows, Some(4_500));
    let mut lines: Vec<&str> = text.lines().collect();
    let header = lines.remove(0);
    let removed = ["Company 10,", "Company 3000,", "Company 5990,"];
    lines.retain(|line| !removed.iter().any(|prefix| line.starts_with(prefix)));
    let n_kept = lines.len();
    let mut reordered: Vec<&str> = Vec::with_capacity(n_kept);
    reordered.extend_from_slice(&lines[n_kept - 100..]);
    reordered.extend_from_slice(&lines[100..n_kept - 100]);
    reordered.extend_from_slice(&lines[..100]);
    test.write("leads.csv", format!("{header}\n{}\n", reordered.join("\n")));
    let (report, log) = sync_logging(&test);
    let counts = &file_report(&report, "leads.csv")["counts"];
    assert_eq!(counts["archived"], 3, "{log}");
    assert_eq!(counts["updated"], 1, "{log}");
    assert_eq!(counts["created"], 0, "{log}");
    assert_eq!(
        test.count("SELECT count(*) FROM deals WHERE archived_at IS NULL"),
        n_rows as i64 - 3
    );
    assert_eq!(test.deal_by("company", "Company 4500")["amount"], 99_999.0);
    for company in ["Company 10", "Company 3000", "Company 5990"] {
        assert!(
            !test.deal_by("company", company)["archived_at"].is_null(),
            "{company} was taken out of the sheet"
        );
    }
    // The moved rows kept their deals.
    assert_eq!(test.count("SELECT count(*) FROM deals"), n_rows as i64);
    for (company, id) in &moved_ids {
        assert_eq!(&test.deal_by("company", company)["id"], id, "{company}");
    }

    // Nothing is left to do.
    let (report, log) = sync_logging(&test);
    let counts = &file_report(&report, "leads.csv")["counts"];
    assert_eq!(counts["archived"], 0, "{log}");
    assert_eq!(counts["updated"], 0, "{log}");
}

#[test]
fn a_new_deals_row_is_stored_once_and_still_serves_as_the_base_of_a_merge() {
    let test = TestDir::new();
    test.write("leads.csv", leads(3, None));
    test.single_source("leads.csv", "write_back = false");
    test.sync().assert_code(0);
    // The mirror rows of the deals the import created refer to their creation records instead
    // of holding the same fields again.
    assert_eq!(
        test.count("SELECT count(*) FROM mirror_rows WHERE fields = ''"),
        3
    );
    assert_eq!(
        test.count(
            "SELECT count(*) FROM changes WHERE kind = 'create' AND new_value LIKE '%Contact 1%'"
        ),
        1
    );

    // The store moves the deal on; the rep retypes the contact on its row. The three-way merge
    // needs the row as imported as its base: with it, the stage the sheet never touched is the
    // store's, and the contact is the sheet's, without a conflict.
    let id = test.deal_by("company", "Company 1")["id"].to_string();
    test.run(&["deals", "set", &id, "stage=Prospect"])
        .assert_code(0);
    test.write(
        "leads.csv",
        leads(3, None).replace("Contact 1,", "Contact One,"),
    );
    test.sync().assert_code(0);
    let deal = test.deal_by("company", "Company 1");
    assert_eq!(deal["stage"], "Prospect", "{deal}");
    assert_eq!(deal["contact"], "Contact One", "{deal}");
    assert_eq!(test.count("SELECT count(*) FROM conflicts"), 0);
    // The changed row now holds its own values; the others still refer to their creation.
    assert_eq!(
        test.count("SELECT count(*) FROM mirror_rows WHERE fields = ''"),
        2
    );
}
