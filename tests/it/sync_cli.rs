//! `funnelsync sync`, `deals list` and `errors` on real files, a real store and the real binary.

use serde_json::json;

use crate::harness::{file_report, Cell, TestDir, XlsxBuilder};

const HEADER: [&str; 7] = [
    "Company", "Contact", "Email", "Stage", "Amount", "Owner", "Notes",
];

fn pipeline(rows: &[[&str; 7]]) -> XlsxBuilder {
    let mut builder = XlsxBuilder::new().sheet("Pipeline").row(&HEADER);
    for row in rows {
        builder = builder.row(row);
    }
    builder
}

#[test]
fn chinese_headers_and_stage_names_become_deals() {
    let test = TestDir::new();
    XlsxBuilder::new()
        .sheet("销售")
        .row(&["2026 销售管道"])
        .skip_rows(1)
        .row(&[
            "公司",
            "联系人",
            "邮箱",
            "阶段",
            "金额",
            "负责人",
            "下一步",
            "备注",
        ])
        .row(&[
            "北京星辰科技",
            "张伟",
            "zw@xingchen.cn",
            "意向客户",
            "¥12,000",
            "王伟",
            "发送报价",
            "重要客户",
        ])
        .row(&[
            "上海云帆物流",
            "李娜",
            "lina@yunfan.cn",
            "成交",
            "8.5万",
            "王伟",
            "",
            "",
        ])
        .row(&[
            "Acme",
            "Bob",
            "bob@acme.com",
            "潜在客户",
            "$1,200",
            "Alice Wang",
            "Call",
            "",
        ])
        .save(&test.path("销售管道.xlsx"));
    test.single_source("销售管道.xlsx", "");

    let run = test.sync();
    run.assert_code(0);
    let report = run.json();
    let file = file_report(&report, "销售管道.xlsx");
    assert_eq!(file["status"], "synced");
    assert_eq!(file["counts"]["created"], 3);
    assert_eq!(file["sheet"], "销售");

    let xingchen = test.deal_by("company", "北京星辰科技");
    assert_eq!(xingchen["stage"], "Prospect");
    assert_eq!(xingchen["amount"], 12000.0);
    assert_eq!(xingchen["currency"], "CNY");
    assert_eq!(xingchen["owner"], "王伟");
    assert_eq!(xingchen["next_step"], "发送报价");
    assert_eq!(xingchen["extra"], json!({ "备注": "重要客户" }));
    let yunfan = test.deal_by("company", "上海云帆物流");
    assert_eq!(yunfan["stage"], "Won");
    assert_eq!(yunfan["amount"], 85000.0);
    assert_eq!(test.deal_by("company", "Acme")["stage"], "Lead");

    // The stage filter accepts aliases too.
    let won = test.run(&["deals", "list", "--stage", "成交", "--format", "json"]);
    assert_eq!(won.json().as_array().map(Vec::len), Some(1));
    // The table aligns wide characters and groups thousands; amounts line up on the digit, the
    // currency in a column of its own.
    let table = test.run(&["deals", "list"]);
    assert!(table.stdout.contains("12,000  CNY"), "{}", table.stdout);
    assert!(table.stdout.contains(" 1,200  USD"), "{}", table.stdout);
}

#[test]
fn a_large_csv_in_utf8_or_gb18030_is_read_to_its_last_row() {
    // Well past the reader's 64 KB chunks: every chunk boundary must continue the parse, in
    // whichever byte of a row (or of a Chinese character) it falls.
    for (name, encoding) in [
        ("utf8.csv", encoding_rs::UTF_8),
        ("gbk.csv", encoding_rs::GB18030),
    ] {
        let test = TestDir::new();
        let n_rows = 8_000;
        let mut text = String::from("公司,阶段,金额,负责人\r\n");
        for row_idx in 0..n_rows {
            text.push_str(&format!("上海云帆物流{row_idx},线索,{row_idx},王伟\r\n"));
        }
        let (bytes, _, _) = encoding.encode(&text);
        assert!(bytes.len() > 3 * 65_536, "{}", bytes.len());
        test.write(&format!("share/{name}"), &*bytes);
        test.config("[[sources]]\nname = \"share\"\npath = \"share\"\nwrite_back = false\n");
        test.sync().assert_code(0);
        let deals = test.deals();
        assert_eq!(deals.len(), n_rows, "{name}");
        assert!(
            deals
                .iter()
                .any(|deal| deal["company"] == format!("上海云帆物流{}", n_rows - 1)),
            "{name}: the last row is a deal"
        );
    }
}

