//! Stalled-deal reminders, sent over real SMTP to a server on loopback, with a fixed clock
//! (`--now`) for the one-shot command and a real schedule for the daemon.

use std::time::Duration;

use crate::harness::{wait_until, SmtpServer, TestDir, XlsxBuilder};

const HEADER: [&str; 5] = ["Company", "Contact", "Stage", "Amount", "Owner"];

/// A pipeline synced now; `--now` a month later makes every open deal stalled.
fn team(test: &TestDir, smtp: &SmtpServer, remind_extra: &str) {
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&HEADER)
        .row(&["Acme", "Ann", "Prospect", "12000", "Alice Wang"])
        .row(&["Apex", "Abe", "Lead", "3000", " alice wang "])
        .row(&["Beta", "Ben", "Opportunity", "5000", "Bob"])
        .row(&["Carrot", "Cat", "Lead", "100", "Carol"])
        .row(&["Done Deal", "Dan", "Won", "9000", "Dave"])
        .save(&test.path("p.xlsx"));
    test.config(&format!(
        r#"[[sources]]
name = "pipeline"
path = "p.xlsx"
write_back = false

[remind]
at = "09:00"
timezone = "Asia/Shanghai"
repeat_every_days = 2
escalate_after = 2
manager = "lead@example.com"
fallback_to = "fallback@example.com"
{remind_extra}

[reps]
"Alice Wang" = "alice@example.com"
Bob = "bob@example.com"
Dave = "dave@example.com"

[smtp]
host = "127.0.0.1"
port = {port}
security = "none"
from = "Funnel Sync <funnelsync@example.com>"
timeout = "5s"
"#,
        port = smtp.port
    ));
    test.sync().assert_code(0);
}

fn later(days: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::days(days)).to_rfc3339()
}

#[test]
fn each_rep_gets_one_digest_of_their_stalled_deals() {
    let smtp = SmtpServer::start(0);
    let test = TestDir::new();
    team(&test, &smtp, "");
    let now = later(30);

    let dry = test.run(&["--now", &now, "remind", "--dry-run"]);
    dry.assert_code(0);
    assert!(
        dry.stdout.contains("To: alice@example.com"),
        "{}",
        dry.stdout
    );
    assert!(smtp.messages().is_empty(), "a dry run sends nothing");

    let run = test.run(&["--now", &now, "remind"]);
    run.assert_code(0);
    assert_eq!(
        smtp.messages().len(),
        3,
        "Alice, Bob and the fallback; Dave has nothing stalled"
    );
    let alice = smtp.to("alice@example.com");
    assert_eq!(alice.len(), 1);
    assert_eq!(alice[0].subject(), "2 deals need follow-up");
    let (text, html) = alice[0].bodies();
    assert!(text.contains("Acme") && text.contains("Apex"), "{text}");
    assert!(
        text.find("Apex") < text.find("Acme"),
        "worst first: Apex is further over its limit:\n{text}"
    );
    // The sheet gives no stage date and no last contact: the deal counts from the day it was
    // first seen.
    assert!(
        text.contains("in Prospect (stage date unknown), first seen 30 days ago"),
        "{text}"
    );
    assert!(html.contains("<table"), "{html}");
    assert!(text.contains("12,000"), "{text}");
    assert_eq!(
        smtp.to("bob@example.com")[0].subject(),
        "1 deal needs follow-up"
    );
    let fallback = smtp.to("fallback@example.com");
    assert!(
        fallback[0].bodies().0.contains("Carrot"),
        "an owner without an address goes to fallback_to"
    );
    assert!(smtp.to("dave@example.com").is_empty());
    assert!(
        smtp.to("lead@example.com").is_empty(),
        "no escalation on the first reminder"
    );

    let stalled = test
        .run(&[
            "--now",
            &now,
            "deals",
            "list",
            "--stalled",
            "--format",
            "json",
        ])
        .json();
    let stalled = stalled.as_array().expect("array");
    assert_eq!(stalled.len(), 4);
    assert!(stalled.iter().all(|deal| deal["stalled"]
        .as_str()
        .is_some_and(|reason| reason.contains("limit"))));
}

