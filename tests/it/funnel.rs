//! `funnelsync funnel`: the table, the pinned JSON shape, the Excel report with charts, the
//! daemon's refresh of the report file and the weekly digest.

use std::time::Duration;

use crate::harness::{keys, read_xlsx, wait_until, SmtpServer, TestDir, XlsxBuilder};

fn pipeline(test: &TestDir, file: &str, extra_rows: &[[&str; 4]]) {
    let mut builder = XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Company", "Stage", "Amount", "Owner"])
        .row(&["Acme", "Lead", "1000", "Alice"])
        .row(&["Beta", "Lead", "2000", "Alice"])
        .row(&["Gamma", "Prospect", "3000", "Bob"])
        .row(&["Delta", "Opportunity", "4000", "Bob"]);
    for row in extra_rows {
        builder = builder.row(row);
    }
    builder.save(&test.path(file));
}

#[test]
fn the_funnel_counts_moves_and_its_json_shape_is_stable() {
    let test = TestDir::new();
    pipeline(&test, "p.xlsx", &[]);
    test.single_source("p.xlsx", "write_back = false");
    test.sync().assert_code(0);
    let id = |company: &str| {
        test.deal_by("company", company)["id"]
            .as_i64()
            .expect("id")
            .to_string()
    };
    // Acme skips Prospect; Delta is won.
    test.run(&["deals", "move", &id("Acme"), "Opportunity"])
        .assert_code(0);
    test.run(&["deals", "move", &id("Delta"), "Won"])
        .assert_code(0);

    let report = test.run(&["funnel", "--format", "json"]);
    report.assert_code(0);
    let report = report.json();
    assert_eq!(
        keys(&report),
        ["by_owner", "forecast", "owner", "period", "stages", "stalled", "totals"]
    );
    assert_eq!(
        keys(&report["stages"][0]),
        [
            "conversion_rate",
            "converted",
            "entered",
            "mean_days",
            "median_days",
            "n_left",
            "n_stalled",
            "n_unknown_start",
            "oldest_open_days",
            "open_amount",
            "open_count",
            "probability",
            "stage",
            "weighted_amount",
            "win_rate",
            "won"
        ]
    );
    assert_eq!(
        keys(&report["totals"]),
        [
            "average_days_to_won",
            "lead_to_won_rate",
            "lost_count",
            "open_amount",
            "open_count",
            "won_amount",
            "won_count"
        ]
    );
    assert_eq!(
        keys(&report["forecast"]),
        ["deals", "history_based", "weighted_pipeline"]
    );
    assert_eq!(
        keys(&report["forecast"]["deals"][0]),
        [
            "amount",
            "closes_in_period",
            "company",
            "deal_id",
            "expected_close",
            "historical_win_rate",
            "history_based",
            "owner",
            "probability",
            "stage",
            "weighted"
        ]
    );
    assert_eq!(keys(&report["period"]), ["since", "until"]);

    let stages: Vec<(&str, u64, f64, f64, u64, u64)> = report["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|stage| {
            (
                stage["stage"].as_str().unwrap_or(""),
                stage["open_count"].as_u64().unwrap_or(99),
                stage["open_amount"].as_f64().unwrap_or(-1.0),
                stage["weighted_amount"].as_f64().unwrap_or(-1.0),
                stage["entered"].as_u64().unwrap_or(99),
                stage["converted"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(
        stages,
        vec![
            // All four reached Lead; Acme, Gamma and Delta moved past it.
            ("Lead", 1, 2000.0, 200.0, 4, 3),
            // Acme (skipped it), Gamma, Delta; Acme and Delta moved on.
            ("Prospect", 1, 3000.0, 900.0, 3, 2),
            ("Opportunity", 1, 1000.0, 600.0, 2, 1),
        ]
    );
    assert_eq!(report["totals"]["won_count"], 1);
    assert_eq!(report["totals"]["won_amount"], 4000.0);
    assert_eq!(report["forecast"]["weighted_pipeline"], 1700.0);

    let alice = test
        .run(&["funnel", "--owner", " alice ", "--format", "json"])
        .json();
    assert_eq!(alice["owner"], " alice ");
    assert_eq!(alice["stages"][0]["entered"], 2);

    let table = test.run(&["funnel"]);
    assert!(
        table.stdout.contains("Lead") && table.stdout.contains("█"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("2,000"), "{}", table.stdout);
}

#[test]
fn the_excel_report_has_its_sheets_values_and_charts() {
    let test = TestDir::new();
    pipeline(&test, "p.xlsx", &[]);
    test.single_source("p.xlsx", "write_back = false");
    test.sync().assert_code(0);
    test.run(&["funnel", "--xlsx", "report.xlsx"])
        .assert_code(0);
    let funnel = read_xlsx(&test.path("report.xlsx"), "Funnel");
    assert_eq!(
        funnel.sheet_names,
        vec!["Funnel", "Conversion", "Forecast", "By rep", "Stalled"]
    );
    assert_eq!(
        funnel.column("Stage")[..3],
        ["Lead", "Prospect", "Opportunity"]
    );
    assert_eq!(funnel.column("Open deals")[..3], ["2", "1", "1"]);
    assert_eq!(funnel.column("Open amount")[..3], ["3000", "3000", "4000"]);
    let by_rep = read_xlsx(&test.path("report.xlsx"), "By rep");
    assert_eq!(by_rep.column("Owner"), vec!["Alice", "Bob"]);
    let bytes = std::fs::read(test.path("report.xlsx")).expect("report");
    for part in ["xl/charts/chart1.xml", "xl/charts/chart2.xml"] {
        assert!(
            bytes
                .windows(part.len())
                .any(|window| window == part.as_bytes()),
            "{part} is in the workbook"
        );
    }
}

#[test]
fn the_daemon_keeps_the_report_fresh_and_never_reads_it_as_a_source() {
    let test = TestDir::new();
    std::fs::create_dir_all(test.path("share")).expect("share");
    pipeline(&test, "share/p.xlsx", &[]);
    test.config(
        "[watch]\nsettle = \"300ms\"\npoll_interval = \"30s\"\n\n[report]\npath = \"share/Funnel report.xlsx\"\n\n[[sources]]\nname = \"share\"\npath = \"share\"\nwrite_back = false\n",
    );
    let daemon = test.start_daemon();
    daemon.wait_ready();
    let report_path = test.path("share/Funnel report.xlsx");
    let open_leads = || {
        if !report_path.is_file() {
            return None;
        }
        std::panic::catch_unwind(|| {
            read_xlsx(&report_path, "Funnel")
                .column("Open deals")
                .first()
                .cloned()
        })
        .ok()
        .flatten()
    };
    wait_until(Duration::from_secs(10), "the first report", || {
        open_leads() == Some("2".to_string())
    });
    pipeline(
        &test,
        "share/p.xlsx",
        &[["Epsilon", "Lead", "500", "Alice"]],
    );
    wait_until(Duration::from_secs(10), "the report after the sync", || {
        open_leads() == Some("3".to_string())
    });
    assert_eq!(
        test.count("SELECT count(*) FROM sync_runs WHERE file LIKE '%Funnel report%'"),
        0,
        "{}",
        daemon.log()
    );
}

#[test]
fn the_weekly_digest_reaches_the_manager_with_the_report_attached() {
    let smtp = SmtpServer::start(0);
    let test = TestDir::new();
    pipeline(&test, "p.xlsx", &[]);
    test.config(&format!(
        "[[sources]]\nname = \"p\"\npath = \"p.xlsx\"\nwrite_back = false\n\n[report]\npath = \"report.xlsx\"\nweekly_digest = \"mon 08:30\"\n\n[remind]\nmanager = \"lead@example.com\"\n\n[smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"funnelsync@example.com\"\n",
        smtp.port
    ));
    test.sync().assert_code(0);
    test.run(&["funnel", "--send-digest"]).assert_code(0);
    let mail = smtp.to("lead@example.com");
    assert_eq!(mail.len(), 1);
    assert!(
        mail[0].subject().starts_with("Weekly funnel report"),
        "{}",
        mail[0].subject()
    );
    let (text, _) = mail[0].bodies();
    assert!(
        text.contains("first digest") && text.contains("Lead"),
        "{text}"
    );
    let parsed = mailparse::parse_mail(&mail[0].raw).expect("parse");
    let attachment = parsed
        .subparts
        .iter()
        .find(|part| {
            part.ctype.mimetype
                == "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
        })
        .expect("the .xlsx is attached");
    let bytes = attachment.get_body_raw().expect("attachment bytes");
    assert!(bytes.starts_with(b"PK"), "a zip (xlsx) file");

    // A week later, the change since the last digest is reported.
    pipeline(&test, "p.xlsx", &[["Epsilon", "Lead", "500", "Alice"]]);
    test.sync().assert_code(0);
    test.run(&["funnel", "--send-digest"]).assert_code(0);
    let (text, _) = smtp.to("lead@example.com")[1].bodies();
    assert!(text.contains("Lead: +1 deal(s), +500"), "{text}");
}