#[test]
fn dates_and_amounts_in_every_written_form_are_cleaned() {
    let test = TestDir::new();
    let header = ["Company", "Amount", "Last Contact", "Expected Close"]
        .map(Cell::from)
        .to_vec();
    let row = |company: &str, amount: Cell, last: Cell, close: Cell| {
        vec![Cell::from(company), amount, last, close]
    };
    XlsxBuilder::new()
        .sheet("Pipeline")
        .cells(header)
        .cells(row(
            "A",
            Cell::Number(12000.0),
            Cell::Date(2026, 11, 28),
            Cell::from("2026-12-01"),
        ))
        .cells(row(
            "B",
            Cell::from("12,000"),
            Cell::Number(46354.0),
            Cell::from("2026/12/02"),
        ))
        .cells(row(
            "C",
            Cell::from("¥12,000.50"),
            Cell::from("2026.11.28"),
            Cell::from("2026年12月3日"),
        ))
        .cells(row(
            "D",
            Cell::from("$1,200"),
            Cell::from("03/04/2026"),
            Cell::from("28/11/2026"),
        ))
        .cells(row("E", Cell::from("1 200,50 €"), Cell::Empty, Cell::Empty))
        .save(&test.path("dates.xlsx"));
    test.single_source("dates.xlsx", "date_order = \"dmy\"");

    test.sync().assert_code(0);
    let expectations = [
        (
            "A",
            json!(12000.0),
            json!(null),
            json!("2026-11-28"),
            json!("2026-12-01"),
        ),
        (
            "B",
            json!(12000.0),
            json!(null),
            json!("2026-11-28"),
            json!("2026-12-02"),
        ),
        (
            "C",
            json!(12000.5),
            json!("CNY"),
            json!("2026-11-28"),
            json!("2026-12-03"),
        ),
        (
            "D",
            json!(1200.0),
            json!("USD"),
            json!("2026-04-03"),
            json!("2026-11-28"),
        ),
        ("E", json!(1200.5), json!("EUR"), json!(null), json!(null)),
    ];
    for (company, amount, currency, last_contact, expected_close) in expectations {
        let deal = test.deal_by("company", company);
        assert_eq!(deal["amount"], amount, "{company}");
        assert_eq!(deal["currency"], currency, "{company}");
        assert_eq!(deal["last_contact"], last_contact, "{company}");
        assert_eq!(deal["expected_close"], expected_close, "{company}");
    }
}

#[test]
fn a_bad_amount_is_reported_with_its_row_and_the_rest_is_applied() {
    let test = TestDir::new();
    let mut builder = XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Q4 pipeline"])
        .skip_rows(1)
        .row(&HEADER);
    // Data starts on Excel row 4; put the bad amount on row 14.
    for index in 0..12 {
        let company = format!("Company {index}");
        let email = format!("c{index}@example.com");
        let amount = if index == 10 {
            "twelve".to_string()
        } else {
            format!("{}", 1000 * (index + 1))
        };
        builder = builder.row(&[&company, "Someone", &email, "Lead", &amount, "Alice", ""]);
    }
    builder.save(&test.path("pipeline.xlsx"));
    test.single_source("pipeline.xlsx", "");

    let run = test.run(&["sync"]);
    run.assert_code(1);
    assert!(
        run.stdout
            .contains("row 14, column \"Amount\": \"twelve\" is not a number"),
        "table output:\n{}",
        run.stdout
    );
    assert_eq!(test.deals().len(), 11, "every other row is applied");

    let errors = test.run(&["errors"]);
    assert!(errors.stdout.contains("pipeline.xlsx, sheet \"Pipeline\", row 14, column \"Amount\": \"twelve\" is not a number"), "{}", errors.stdout);
    let errors_json = test.run(&["errors", "--format", "json"]).json();
    assert_eq!(errors_json[0]["row_number"], 14);
    assert_eq!(errors_json[0]["column"], "Amount");
    assert_eq!(errors_json[0]["value"], "twelve");
    assert_eq!(errors_json[0]["severity"], "error");

    // Fixing the cell applies the row and clears the stored error.
    let mut fixed = XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Q4 pipeline"])
        .skip_rows(1)
        .row(&HEADER);
    for index in 0..12 {
        let company = format!("Company {index}");
        let email = format!("c{index}@example.com");
        let amount = format!("{}", 1000 * (index + 1));
        fixed = fixed.row(&[&company, "Someone", &email, "Lead", &amount, "Alice", ""]);
    }
    fixed.save(&test.path("pipeline.xlsx"));
    test.sync().assert_code(0);
    assert_eq!(test.deals().len(), 12);
    assert_eq!(test.deal_by("company", "Company 10")["amount"], 11000.0);
    assert_eq!(test.run(&["errors"]).stdout.trim(), "no row errors");
}