#[test]
fn reminders_are_not_repeated_too_soon_and_escalate_after_enough() {
    let smtp = SmtpServer::start(0);
    let test = TestDir::new();
    team(&test, &smtp, "");
    test.run(&["--now", &later(30), "remind"]).assert_code(0);
    assert_eq!(smtp.to("alice@example.com").len(), 1);
    test.run(&["--now", &later(30), "remind"]).assert_code(0);
    test.run(&["--now", &later(31), "remind"]).assert_code(0);
    assert_eq!(
        smtp.to("alice@example.com").len(),
        1,
        "same day and the next: within repeat_every_days"
    );
    test.run(&["--now", &later(31), "remind", "--force"])
        .assert_code(0);
    assert_eq!(
        smtp.to("alice@example.com").len(),
        2,
        "--force ignores the repeat rule"
    );
    assert_eq!(smtp.to("lead@example.com").len(), 0);
    // Two reminders went out; the third copies the manager.
    test.run(&["--now", &later(33), "remind"]).assert_code(0);
    assert_eq!(smtp.to("alice@example.com").len(), 3);
    let escalations = smtp.to("lead@example.com");
    assert_eq!(escalations.len(), 1);
    assert!(
        escalations[0].subject().starts_with("Escalation"),
        "{}",
        escalations[0].subject()
    );
    let (text, _) = escalations[0].bodies();
    assert!(
        text.contains("Alice Wang") && text.contains("Bob") && text.contains("Acme"),
        "by rep: {text}"
    );

    // A deal that moves on ends its stall.
    let acme = test.deal_by("company", "Acme")["id"]
        .as_i64()
        .expect("id")
        .to_string();
    test.run(&["deals", "move", &acme, "Won"]).assert_code(0);
    test.run(&["--now", &later(36), "remind"]).assert_code(0);
    let last = smtp.to("alice@example.com").pop().expect("a fourth digest");
    assert!(!last.bodies().0.contains("Acme"), "{}", last.bodies().0);
}

#[test]
fn a_refused_message_stays_pending_and_is_delivered_once() {
    let smtp = SmtpServer::start(1);
    let test = TestDir::new();
    team(&test, &smtp, "");
    let now = later(30);
    let first = test.run(&["--now", &now, "remind"]);
    first.assert_code(1);
    assert!(
        first.stdout.contains("1 waiting to retry"),
        "{}",
        first.stdout
    );
    assert_eq!(smtp.messages().len(), 2);
    assert_eq!(
        test.count("SELECT count(*) FROM outbox WHERE status = 'pending'"),
        1
    );
    // The 451 was recognised as the server's answer (a temporary refusal, retried with backoff),
    // not waited out until the timeout.
    let pending =
        test.query("SELECT last_error, next_attempt_at FROM outbox WHERE status = 'pending'");
    let (last_error, next_attempt) = match pending.as_slice() {
        [row] => (row[0].clone().unwrap_or_default(), row[1].clone()),
        other => panic!("not one pending message: {other:?}"),
    };
    assert!(
        last_error.contains("the mail server refused") && last_error.contains("451"),
        "{last_error}"
    );
    assert!(!last_error.contains("timed out"), "{last_error}");
    assert!(next_attempt.is_some(), "a retry is scheduled");

    test.run(&["--now", &now, "remind"]).assert_code(0);
    assert_eq!(
        smtp.messages().len(),
        3,
        "the pending message was delivered and nothing else was added"
    );
    test.run(&["--now", &now, "remind"]).assert_code(0);
    assert_eq!(smtp.messages().len(), 3, "exactly once");
    assert_eq!(
        test.count("SELECT count(*) FROM outbox WHERE status = 'sent'"),
        3
    );
}