#[test]
fn a_row_that_turns_bad_keeps_its_deal_as_it_was() {
    let test = TestDir::new();
    pipeline(&[
        ["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice", ""],
        ["Beta", "Ben", "ben@beta.com", "Lead", "2000", "Alice", ""],
    ])
    .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "");
    test.sync().assert_code(0);

    // Acme's amount becomes unreadable and its stage changes in the same edit.
    pipeline(&[
        [
            "Acme",
            "Ann",
            "ann@acme.com",
            "Prospect",
            "one thousand",
            "Alice",
            "",
        ],
        ["Beta", "Ben", "ben@beta.com", "Lead", "2000", "Alice", ""],
    ])
    .save(&test.path("p.xlsx"));
    let run = test.sync();
    run.assert_code(1);
    let acme = test.deal_by("company", "Acme");
    assert_eq!(
        acme["stage"], "Lead",
        "a row with an error is not applied at all"
    );
    assert_eq!(acme["amount"], 1000.0);
    assert_eq!(
        acme["archived_at"],
        json!(null),
        "a row with an error is never taken as removed"
    );

    // Once fixed, the whole edit lands.
    pipeline(&[
        [
            "Acme",
            "Ann",
            "ann@acme.com",
            "Prospect",
            "1500",
            "Alice",
            "",
        ],
        ["Beta", "Ben", "ben@beta.com", "Lead", "2000", "Alice", ""],
    ])
    .save(&test.path("p.xlsx"));
    test.sync().assert_code(0);
    let acme = test.deal_by("company", "Acme");
    assert_eq!(acme["stage"], "Prospect");
    assert_eq!(acme["amount"], 1500.0);
}

#[test]
fn a_copied_row_with_the_same_id_becomes_a_new_deal_with_a_warning() {
    let test = TestDir::new();
    let header = ["CRM ID", "Company", "Contact", "Stage"];
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&header)
        .row(&["", "Acme", "Ann", "Lead"])
        .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "match_on = []");
    test.sync().assert_code(0);
    let acme_id = test.deal_by("company", "Acme")["id"].as_i64().expect("id");

    // A rep now has the id in the sheet (as write-back will put it) and copies the row.
    let id_text = acme_id.to_string();
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&header)
        .row(&[&id_text, "Acme", "Ann", "Prospect"])
        .row(&[&id_text, "Acme East", "Eve", "Lead"])
        .save(&test.path("p.xlsx"));
    let run = test.sync();
    run.assert_code(0);
    let report = run.json();
    let file = file_report(&report, "p.xlsx");
    assert_eq!(file["counts"]["created"], 1);
    assert_eq!(file["counts"]["updated"], 1);
    let warning = &file["issues"][0];
    assert_eq!(warning["severity"], "warning");
    assert_eq!(warning["row_number"], 3);
    assert!(
        warning["message"]
            .as_str()
            .is_some_and(|message| message.contains("also on row 2")),
        "{warning}"
    );
    assert_eq!(test.deal_by("company", "Acme")["stage"], "Prospect");
    assert_eq!(test.deal_by("company", "Acme East")["contact"], "Eve");
}

#[test]
fn importing_the_same_people_twice_does_not_duplicate_deals() {
    let test = TestDir::new();
    pipeline(&[
        ["Acme", "Ann", "Ann@Acme.com", "Lead", "1000", "Alice", ""],
        ["Beta", "Ben", "ben@beta.com", "Lead", "2000", "Alice", ""],
    ])
    .save(&test.path("first.xlsx"));
    test.write("second.csv", "Company,Contact,Email,Stage,Next Step\nAcme Corp,Ann,ann@acme.com ,Prospect,Demo\nGamma,Gus,gus@gamma.com,Lead,\n");
    test.config(
        "[[sources]]\nname = \"first\"\npath = \"first.xlsx\"\n\n[[sources]]\nname = \"second\"\npath = \"second.csv\"\n",
    );
    test.sync().assert_code(0);
    let deals = test.deals();
    assert_eq!(deals.len(), 3, "{deals:?}");
    let acme = test.deal_by("email", "ann@acme.com");
    assert_eq!(
        acme["company"], "Acme Corp",
        "the second file's values win for the fields it holds"
    );
    assert_eq!(acme["stage"], "Prospect");
    assert_eq!(
        acme["amount"], 1000.0,
        "fields the second file does not hold are kept"
    );
    assert_eq!(acme["next_step"], "Demo");

    // Syncing again changes nothing in either file.
    let report = test.sync().json();
    assert_eq!(file_report(&report, "first.xlsx")["status"], "unchanged");
    assert_eq!(file_report(&report, "second.csv")["status"], "unchanged");
    assert_eq!(test.deals().len(), 3);
}

#[test]
fn syncing_an_unchanged_file_writes_nothing() {
    let test = TestDir::new();
    pipeline(&[
        ["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice", "x"],
        ["Beta", "", "", "Prospect", "", "Bob", ""],
        ["", "Carl", "", "Lead", "", "Bob", ""],
    ])
    .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "");
    test.sync().assert_code(0);
    let before = test.deals();
    let history_before = test.count("SELECT count(*) FROM stage_history");

    crate::harness::next_millisecond();
    let run = test.sync();
    run.assert_code(0);
    let report = run.json();
    let file = file_report(&report, "p.xlsx");
    assert_eq!(file["status"], "unchanged");
    assert_eq!(file["counts"]["unchanged"], 3);
    assert_eq!(file["counts"]["created"], 0);
    assert_eq!(file["counts"]["updated"], 0);
    assert_eq!(
        test.deals(),
        before,
        "no deal (not even updated_at) changed"
    );
    assert_eq!(
        test.count("SELECT count(*) FROM stage_history"),
        history_before
    );
    assert_eq!(
        file["sheet"], "Pipeline",
        "the sheet is named even when unchanged"
    );
    assert_eq!(
        test.count("SELECT count(*) FROM sync_runs"),
        1,
        "a pass that changed nothing is not a run in the history"
    );
    let history = test.run(&["history", "--format", "json"]).json();
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");
    let status = test.run(&["status", "--format", "json"]).json();
    let checked = status[0]["last_checked_at"].as_str().expect("checked");
    let synced = status[0]["last_run_at"].as_str().expect("run");
    assert!(
        checked > synced,
        "status says when it was last checked: {status}"
    );
}

#[test]
fn only_changed_fields_are_written_and_stage_changes_are_history() {
    let test = TestDir::new();
    pipeline(&[["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice", ""]])
        .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "");
    test.sync().assert_code(0);
    // Another tool changes the owner in the store; the sheet then changes only the stage.
    test.execute("UPDATE deals SET owner = 'Carol'");
    pipeline(&[["Acme", "Ann", "ann@acme.com", "机会", "1000", "Alice", ""]])
        .save(&test.path("p.xlsx"));
    let report = test.sync().json();
    assert_eq!(file_report(&report, "p.xlsx")["counts"]["updated"], 1);
    let acme = test.deal_by("company", "Acme");
    assert_eq!(acme["stage"], "Opportunity");
    assert_eq!(
        acme["owner"], "Carol",
        "a field the sheet did not change is not overwritten"
    );
    let history: Vec<(Option<String>, String)> = test
        .query("SELECT from_stage, to_stage FROM stage_history ORDER BY id")
        .into_iter()
        .map(|row| (row[0].clone(), row[1].clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        history,
        vec![
            (None, "Lead".to_string()),
            (Some("Lead".to_string()), "Opportunity".to_string())
        ]
    );
    assert_eq!(
        acme["stage_entered_at"],
        test.query_value("SELECT at FROM stage_history ORDER BY id DESC LIMIT 1")
            .expect("at")
    );
}

#[test]
fn a_removed_row_is_archived_and_comes_back_when_restored() {
    let test = TestDir::new();
    let rows = [
        ["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice", ""],
        ["Beta", "Ben", "ben@beta.com", "Lead", "2000", "Alice", ""],
    ];
    pipeline(&rows).save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "");
    test.sync().assert_code(0);

    pipeline(&rows[..1]).save(&test.path("p.xlsx"));
    let report = test.sync().json();
    assert_eq!(file_report(&report, "p.xlsx")["counts"]["archived"], 1);
    let beta = test.deal_by("company", "Beta");
    assert!(beta["archived_at"].is_string(), "{beta}");
    let live = test.run(&["deals", "list", "--format", "json"]).json();
    assert_eq!(
        live.as_array().map(Vec::len),
        Some(1),
        "archived deals are hidden by default"
    );

    // Putting the row back (Ctrl+Z) brings the same deal back rather than a duplicate.
    pipeline(&rows).save(&test.path("p.xlsx"));
    test.sync().assert_code(0);
    let beta_again = test.deal_by("company", "Beta");
    assert_eq!(beta_again["id"], beta["id"]);
    assert_eq!(beta_again["archived_at"], json!(null));
}

#[test]
fn on_row_removed_delete_and_ignore() {
    for (policy, expected_deals) in [("delete", 1), ("ignore", 2)] {
        let test = TestDir::new();
        let rows = [
            ["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice", ""],
            ["Beta", "Ben", "ben@beta.com", "Lead", "2000", "Alice", ""],
        ];
        pipeline(&rows).save(&test.path("p.xlsx"));
        test.single_source("p.xlsx", &format!("on_row_removed = \"{policy}\""));
        test.sync().assert_code(0);
        pipeline(&rows[..1]).save(&test.path("p.xlsx"));
        test.sync().assert_code(0);
        let deals = test.deals();
        assert_eq!(deals.len(), expected_deals, "{policy}: {deals:?}");
        assert!(
            deals.iter().all(|deal| deal["archived_at"].is_null()),
            "{policy}: nothing archived"
        );
    }
}

#[test]
fn unmapped_columns_survive_in_the_store() {
    let test = TestDir::new();
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Company", "Stage", "Region", "Industry", ""])
        .row(&["Acme", "Lead", "East", "Robotics", "stray note"])
        .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "");
    test.sync().assert_code(0);
    let acme = test.deal_by("company", "Acme");
    assert_eq!(
        acme["extra"],
        json!({ "Region": "East", "Industry": "Robotics", "Column E": "stray note" })
    );

    // Clearing an unmapped cell removes it from the deal; changing one updates it.
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Company", "Stage", "Region", "Industry"])
        .row(&["Acme", "Lead", "West", ""])
        .save(&test.path("p.xlsx"));
    test.sync().assert_code(0);
    assert_eq!(
        test.deal_by("company", "Acme")["extra"],
        json!({ "Region": "West" })
    );
}