#[test]
fn a_message_refused_for_good_fails_at_once_and_alerts_the_admin() {
    let smtp = SmtpServer::start_refusing(1, 550);
    let test = TestDir::new();
    team(&test, &smtp, "");
    let config = std::fs::read_to_string(test.config_path()).expect("config");
    std::fs::write(
        test.config_path(),
        format!("{config}\n[alerts]\nto = \"it@example.com\"\n"),
    )
    .expect("config with alerts");
    let now = later(30);
    let run = test.run(&["--now", &now, "remind"]);
    run.assert_code(1);
    assert!(
        run.stdout.contains("1 refused by the server"),
        "{}",
        run.stdout
    );
    // The 550 failed that message at once: it is not pending and not retried.
    let alice =
        test.query("SELECT status, last_error FROM outbox WHERE recipient = 'alice@example.com'");
    let (status, last_error) = match alice.as_slice() {
        [row] => (
            row[0].clone().unwrap_or_default(),
            row[1].clone().unwrap_or_default(),
        ),
        other => panic!("not one message to alice: {other:?}"),
    };
    assert_eq!(status, "failed");
    assert!(
        last_error.contains("the mail server refused") && last_error.contains("550"),
        "{last_error}"
    );
    assert!(!last_error.contains("timed out"), "{last_error}");
    assert_eq!(
        test.count("SELECT count(*) FROM outbox WHERE status = 'pending'"),
        0
    );
    // The admin hears about it.
    let alerts = smtp.to("it@example.com");
    assert_eq!(alerts.len(), 1, "one alert");
    assert!(
        alerts[0].subject().contains("alice@example.com"),
        "{}",
        alerts[0].subject()
    );
}

#[test]
fn chinese_digests_and_hostile_names() {
    let smtp = SmtpServer::start(0);
    let test = TestDir::new();
    team(&test, &smtp, "language = \"zh\"");
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&HEADER)
        .row(&[
            "<script>x</script>",
            "Ann\r\nBcc: evil@example.com",
            "Prospect",
            "12000",
            "Alice Wang",
        ])
        .save(&test.path("p.xlsx"));
    // Four of five rows go: the mass-delete guard needs to be told.
    test.run(&["sync", "--force", "p.xlsx"]).assert_code(0);
    test.run(&["--now", &later(30), "remind"]).assert_code(0);
    let alice = smtp.to("alice@example.com");
    assert_eq!(alice.len(), 1);
    assert_eq!(alice[0].subject(), "1 个商机需要跟进");
    assert!(
        !alice[0].header_names().contains(&"bcc".to_string()),
        "no injected header"
    );
    assert!(smtp.to("evil@example.com").is_empty());
    let (text, html) = alice[0].bodies();
    assert!(
        html.contains("&lt;script&gt;") && !html.contains("<script>"),
        "{html}"
    );
    assert!(text.contains("您好"), "{text}");
}

#[test]
fn business_days_and_holidays_change_who_is_stalled() {
    let smtp = SmtpServer::start(0);
    let test = TestDir::new();
    team(&test, &smtp, "business_days = true");
    // Nine calendar days later the two Lead deals (limit 7) are stalled by calendar days, but nine
    // calendar days always hold a weekend, so at most seven business days.
    let n_stalled = |now: &str| {
        test.run(&[
            "--now",
            now,
            "deals",
            "list",
            "--stalled",
            "--format",
            "json",
        ])
        .json()
        .as_array()
        .map(Vec::len)
    };
    let in_10_days = later(9);
    let calendar = {
        let text = std::fs::read_to_string(test.config_path()).expect("config");
        std::fs::write(
            test.config_path(),
            text.replace("business_days = true", "business_days = false"),
        )
        .expect("write");
        let n = n_stalled(&in_10_days);
        std::fs::write(test.config_path(), text).expect("restore");
        n
    };
    assert_eq!(calendar, Some(2), "calendar days: both Lead deals (9 > 7)");
    assert_eq!(
        n_stalled(&in_10_days),
        Some(0),
        "business days: at most 7, not over the limit"
    );

    // One stall rule, one calendar: the funnel and the reminders agree with the list.
    let in_12_days = later(12);
    let listed = n_stalled(&in_12_days).expect("a list");
    assert!(
        listed > 0,
        "twelve days on, some Lead deal is past 7 business days"
    );
    let funnel = test
        .run(&["--now", &in_12_days, "funnel", "--format", "json"])
        .json();
    let in_funnel = funnel["stalled"].as_array().map(Vec::len).expect("stalled");
    let per_stage: u64 = funnel["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|stage| stage["n_stalled"].as_u64().unwrap_or(0))
        .sum();
    let reminded = test.run(&["--now", &in_12_days, "remind", "--dry-run"]);
    let in_reminders = reminded.stdout.matches("stage date unknown").count();
    assert_eq!(
        (in_funnel, per_stage as usize, in_reminders),
        (listed, listed, listed),
        "list, funnel and reminders: {}",
        reminded.stdout
    );
}

#[test]
fn the_password_never_shows_in_output_or_records() {
    let smtp = SmtpServer::start(0);
    let test = TestDir::new();
    team(&test, &smtp, "");
    let text = std::fs::read_to_string(test.config_path()).expect("config");
    std::fs::write(
        test.config_path(),
        text.replace(
            "timeout = \"5s\"",
            "timeout = \"5s\"\nusername = \"funnelsync\"\nallow_plaintext_auth = true",
        ),
    )
    .expect("config");
    let output = test
        .command(&["--now", &later(30), "remind"])
        .env("FUNNELSYNC_SMTP_PASSWORD", "s3cret-Passw0rd")
        .env("RUST_LOG", "trace")
        .output()
        .expect("run");
    let all_output = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!all_output.contains("s3cret-Passw0rd"), "{all_output}");
    let errors = test.outbox_errors();
    assert!(!errors.contains("s3cret-Passw0rd"), "{errors}");
}