#[test]
fn a_gb18030_csv_from_chinese_excel_is_read() {
    let test = TestDir::new();
    let text = "公司,联系人,阶段,金额,负责人\r\n杭州青禾食品,刘洋,成交,\"¥8,800\",王伟\r\n深圳华光电子,陈静,机会,5000,李明\r\n";
    let (bytes, _, _) = encoding_rs::GB18030.encode(text);
    assert!(
        std::str::from_utf8(&bytes).is_err(),
        "the test file really is not UTF-8"
    );
    test.write("导出.csv", &bytes);
    test.single_source("导出.csv", "");
    test.sync().assert_code(0);
    let deal = test.deal_by("company", "杭州青禾食品");
    assert_eq!(deal["stage"], "Won");
    assert_eq!(deal["amount"], 8800.0);
    assert_eq!(deal["owner"], "王伟");
    assert_eq!(
        test.deal_by("company", "深圳华光电子")["stage"],
        "Opportunity"
    );
}

#[test]
fn a_semicolon_csv_with_bom_is_read() {
    let test = TestDir::new();
    test.write(
        "leads.csv",
        "\u{feff}Company;Stage;Amount\r\nAcme;Lead;\"1.200,50\"\r\n",
    );
    test.single_source("leads.csv", "");
    test.sync().assert_code(0);
    let acme = test.deal_by("company", "Acme");
    assert_eq!(acme["amount"], 1200.5);
}

#[test]
fn a_missing_sheet_or_header_changes_nothing() {
    let test = TestDir::new();
    let rows = [
        ["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice", ""],
        ["Beta", "Ben", "ben@beta.com", "Lead", "2000", "Alice", ""],
    ];
    pipeline(&rows).save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "sheet = \"Pipeline\"");
    test.sync().assert_code(0);
    let before = test.deals();

    // The sheet was renamed.
    let mut renamed = XlsxBuilder::new().sheet("Old").row(&HEADER);
    for row in &rows {
        renamed = renamed.row(row);
    }
    renamed.save(&test.path("p.xlsx"));
    let run = test.run(&["sync"]);
    run.assert_code(1);
    assert!(
        run.stdout
            .contains("sheet \"Pipeline\" not found (sheets: Old)"),
        "{}",
        run.stdout
    );
    assert_eq!(test.deals(), before);

    // The header row was deleted.
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&rows[0])
        .row(&rows[1])
        .save(&test.path("p.xlsx"));
    let run = test.run(&["sync", "--format", "json"]);
    run.assert_code(1);
    let report = run.json();
    let file = file_report(&report, "p.xlsx");
    assert_eq!(
        file["status"], "held",
        "a file synced before that lost its header is held"
    );
    assert!(
        file["error"]
            .as_str()
            .is_some_and(|error| error.contains("no header row found")),
        "{file}"
    );
    assert_eq!(test.deals(), before, "nothing archived, nothing changed");
    assert_eq!(
        test.count("SELECT count(*) FROM sync_runs WHERE status = 'held'"),
        2
    );

    // A file never synced before with no header is an error, not held.
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&rows[0])
        .save(&test.path("new.xlsx"));
    test.single_source("new.xlsx", "");
    let report = test.sync().json();
    assert_eq!(file_report(&report, "new.xlsx")["status"], "failed");
}

#[test]
fn a_truncated_workbook_is_retried_not_read_as_empty() {
    let test = TestDir::new();
    let rows = [["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice", ""]];
    pipeline(&rows).save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "");
    test.sync().assert_code(0);

    let bytes = pipeline(&[]).to_bytes();
    test.write("p.xlsx", &bytes[..bytes.len() / 2]);
    let report = test.sync().json();
    let file = file_report(&report, "p.xlsx");
    assert_eq!(file["status"], "failed");
    assert_eq!(file["retryable"], true);
    assert_eq!(test.deal_by("company", "Acme")["archived_at"], json!(null));
    // The table says it may be a save in progress, and that nothing was written back.
    let table = test.run(&["sync"]);
    table.assert_code(1);
    assert!(
        table.stdout.contains(
            "(the file may still be being saved; it will be read again on the next sync)"
        ),
        "{}",
        table.stdout
    );
    let line = table
        .stdout
        .lines()
        .find(|line| line.contains("p.xlsx") && line.contains("FAILED"))
        .expect("the file's line");
    assert!(line.trim_end().ends_with('—'), "{}", table.stdout);
}

#[test]
fn a_missing_source_folder_is_a_share_not_mounted_not_a_file_being_saved() {
    let test = TestDir::new();
    test.write("leads.csv", "Company,Stage\nAcme,Lead\n");
    test.config(
        "[[sources]]\nname = \"share\"\npath = \"share/*.xlsx\"\n\n[[sources]]\nname = \"mount\"\npath = \"nomount/a.csv\"\n\n[[sources]]\nname = \"leads\"\npath = \"leads.csv\"\nwrite_back = false\n",
    );
    let run = test.run(&["sync"]);
    run.assert_code(1);
    for folder in ["share", "nomount"] {
        assert!(
            run.stdout.contains(&format!(
                "{folder}: the folder does not exist (is the share mounted?)"
            )),
            "{folder}: {}",
            run.stdout
        );
    }
    assert!(!run.stdout.contains("being saved"), "{}", run.stdout);
    // The failed sources wrote nothing back (`—`); `off` is for a source that never writes back.
    let line_of = |source: &str| {
        run.stdout
            .lines()
            .find(|line| line.starts_with(&format!("{source} ")))
            .unwrap_or_else(|| panic!("no line for {source}: {}", run.stdout))
            .trim_end()
    };
    assert!(line_of("share").ends_with('—'), "{}", run.stdout);
    assert!(line_of("mount").ends_with('—'), "{}", run.stdout);
    assert!(line_of("leads").ends_with("off"), "{}", run.stdout);
    assert_eq!(test.deal_by("company", "Acme")["stage"], "Lead");

    // check-config warns about the single file's folder in the same words.
    let check = test.run(&["check-config"]);
    assert!(
        check.stderr.contains("warning: source \"mount\"")
            && check
                .stderr
                .contains("nomount: the folder does not exist (is the share mounted?)"),
        "{}",
        check.stderr
    );
}

#[test]
fn formulas_give_their_values_and_error_cells_are_row_errors() {
    let test = TestDir::new();
    XlsxBuilder::new()
        .sheet("Pipeline")
        .cells(["Company", "Stage", "Amount"].map(Cell::from).to_vec())
        .cells(vec![
            Cell::from("Acme"),
            Cell::from("Lead"),
            Cell::Formula("=1000*2".to_string(), "2000".to_string()),
        ])
        .cells(vec![
            Cell::from("Beta"),
            Cell::from("Lead"),
            Cell::Formula("=1/0".to_string(), "#DIV/0!".to_string()),
        ])
        .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "");
    let run = test.sync();
    run.assert_code(1);
    assert_eq!(test.deal_by("company", "Acme")["amount"], 2000.0);
    let report = run.json();
    let issue = &file_report(&report, "p.xlsx")["issues"][0];
    assert_eq!(issue["row_number"], 3);
    assert!(
        issue["message"]
            .as_str()
            .is_some_and(|message| message.contains("error value")),
        "{issue}"
    );
}

#[test]
fn the_demo_shows_the_product() {
    let test = TestDir::new();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in ["demo/pipeline.xlsx", "demo/leads.csv", "config/demo.toml"] {
        test.write(name, std::fs::read(repo.join(name)).expect("demo file"));
    }
    let demo = |args: &[&str]| {
        let output = std::process::Command::new(crate::harness::BINARY)
            .args(["--config", "config/demo.toml"])
            .args(args)
            .current_dir(test.dir.path())
            .env_remove("RUST_LOG")
            .output()
            .expect("run");
        crate::harness::Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    };
    // The first command: every deal imported, and three rows with the mistakes reps make.
    let run = demo(&["sync", "--format", "json"]);
    run.assert_code(1);
    let report = run.json();
    let pipeline = file_report(&report, "pipeline.xlsx");
    assert_eq!(pipeline["counts"]["created"], 50);
    assert_eq!(pipeline["counts"]["errors"], 3, "{pipeline}");
    assert_eq!(file_report(&report, "leads.csv")["counts"]["created"], 7);
    assert_eq!(
        file_report(&report, "leads.csv")["counts"]["updated"],
        1,
        "one lead is already in the pipeline"
    );
    assert!(
        test.path("target/demo/crm.db").is_file(),
        "the store lives where demo.toml says"
    );
    // The sync also wrote the funnel report the demo's [report] names, as the daemon keeps it.
    let report_path = test.path("target/demo/Funnel report.xlsx");
    let open_deals = crate::harness::read_xlsx(&report_path, "Funnel").column("Open deals");
    assert!(
        open_deals
            .iter()
            .any(|cell| cell.parse::<u32>().is_ok_and(|n| n > 0)),
        "the report counts the open deals: {open_deals:?}"
    );
    // A pass that changes nothing leaves it as it is.
    let written_at = std::fs::metadata(&report_path)
        .and_then(|metadata| metadata.modified())
        .expect("report time");
    let again = demo(&["sync"]);
    again.assert_code(0);
    assert!(
        !again.stdout.contains("funnel report written"),
        "{}",
        again.stdout
    );
    assert_eq!(
        std::fs::metadata(&report_path)
            .and_then(|metadata| metadata.modified())
            .expect("report time"),
        written_at
    );
    // It is rewritten when it is gone, and the table says where.
    std::fs::remove_file(&report_path).expect("remove report");
    let again = demo(&["sync"]);
    assert!(
        again
            .stdout
            .contains("funnel report written to target/demo/Funnel report.xlsx"),
        "{}",
        again.stdout
    );
    assert!(report_path.is_file());

    // After the demo, look around: each command shows something.
    let errors = demo(&["errors"]);
    assert_eq!(errors.stdout.lines().count(), 3, "{}", errors.stdout);
    assert!(errors
        .stdout
        .contains("\"twelve thousand\" is not a number"));
    let stalled = demo(&["deals", "list", "--stalled", "--format", "json"]).json();
    let n_stalled = stalled.as_array().map(Vec::len).unwrap_or(0);
    assert!(
        n_stalled >= 5,
        "stalled deals from the first day: {stalled}"
    );
    let dry_run = demo(&["remind", "--dry-run"]);
    dry_run.assert_code(0);
    assert!(
        dry_run.stdout.matches("To: ").count() >= 2,
        "{}",
        dry_run.stdout
    );
    let funnel = demo(&["funnel", "--format", "json"]).json();
    assert!(
        funnel["stages"][0]["oldest_open_days"]
            .as_i64()
            .unwrap_or(0)
            > 0,
        "time in stage from the Stage Since column: {funnel}"
    );
    demo(&["funnel", "--xlsx", "target/demo/Funnel report.xlsx"]).assert_code(0);
    assert!(test.path("target/demo/Funnel report.xlsx").is_file());
    demo(&["check-config"]).assert_code(0);
    demo(&["status"]).assert_code(0);
}