#[test]
fn the_daemon_sends_at_the_configured_time_and_catches_up_once() {
    let smtp = SmtpServer::start(0);
    let test = TestDir::new();
    team(&test, &smtp, "");
    // Make the open deals old, in the real store.
    test.execute("UPDATE deals SET stage_entered_at = '2026-01-05T00:00:00.000Z'");
    let due = chrono::Utc::now() + chrono::Duration::seconds(8);
    let at = due.format("%H:%M:%S").to_string();
    let config = std::fs::read_to_string(test.config_path()).expect("config");
    let config = config
        .replace("at = \"09:00\"", &format!("at = \"{at}\""))
        .replace(
            "timezone = \"Asia/Shanghai\"",
            "timezone = \"UTC\"\nweekdays_only = false",
        );
    std::fs::write(test.config_path(), &config).expect("config");
    let mut daemon = test.start_daemon();
    daemon.wait_ready();
    if chrono::Utc::now() < due - chrono::Duration::seconds(1) {
        assert!(
            smtp.messages().is_empty(),
            "nothing before the due time:\n{}",
            daemon.log()
        );
    }
    wait_until(Duration::from_secs(15), "the scheduled digests", || {
        smtp.messages().len() == 3
    });
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)), Some(0));

    // Restarted after the due time with that run done: nothing more is sent.
    let daemon = test.start_daemon();
    daemon.wait_ready();
    wait_until(Duration::from_secs(10), "the catch-up decision", || {
        daemon.log().contains("nothing to catch up")
    });
    assert_eq!(smtp.messages().len(), 3, "{}", daemon.log());
    drop(daemon);

    // Down at the due time (the last run was days ago, the one an hour ago never happened): one
    // catch-up run on start.
    test.execute("UPDATE remind_runs SET due_at = '2026-01-01T00:00:00.000Z'");
    test.execute("UPDATE outbox SET status = 'failed'");
    let earlier = (chrono::Utc::now() - chrono::Duration::hours(1))
        .format("%H:%M:%S")
        .to_string();
    std::fs::write(
        test.config_path(),
        config.replace(&format!("at = \"{at}\""), &format!("at = \"{earlier}\"")),
    )
    .expect("config");
    let daemon = test.start_daemon();
    daemon.wait_ready();
    wait_until(Duration::from_secs(10), "the catch-up run", || {
        daemon.log().contains("reminder run:")
    });
    assert_eq!(
        smtp.messages().len(),
        6,
        "once, not once per missed day:\n{}",
        daemon.log()
    );
    assert_eq!(daemon.log_count("reminder run:"), 1, "{}", daemon.log());
}

fn days_ago(days: i64) -> String {
    (chrono::Utc::now().date_naive() - chrono::Duration::days(days)).to_string()
}