#[test]
fn an_unchanged_file_is_recognised_by_its_content_and_settings() {
    let test = TestDir::new();
    pipeline(&[["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Alice", "x"]])
        .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "write_back = false");
    test.sync().assert_code(0);
    // Same bytes, new modification time: the rows are not even parsed.
    let bytes = std::fs::read(test.path("p.xlsx")).expect("read");
    test.write("p.xlsx", &bytes);
    let not_parsed = "not parsed";
    let sync_logged = || {
        test.command(&["sync"])
            .env("RUST_LOG", "funnelsync=debug")
            .output()
            .map(|output| String::from_utf8_lossy(&output.stderr).into_owned())
            .expect("sync")
    };
    let log = sync_logged();
    assert!(log.contains(not_parsed), "{log}");
    // New settings (another alias for a column) mean a full read even of the same bytes.
    test.single_source(
        "p.xlsx",
        "write_back = false\n[sources.columns]\nnext_step = [\"Notes\"]",
    );
    let log = sync_logged();
    assert!(!log.contains(not_parsed), "a full sync: {log}");
    assert_eq!(
        test.deal_by("company", "Acme")["next_step"],
        "x",
        "the Notes column now maps to next_step"
    );
}

#[test]
fn processes_creating_the_store_at_once_all_succeed() {
    // A CLI call while the daemon creates its store, or two cron jobs: every process that starts
    // on a store that does not exist yet must get a working store, not "database is locked".
    for round in 0..10 {
        let test = TestDir::new();
        test.write("leads.csv", "Company,Contact,Stage\nAcme,Ann,Lead\n");
        test.single_source("leads.csv", "write_back = false");
        let children: Vec<std::process::Child> = (0..3)
            .map(|_| {
                test.command(&["sync"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("start sync")
            })
            .collect();
        for child in children {
            let output = child.wait_with_output().expect("sync output");
            assert!(
                output.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        assert_eq!(
            test.count("SELECT count(*) FROM deals"),
            1,
            "round {round}: one deal, however the syncs interleaved"
        );
    }
}

#[test]
fn commands_that_only_read_never_create_a_store() {
    if crate::harness::on_postgres() {
        // A PostgreSQL store is a database the admin created; a mistyped URL cannot leave a file
        // behind.
        eprintln!("a mistyped store path: not a question on the PostgreSQL pass");
        return;
    }
    let test = TestDir::new();
    test.write("leads.csv", "Company,Contact,Stage\nAcme,Ann,Lead\n");
    test.single_source("leads.csv", "write_back = false");
    for args in [
        vec!["status"],
        vec!["deals", "list"],
        vec!["errors"],
        vec!["conflicts"],
        vec!["history"],
        vec!["funnel"],
    ] {
        let run = test.run(&args);
        run.assert_code(3);
        assert!(
            run.stderr.contains("no store at") && run.stderr.contains("has funnelsync synced yet?"),
            "{args:?}: {}",
            run.stderr
        );
        assert!(
            !test.store_path().exists(),
            "{args:?} created an empty store"
        );
    }
    test.sync().assert_code(0);
    test.run(&["status"]).assert_code(0);
}

#[test]
fn an_old_row_with_errors_no_longer_blocks_every_removal() {
    let test = TestDir::new();
    let header = "Company,Contact,Email,Stage,Amount";
    // A long-standing bad row (an email cut short) from the first sync on, with Beta's company:
    // it shares an identifying value with Beta, but was there, unchanged, beside Beta's row.
    let old_bad_row = "Beta,Bob,bob@,Lead,4000";
    test.write(
        "leads.csv",
        format!(
            "{header}\nAcme,Ann,ann@acme.com,Lead,1000\nBeta,Ben,ben@beta.com,Lead,2000\n\
             Gamma,Gus,gus@gamma.com,Lead,3000\n{old_bad_row}\n"
        ),
    );
    test.single_source("leads.csv", "write_back = false");
    test.sync().assert_code(1);
    assert_eq!(test.deals().len(), 3);

    // Beta's row is deleted. The old bad row names Beta too, but it is neither new nor changed
    // since the last sync, so it cannot be Beta's row: the removal proceeds.
    test.write(
        "leads.csv",
        format!(
            "{header}\nAcme,Ann,ann@acme.com,Lead,1000\nGamma,Gus,gus@gamma.com,Lead,3000\n\
             {old_bad_row}\n"
        ),
    );
    let run = test.sync();
    run.assert_code(1);
    let beta = test.deal_by("company", "Beta");
    assert!(
        beta["archived_at"].is_string(),
        "the removal happened despite the old bad row that shares its company: {}",
        run.stdout
    );
    let issues = run.json()["files"][0]["issues"].to_string();
    assert!(!issues.contains("may be row"), "nothing was held: {issues}");

    // Now a rep edits Acme's row into a row with errors that nothing recognises (new contact,
    // unreadable email) and deletes Gamma's row. The bad row shares Acme's company, so Acme may
    // be it and waits; Gamma shares nothing with it and is archived.
    test.write(
        "leads.csv",
        format!("{header}\nAcme,Ann Smith,ann@,Lead,1000\n{old_bad_row}\n"),
    );
    let run = test.sync();
    run.assert_code(1);
    let acme = test.deal_by("company", "Acme");
    let gamma = test.deal_by("company", "Gamma");
    assert_eq!(acme["archived_at"], json!(null), "Acme may be the bad row");
    assert!(gamma["archived_at"].is_string(), "Gamma's removal proceeds");
    let report = run.json();
    let issues = report["files"][0]["issues"].to_string();
    assert!(
        issues.contains(&format!("deal {} (Acme) may be row 2", acme["id"])),
        "the held removal is named: {issues}"
    );

    // Fixing the row recognises it as Acme again.
    test.write(
        "leads.csv",
        format!("{header}\nAcme,Ann Smith,ann@acme.com,Lead,1000\n{old_bad_row}\n"),
    );
    test.sync().assert_code(1);
    let acme = test.deal_by("company", "Acme");
    assert_eq!(acme["archived_at"], json!(null));
    assert_eq!(acme["contact"], "Ann Smith");

    // Acme's row is deleted and a new row with errors names Acme: a new row may be Acme's row
    // retyped, so Acme's removal waits, and says so.
    test.write(
        "leads.csv",
        format!("{header}\n{old_bad_row}\nAcme,Al,al@,Lead,1000\n"),
    );
    let run = test.sync();
    run.assert_code(1);
    let acme = test.deal_by("company", "Acme");
    assert_eq!(
        acme["archived_at"],
        json!(null),
        "Acme may be the new bad row"
    );
    let issues = run.json()["files"][0]["issues"].to_string();
    assert!(
        issues.contains(&format!("deal {} (Acme) may be row 3", acme["id"])),
        "the held removal is named: {issues}"
    );
}

#[test]
fn store_migrate_brings_the_schema_up_to_date_and_a_newer_schema_is_refused() {
    let test = TestDir::new();
    test.write("leads.csv", "Company,Contact,Stage\nAcme,Ann,Lead\n");
    test.single_source("leads.csv", "write_back = false");
    if !crate::harness::on_postgres() {
        // Only `sync` and `run` create a store: at a path where there is none, `store migrate`
        // refuses like every other command, and leaves nothing behind.
        let run = test.run(&["store", "migrate"]);
        run.assert_code(3);
        assert!(
            run.stderr.contains(&format!(
                "no store at {} (has funnelsync synced yet?)",
                test.store_path().display()
            )),
            "{}",
            run.stderr
        );
        assert!(!test.store_path().exists());
        // An empty SQLite file is a store at schema version 0.
        test.write("state/crm.db", b"");
    }
    let run = test.run(&["store", "migrate"]);
    run.assert_code(0);
    assert!(
        run.stdout.contains("migrated the store")
            && run.stdout.contains("from schema version 0 to"),
        "{}",
        run.stdout
    );
    let run = test.run(&["store", "migrate"]);
    run.assert_code(0);
    assert!(run.stdout.contains("is up to date"), "{}", run.stdout);
    test.sync().assert_code(0);

    // A store a newer funnelsync migrated: this one refuses it rather than write into a schema
    // it does not know — the commands and the daemon alike.
    if crate::harness::on_postgres() {
        test.execute("UPDATE schema_version SET version = 999");
    } else {
        test.execute("PRAGMA user_version = 999");
    }
    for args in [vec!["deals", "list"], vec!["sync"], vec!["run"]] {
        let run = test.run(&args);
        run.assert_code(3);
        assert!(
            run.stderr
                .contains("schema version 999, newer than this funnelsync understands"),
            "{args:?}: {}",
            run.stderr
        );
    }
}