#[test]
fn deals_are_stalled_from_the_first_day_and_stage_dates_come_from_the_sheet() {
    let test = TestDir::new();
    test.write(
        "leads.csv",
        format!(
            "Company,Contact,Stage,Owner,Last Contact,Stage Since\n\
             Acme,Ann,Prospect,Alice Wang,{},\n\
             Beta,Ben,Prospect,Alice Wang,,{}\n\
             Gamma,Gus,Prospect,Alice Wang,{},\n\
             Delta,Dan,Lead,Alice Wang,,\n",
            days_ago(40),
            days_ago(20),
            days_ago(3)
        ),
    );
    test.config(
        r#"[[sources]]
name = "leads"
path = "leads.csv"

[remind]
timezone = "UTC"

[reps]
"Alice Wang" = "alice@example.com"

[smtp]
host = "127.0.0.1"
port = 9
security = "none"
from = "Funnel Sync <funnelsync@example.com>"
"#,
    );
    test.sync().assert_code(0);

    // Imported today, and stalled today: Acme by its last contact 40 days ago (the day it entered
    // Prospect is unknown), Beta by the stage date the sheet gives. Gamma was contacted 3 days
    // ago; Delta has no date at all and was first seen today.
    let stalled = test
        .run(&["deals", "list", "--stalled", "--format", "json"])
        .json();
    let names: Vec<&str> = stalled
        .as_array()
        .expect("array")
        .iter()
        .map(|deal| deal["company"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["Acme", "Beta"], "worst first: {stalled}");
    assert_eq!(
        stalled[0]["stalled"],
        "in Prospect (stage date unknown), last contact 40 days ago; limit 10"
    );
    assert_eq!(
        stalled[1]["stalled"],
        "in Prospect for 20 days, no contact recorded; limit 10"
    );
    let acme = test.deal_by("company", "Acme");
    assert_eq!(acme["stage_since"], serde_json::Value::Null);
    assert_eq!(acme["stage_entered_at"], serde_json::Value::Null);
    assert_eq!(test.deal_by("company", "Beta")["stage_since"], days_ago(20));

    let dry_run = test.run(&["remind", "--dry-run"]);
    dry_run.assert_code(0);
    assert!(
        dry_run.stdout.contains("To: alice@example.com")
            && dry_run.stdout.contains("Acme")
            && dry_run.stdout.contains("Beta")
            && !dry_run.stdout.contains("Gamma"),
        "{}",
        dry_run.stdout
    );

    // Stage changes seen after the import are dated today: Acme is no longer stalled, and the
    // sheet's Stage Since column shows the day.
    test.run(&["deals", "move", &acme["id"].to_string(), "Opportunity"])
        .assert_code(0);
    let acme = test.deal_by("company", "Acme");
    assert_eq!(acme["stage_since"], days_ago(0));
    assert!(acme["stage_entered_at"].is_string());
    test.sync().assert_code(0);
    let csv = std::fs::read_to_string(test.path("leads.csv")).expect("csv");
    let acme_line = csv
        .lines()
        .find(|line| line.starts_with("Acme"))
        .expect("Acme's row");
    assert!(acme_line.contains(&days_ago(0)), "{csv}");
    // The same for a stage changed in the sheet: Gamma moves to Won in the file, its Stage Since
    // cell left as it was (empty), and the sync dates it today in the store and in the file.
    let edited = csv.replace("Gamma,Gus,Prospect", "Gamma,Gus,Won");
    assert_ne!(edited, csv);
    std::fs::write(test.path("leads.csv"), edited).expect("edit");
    test.sync().assert_code(0);
    assert_eq!(test.deal_by("company", "Gamma")["stage_since"], days_ago(0));
    let csv = std::fs::read_to_string(test.path("leads.csv")).expect("csv");
    let gamma_line = csv
        .lines()
        .find(|line| line.starts_with("Gamma"))
        .expect("Gamma's row");
    assert!(gamma_line.contains(&days_ago(0)), "{csv}");

    // Time in stage: Beta's Prospect visit has a known start (the sheet's date) and counts; Acme's
    // and Gamma's started on a day nobody knows and are left out, and said so.
    test.run(&[
        "deals",
        "move",
        &test.deal_by("company", "Beta")["id"].to_string(),
        "Opportunity",
    ])
    .assert_code(0);
    let funnel = test.run(&["funnel", "--format", "json"]).json();
    let prospect = &funnel["stages"][1];
    assert_eq!(prospect["stage"], "Prospect");
    assert_eq!(prospect["n_left"], 1, "{prospect}");
    assert_eq!(
        prospect["n_unknown_start"], 2,
        "Acme's and Gamma's: {prospect}"
    );
    assert_eq!(
        prospect["open_amount"].to_string(),
        "0.0",
        "not -0: {prospect}"
    );
    let median = prospect["median_days"].as_f64().expect("a median");
    assert!((20.0..21.0).contains(&median), "{prospect}");
    let table = test.run(&["funnel"]).stdout;
    assert!(
        table.contains("2 visit(s) whose start is unknown"),
        "the table says how many were left out:\n{table}"
    );
}
