//! The HTTP API and pages against the real daemon on 127.0.0.1: each role's view and refusals, an
//! edit reaching the workbook, stale writes, metrics, hostile bodies, the OpenAPI document, logins.

use serde_json::{json, Value};

use crate::harness::{read_xlsx, wait_until, Http, HttpUser, TestDir, XlsxBuilder};

/// A team workbook, four users (admin, manager, Alice the rep who does not see amounts, a
/// read-only user) and the daemon serving HTTP on a free port.
struct Team {
    dir: TestDir,
    daemon: crate::harness::Daemon,
    http: Http,
    port: u16,
    admin: HttpUser,
    manager: HttpUser,
    alice: HttpUser,
    readonly: HttpUser,
}

impl Team {
    fn start(extra_http: &str) -> Team {
        let dir = TestDir::new();
        XlsxBuilder::new()
            .sheet("Pipeline")
            .row(&[
                "Company",
                "Contact",
                "Email",
                "Stage",
                "Amount",
                "Owner",
                "Next Step",
            ])
            .row(&[
                "Acme",
                "Ann",
                "ann@acme.example",
                "Lead",
                "1000",
                "Alice Wang",
                "Call",
            ])
            .row(&[
                "Globex",
                "Gus",
                "gus@globex.example",
                "Prospect",
                "2000",
                "Bob Li",
                "Demo",
            ])
            .row(&[
                "Initech",
                "Ivy",
                "ivy@initech.example",
                "Opportunity",
                "3000",
                "alice wang",
                "",
            ])
            .save(&dir.path("pipeline.xlsx"));
        let admin = dir.token("root", "admin", None);
        let manager = dir.token("mia", "manager", None);
        let alice = dir.token("alice", "rep", Some("Alice Wang"));
        let mut readonly = dir.token("erp", "readonly", None);
        // The ERP is not shown contacts' email, owners or stages.
        readonly
            .config_lines
            .push_str("\nhidden_fields = [\"email\", \"owner\", \"stage\"]");
        let port = dir.http_source(
            "pipeline.xlsx",
            &format!("hidden_fields = {{ rep = [\"amount\"] }}\n{extra_http}"),
            &[&admin, &manager, &alice, &readonly],
        );
        dir.sync().assert_code(0);
        let (daemon, http) = dir.start_serving(&["run"], port);
        daemon.wait_ready();
        Team {
            dir,
            daemon,
            http,
            port,
            admin,
            manager,
            alice,
            readonly,
        }
    }

    /// The id of the deal of this company, as the admin sees it.
    fn id_of(&self, company: &str) -> i64 {
        let deals = self
            .http
            .get("/api/v1/deals", Some(&self.admin.token))
            .assert_status(200)
            .json();
        deals["deals"]
            .as_array()
            .and_then(|deals| deals.iter().find(|deal| deal["company"] == company))
            .and_then(|deal| deal["id"].as_i64())
            .unwrap_or_else(|| panic!("no deal of {company} in {deals}"))
    }
}

fn companies(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list["deals"]
        .as_array()
        .expect("deals")
        .iter()
        .map(|deal| deal["company"].as_str().unwrap_or("").to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn each_role_sees_and_changes_only_what_it_may() {
    let team = Team::start("");
    let http = &team.http;
    let acme = team.id_of("Acme");
    let globex = team.id_of("Globex");

    // Alice sees her own deals (owner spelled either way), never an amount.
    let mine = http
        .get("/api/v1/deals", Some(&team.alice.token))
        .assert_status(200)
        .json();
    assert_eq!(companies(&mine), ["Acme", "Initech"]);
    assert!(mine["deals"][0].get("amount").is_none(), "{mine}");
    let funnel = http
        .get("/api/v1/funnel", Some(&team.alice.token))
        .assert_status(200)
        .json();
    assert_eq!(funnel["owner"], "Alice Wang");
    assert!(funnel["stages"][0]["open_amount"].is_null(), "{funnel}");
    // Another rep's deal does not exist for her, read or written; ids do not leak.
    let read = http.get(&format!("/api/v1/deals/{globex}"), Some(&team.alice.token));
    read.assert_status(404);
    assert_eq!(read.json()["error"]["code"], "not_found");
    http.json(
        "PATCH",
        &format!("/api/v1/deals/{globex}"),
        &team.alice.token,
        &json!({"next_step": "x"}),
    )
    .assert_status(404);
    http.json(
        "POST",
        &format!("/api/v1/deals/{globex}/move"),
        &team.alice.token,
        &json!({"stage": "Won"}),
    )
    .assert_status(404);
    // She changes her own deal, but gives it to nobody else and sets no amount.
    http.json(
        "PATCH",
        &format!("/api/v1/deals/{acme}"),
        &team.alice.token,
        &json!({"next_step": "Send quote"}),
    )
    .assert_status(200);
    let refused = http.json(
        "PATCH",
        &format!("/api/v1/deals/{acme}"),
        &team.alice.token,
        &json!({"owner": "Bob Li"}),
    );
    refused.assert_status(403);
    assert_eq!(refused.json()["error"]["field"], "owner");
    http.json(
        "PATCH",
        &format!("/api/v1/deals/{acme}"),
        &team.alice.token,
        &json!({"amount": 5}),
    )
    .assert_status(403);
    http.get("/api/v1/funnel?owner=Bob%20Li", Some(&team.alice.token))
        .assert_status(403);
    http.get("/api/v1/status", Some(&team.alice.token))
        .assert_status(403);
    // A deal she creates is hers.
    let created = http.json(
        "POST",
        "/api/v1/deals",
        &team.alice.token,
        &json!({"company": "Hooli", "contact": "Hal"}),
    );
    created.assert_status(201);
    assert_eq!(created.json()["owner"], "Alice Wang");
    assert_eq!(created.json()["stage"], "Lead");

    // Read-only sees everything and changes nothing.
    let all = http
        .get("/api/v1/deals", Some(&team.readonly.token))
        .assert_status(200)
        .json();
    assert_eq!(companies(&all), ["Acme", "Globex", "Hooli", "Initech"]);
    assert_eq!(all["deals"][0]["amount"], 1000.0);
    http.get(
        &format!("/api/v1/deals/{globex}"),
        Some(&team.readonly.token),
    )
    .assert_status(200);
    http.json(
        "PATCH",
        &format!("/api/v1/deals/{globex}"),
        &team.readonly.token,
        &json!({"next_step": "x"}),
    )
    .assert_status(403);
    http.json(
        "POST",
        "/api/v1/deals",
        &team.readonly.token,
        &json!({"company": "X"}),
    )
    .assert_status(403);

    // The manager changes any deal but administers nothing.
    let moved = http.json(
        "POST",
        &format!("/api/v1/deals/{globex}/move"),
        &team.manager.token,
        &json!({"stage": "成交"}),
    );
    moved.assert_status(200);
    assert_eq!(moved.json()["stage"], "Won");
    let run = moved.json()["run_id"].as_i64().expect("run id");
    for path in [
        "/api/v1/status",
        "/api/v1/errors",
        "/api/v1/history",
        "/api/v1/conflicts",
    ] {
        http.get(path, Some(&team.manager.token)).assert_status(403);
    }
    http.send(
        "POST",
        &format!("/api/v1/history/{run}/undo"),
        Some(&team.manager.token),
        "application/json",
        "",
        &[],
    )
    .assert_status(403);

    // The admin sees files, errors, history, and undoes the manager's move.
    let status = http
        .get("/api/v1/status", Some(&team.admin.token))
        .assert_status(200)
        .json();
    assert!(
        status[0]["file"]
            .as_str()
            .is_some_and(|file| file.ends_with("pipeline.xlsx")),
        "{status}"
    );
    http.get("/api/v1/errors", Some(&team.admin.token))
        .assert_status(200);
    let runs = http
        .get("/api/v1/history?source=api", Some(&team.admin.token))
        .assert_status(200)
        .json();
    assert!(
        runs.as_array()
            .is_some_and(|runs| runs.iter().any(|entry| entry["message"] == "by mia")),
        "{runs}"
    );
    let changes = http
        .get(&format!("/api/v1/history/{run}"), Some(&team.admin.token))
        .assert_status(200)
        .json();
    assert_eq!(changes["changes"][0]["field"], "stage");
    let undone = http.send(
        "POST",
        &format!("/api/v1/history/{run}/undo"),
        Some(&team.admin.token),
        "application/json",
        "",
        &[],
    );
    undone.assert_status(200);
    // The undo is a run that names who did it.
    let undo_run = undone.json()["run_id"].as_i64().expect("the undo's run");
    let recorded = http
        .get(
            &format!("/api/v1/history/{undo_run}"),
            Some(&team.admin.token),
        )
        .assert_status(200)
        .json();
    assert!(
        recorded["run"]["message"]
            .as_str()
            .is_some_and(|message| message.starts_with(&format!("undo of run {run}"))
                && message.ends_with("; by root")),
        "{recorded}"
    );
    let globex_now = http
        .get(&format!("/api/v1/deals/{globex}"), Some(&team.admin.token))
        .json();
    assert_eq!(globex_now["stage"], "Prospect");

    // No token, or a wrong one: 401; health and metrics need none.
    http.get("/api/v1/deals", None).assert_status(401);
    let wrong = http.get("/api/v1/deals", Some("not-a-token"));
    wrong.assert_status(401);
    assert_eq!(wrong.header("www-authenticate"), Some("Bearer"));
    http.get("/healthz", None).assert_status(200);
    http.get("/metrics", None).assert_status(200);
    assert!(
        !team.daemon.log().contains(&team.alice.token),
        "a token reached the log"
    );
}

#[test]
fn a_patch_reaches_the_spreadsheet_and_a_stale_one_is_refused() {
    let team = Team::start("");
    let http = &team.http;
    let acme = team.id_of("Acme");
    let read = http
        .get(&format!("/api/v1/deals/{acme}"), Some(&team.manager.token))
        .assert_status(200)
        .clone();
    let etag = read.header("etag").expect("an ETag").to_string();
    assert_eq!(etag, format!("\"{}\"", read.json()["version"]));
    assert_eq!(
        read.json()["files"][0]
            .as_str()
            .map(|file| file.ends_with("pipeline.xlsx")),
        Some(true)
    );
    assert_eq!(read.json()["stage_history"][0]["to_stage"], "Lead");

    // Cleaned like a cell: a currency sign sets the currency, an alias names the stage.
    let changed = http.send(
        "PATCH",
        &format!("/api/v1/deals/{acme}"),
        Some(&team.manager.token),
        "application/json",
        json!({"amount": "¥12,500", "next_step": "Sign <contract>"}).to_string(),
        &[("If-Match", &etag)],
    );
    changed.assert_status(200);
    assert_eq!(changed.json()["amount"], 12500.0);
    assert_eq!(changed.json()["currency"], "CNY");
    assert_ne!(changed.header("etag"), Some(etag.as_str()));

    // The same old version again: someone else's change would be lost, so 412.
    let stale = http.send(
        "PATCH",
        &format!("/api/v1/deals/{acme}"),
        Some(&team.manager.token),
        "application/json",
        json!({"amount": "1"}).to_string(),
        &[("If-Match", &etag)],
    );
    stale.assert_status(412);
    assert_eq!(stale.json()["error"]["code"], "precondition_failed");
    let bad = http.json(
        "PATCH",
        &format!("/api/v1/deals/{acme}"),
        &team.manager.token,
        &json!({"amount": "twelve"}),
    );
    bad.assert_status(400);
    assert_eq!(bad.json()["error"]["field"], "amount");
    assert!(bad.json()["error"]["message"]
        .as_str()
        .is_some_and(|message| message.contains("not a number")));

    // The ERP pushes back a contract number: kept with the deal, in the history as extra.NAME.
    let contract = http.json(
        "PATCH",
        &format!("/api/v1/deals/{acme}"),
        &team.manager.token,
        &json!({"extra": {"Contract No": "HT-2026-001"}}),
    );
    contract.assert_status(200);
    assert_eq!(contract.json()["extra"]["Contract No"], "HT-2026-001");
    let run = contract.json()["run_id"].as_i64().expect("run");
    let recorded = http
        .get(&format!("/api/v1/history/{run}"), Some(&team.admin.token))
        .json();
    assert_eq!(recorded["changes"][0]["field"], "extra.Contract No");
    http.json(
        "PATCH",
        &format!("/api/v1/deals/{acme}"),
        &team.manager.token,
        &json!({"extra": {"Contract No": 5}}),
    )
    .assert_status(400);

    // The daemon writes the change into the workbook, as for `deals set`.
    let workbook = team.dir.path("pipeline.xlsx");
    wait_until(
        std::time::Duration::from_secs(20),
        "the amount in the workbook",
        || {
            read_xlsx(&workbook, "Pipeline")
                .column("Next Step")
                .first()
                .map(String::as_str)
                == Some("Sign <contract>")
        },
    );
    let sheet = read_xlsx(&workbook, "Pipeline");
    assert_eq!(sheet.column("Amount")[0], "12500");
    assert_eq!(sheet.column("Company")[1], "Globex", "other rows stay");
    // A run of its own, by the user, that the CLI lists too.
    let history = team
        .dir
        .run(&["history", "--source", "api", "--format", "json"]);
    history.assert_code(0);
    assert_eq!(history.json()[0]["message"], "by mia");
}

#[test]
fn metrics_parse_as_prometheus_text() {
    let team = Team::start("");
    team.http
        .get("/api/v1/deals", Some(&team.admin.token))
        .assert_status(200);
    let reply = team.http.get("/metrics", None).assert_status(200).clone();
    assert!(reply
        .header("content-type")
        .is_some_and(|value| value.contains("text")));
    let value = |name: &str, label: Option<(&str, &str)>| metric(&reply.body, name, label);
    assert_eq!(
        value("funnelsync_syncs_total", Some(("result", "synced"))),
        Some(1.0)
    );
    assert_eq!(
        value("funnelsync_rows_total", Some(("change", "created"))),
        Some(3.0)
    );
    assert_eq!(value("funnelsync_files", Some(("state", "ok"))), Some(1.0));
    assert_eq!(
        value("funnelsync_files", Some(("state", "held"))),
        Some(0.0)
    );
    assert_eq!(
        value("funnelsync_outbox_messages", Some(("status", "pending"))),
        Some(0.0)
    );
    assert_eq!(
        value("funnelsync_deals", Some(("stage", "Lead"))),
        Some(1.0)
    );
    assert!(value(
        "funnelsync_last_successful_sync_age_seconds",
        Some(("source", "pipeline"))
    )
    .is_some_and(|age| age >= 0.0));
    assert_eq!(value("funnelsync_reminders_sent_total", None), Some(0.0));
    // Every result is there, also the ones that did not happen yet.
    for result in ["failed", "held"] {
        assert_eq!(
            value("funnelsync_syncs_total", Some(("result", result))),
            Some(0.0),
            "{result}"
        );
    }
    assert!(
        value(
            "funnelsync_http_requests_total",
            Some(("route", "/api/v1/deals"))
        )
        .is_some_and(|count| count >= 1.0),
        "{}",
        reply.body
    );

    // A save that changes nothing is a sync too: it records no run, and is counted all the same.
    let before = value("funnelsync_syncs_total", Some(("result", "unchanged"))).unwrap_or(-1.0);
    assert!(before >= 0.0, "{}", reply.body);
    crate::harness::UserEdit::open(&team.dir.path("pipeline.xlsx"), "Pipeline").save();
    wait_until(
        std::time::Duration::from_secs(20),
        "an unchanged sync counted",
        || {
            let body = team.http.get("/metrics", None).body;
            metric(
                &body,
                "funnelsync_syncs_total",
                Some(("result", "unchanged")),
            )
            .is_some_and(|now| now > before)
        },
    );
    let body = team.http.get("/metrics", None).body;
    assert_eq!(
        metric(&body, "funnelsync_syncs_total", Some(("result", "synced"))),
        Some(1.0),
        "{body}"
    );
}

/// The value of a sample of Prometheus text, by name and one label.
fn metric(text: &str, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    let lines = text.lines().map(|line| Ok(line.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    scrape
        .samples
        .iter()
        .find(|sample| {
            sample.metric == name
                && label.is_none_or(|(key, wanted)| sample.labels.get(key) == Some(wanted))
        })
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(value)
            | prometheus_parse::Value::Gauge(value)
            | prometheus_parse::Value::Untyped(value) => value,
            _ => f64::NAN,
        })
}

#[test]
fn metrics_count_the_reminders_sent() {
    let dir = TestDir::new();
    let smtp = crate::harness::SmtpServer::start(0);
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Company", "Contact", "Stage", "Owner"])
        .row(&["Acme", "Ann", "Prospect", "Alice Wang"])
        .save(&dir.path("p.xlsx"));
    let admin = dir.token("root", "admin", None);
    let port = crate::harness::free_port();
    dir.config(&format!(
        r#"[[sources]]
name = "pipeline"
path = "p.xlsx"
write_back = false

[remind]
at = "09:00"
timezone = "Asia/Shanghai"

[reps]
"Alice Wang" = "alice@example.com"

[smtp]
host = "127.0.0.1"
port = {smtp}
security = "none"
from = "Funnel Sync <funnelsync@example.com>"
timeout = "5s"

[http]
listen = "127.0.0.1:{port}"

{users}
"#,
        smtp = smtp.port,
        users = admin.config_lines
    ));
    dir.sync().assert_code(0);
    let month_later = (chrono::Utc::now() + chrono::Duration::days(30)).to_rfc3339();
    dir.run(&["--now", &month_later, "remind"]).assert_code(0);
    assert_eq!(smtp.to("alice@example.com").len(), 1, "one reminder sent");
    let (_served, http) = dir.start_serving(&["serve"], port);
    let body = http.get("/metrics", None).assert_status(200).body.clone();
    assert_eq!(
        metric(&body, "funnelsync_reminders_sent_total", None),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "funnelsync_outbox_messages",
            Some(("status", "sent"))
        ),
        Some(1.0),
        "{body}"
    );
}

#[test]
fn hostile_requests_get_400_or_413_never_500() {
    let team = Team::start("max_body_kb = 16");
    let http = &team.http;
    let acme = team.id_of("Acme");
    let path = format!("/api/v1/deals/{acme}");
    let token = team.manager.token.as_str();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("PATCH", "application/json", b"{\"amount\": ".to_vec(), 400),
        ("PATCH", "application/json", b"[1, 2]".to_vec(), 400),
        ("PATCH", "application/json", b"null".to_vec(), 400),
        ("PATCH", "application/json", b"{}".to_vec(), 400),
        (
            "PATCH",
            "application/json",
            b"{\"amount\": {\"$gt\": 1}}".to_vec(),
            400,
        ),
        (
            "PATCH",
            "application/json",
            b"{\"__proto__\": 1}".to_vec(),
            400,
        ),
        (
            "PATCH",
            "application/json",
            b"{\"amount\": 1e999}".to_vec(),
            400,
        ),
        (
            "PATCH",
            "application/json",
            b"{\"company\": \"\xff\xfe\"}".to_vec(),
            400,
        ),
        ("PATCH", "application/json", deep.into_bytes(), 413),
        ("PATCH", "application/json", vec![b' '; 40 * 1024], 413),
        (
            "PATCH",
            "text/plain",
            b"{\"next_step\": \"x\"}".to_vec(),
            415,
        ),
        (
            "POST",
            "application/json",
            b"{\"stage\": \"Won\", \"extra\": 1}".to_vec(),
            400,
        ),
        (
            "POST",
            "application/json",
            b"{\"stage\": \"no such stage\"}".to_vec(),
            400,
        ),
    ];
    for (method, content_type, body, expected) in cases {
        let target = if method == "POST" {
            format!("{path}/move")
        } else {
            path.clone()
        };
        let reply = if expected == 413 {
            http.send_streaming(method, &target, Some(token), content_type, body.clone())
        } else {
            http.send(method, &target, Some(token), content_type, &body, &[])
        };
        let shown = String::from_utf8_lossy(&body)
            .chars()
            .take(40)
            .collect::<String>();
        assert_eq!(reply.status, expected, "{method} {shown:?}: {}", reply.body);
        let error = reply.json();
        assert!(
            error["error"]["code"].is_string() && error["error"]["message"].is_string(),
            "{shown:?}: {error}"
        );
    }
    for (target, expected) in [
        ("/api/v1/deals/99999999999999999999999", 400),
        ("/api/v1/deals/-1", 404),
        ("/api/v1/deals?limit=-5", 400),
        ("/api/v1/deals?stage=nonsense", 400),
        ("/api/v1/deals?updated_since=yesterday", 400),
        ("/api/v1/funnel?since=2026-13-45", 400),
        ("/api/v1/history/abc", 400),
        ("/api/v1/no/such/path", 404),
    ] {
        let reply = http.get(target, Some(&team.admin.token));
        assert_eq!(reply.status, expected, "{target}: {}", reply.body);
        assert!(reply.json()["error"]["code"].is_string(), "{target}");
    }
    let bad_etag = http.send(
        "PATCH",
        &path,
        Some(token),
        "application/json",
        "{\"next_step\": \"x\"}",
        &[("If-Match", "yesterday")],
    );
    bad_etag.assert_status(400);
    // The daemon is still fine, and nothing changed the deal.
    http.get("/healthz", None).assert_status(200);
    let acme_now = http.get(&path, Some(token)).json();
    assert_eq!(acme_now["next_step"], "Call");
    assert_eq!(acme_now["company"], "Acme");
}

#[test]
fn the_openapi_document_describes_every_route() {
    let team = Team::start("");
    let http = &team.http;
    let document = http
        .get("/api/v1/openapi.json", None)
        .assert_status(200)
        .json();
    assert!(document["openapi"]
        .as_str()
        .is_some_and(|version| version.starts_with("3.")));
    let paths = document["paths"].as_object().expect("paths");
    let named_by_the_issue = [
        ("/deals", "get"),
        ("/deals", "post"),
        ("/deals/{id}", "get"),
        ("/deals/{id}", "patch"),
        ("/deals/{id}/move", "post"),
        ("/funnel", "get"),
        ("/stalled", "get"),
        ("/status", "get"),
        ("/errors", "get"),
        ("/conflicts", "get"),
        ("/history", "get"),
        ("/history/{run}", "get"),
        ("/history/{run}/undo", "post"),
    ];
    for (path, method) in named_by_the_issue {
        assert!(
            paths
                .get(path)
                .and_then(|operations| operations.get(method))
                .is_some(),
            "{method} {path} is not documented"
        );
    }
    // Every documented read answers as documented (no 404 or 405 for a route that exists), and
    // every $ref points at a component that exists.
    let acme = team.id_of("Acme").to_string();
    for (path, operations) in paths {
        for (method, operation) in operations.as_object().expect("operations") {
            assert!(
                operation["responses"].is_object(),
                "{method} {path} has no responses"
            );
            let concrete = path.replace("{id}", &acme).replace("{run}", "1");
            if method == "get" {
                let reply = http.get(&format!("/api/v1{concrete}"), Some(&team.admin.token));
                assert_eq!(reply.status, 200, "GET {concrete}: {}", reply.body);
            } else {
                // An empty body is refused by the handler (400/403/415), not by routing: no 405,
                // and no 404 from the API's fallback for unknown paths.
                let reply = http.send(
                    &method.to_uppercase(),
                    &format!("/api/v1{concrete}"),
                    Some(&team.readonly.token),
                    "application/json",
                    "",
                    &[],
                );
                assert!(
                    [400, 403, 415].contains(&reply.status),
                    "{method} {concrete}: {} {}",
                    reply.status,
                    reply.body
                );
                assert_ne!(
                    reply.json()["error"]["message"],
                    "there is no such API path",
                    "{method} {concrete} is not routed"
                );
            }
        }
    }
    let text = document.to_string();
    for reference in text.split("\"$ref\":\"#/").skip(1) {
        let pointer = reference.split('"').next().unwrap_or("");
        assert!(
            document.pointer(&format!("/{pointer}")).is_some(),
            "dangling $ref {pointer}"
        );
    }
    // A route that is not documented does not exist.
    http.send(
        "DELETE",
        &format!("/api/v1/deals/{acme}"),
        Some(&team.admin.token),
        "application/json",
        "",
        &[],
    )
    .assert_status(405);
}

#[test]
fn the_pages_log_in_once_with_a_token_limit_failures_and_check_forms() {
    let team = Team::start("");
    let http = &team.http;
    // Not logged in: the pages send the browser to the login form.
    let redirected = http.get("/deals", None);
    redirected.assert_status(303);
    assert_eq!(redirected.header("location"), Some("/login?next=/deals"));
    // A good token gives a session cookie a script cannot read and other sites do not send.
    let login = http.send(
        "POST",
        "/login",
        None,
        "application/x-www-form-urlencoded",
        format!("token={}&next=/deals", team.manager.token),
        &[],
    );
    login.assert_status(303);
    assert_eq!(login.header("location"), Some("/deals"));
    let cookie = login
        .header("set-cookie")
        .expect("a session cookie")
        .to_string();
    for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    let session = cookie.split(';').next().expect("cookie").to_string();
    let page = http.get_with("/deals", None, &[("Cookie", &session)]);
    page.assert_status(200);
    assert!(page.body.contains("Globex") && page.body.contains("Acme"));
    // A form without the session's CSRF token changes nothing.
    let acme = team.id_of("Acme");
    let forged = http.send(
        "POST",
        &format!("/deals/{acme}/move"),
        None,
        "application/x-www-form-urlencoded",
        "stage=Won&csrf=guess",
        &[("Cookie", &session)],
    );
    forged.assert_status(403);
    assert_eq!(
        http.get(&format!("/api/v1/deals/{acme}"), Some(&team.admin.token))
            .json()["stage"],
        "Lead"
    );
    // Chinese for a browser that prefers it.
    let chinese = http.get_with(
        "/funnel",
        None,
        &[
            ("Cookie", &session),
            ("Accept-Language", "zh-CN,zh;q=0.9,en;q=0.5"),
        ],
    );
    assert!(chinese.body.contains("销售漏斗"), "{}", chinese.body);
    // Wrong tokens: refused, then (after five) refused with 429 — but only the wrong ones: the
    // team behind the same address still gets in with valid tokens. Without trusted proxies,
    // `X-Forwarded-For` is the client's own word and is ignored: each try below names another
    // address, and all count against the one peer.
    for attempt in 0..5 {
        let forwarded = format!("198.51.100.{attempt}");
        http.send(
            "POST",
            "/login",
            None,
            "application/x-www-form-urlencoded",
            "token=guess",
            &[("X-Forwarded-For", &forwarded)],
        )
        .assert_status(401);
    }
    let limited = http.send(
        "POST",
        "/login",
        None,
        "application/x-www-form-urlencoded",
        "token=guess",
        &[("X-Forwarded-For", "198.51.100.99")],
    );
    limited.assert_status(429);
    http.get("/api/v1/deals", Some("another-guess"))
        .assert_status(429);
    let still_in = http.send(
        "POST",
        "/login",
        None,
        "application/x-www-form-urlencoded",
        format!("token={}", team.manager.token),
        &[],
    );
    still_in.assert_status(303);
    assert!(still_in.header("set-cookie").is_some());
    http.get("/api/v1/deals", Some(&team.manager.token))
        .assert_status(200);
    http.get("/api/v1/deals", Some(&team.alice.token))
        .assert_status(200);
    let _ = team.port;
}

#[test]
fn behind_a_trusted_proxy_each_client_is_limited_on_its_own() {
    let team = Team::start("trusted_proxies = [\"127.0.0.1\"]");
    let http = &team.http;
    let login = |forwarded: &str, token: &str| {
        http.send(
            "POST",
            "/login",
            None,
            "application/x-www-form-urlencoded",
            format!("token={token}"),
            &[("X-Forwarded-For", forwarded)],
        )
        .status
    };
    // The attacker, as nginx's `$proxy_add_x_forwarded_for` forwards them.
    for _ in 0..5 {
        assert_eq!(login("203.0.113.7", "guess"), 401);
    }
    assert_eq!(login("203.0.113.7", "guess"), 429);
    // An entry the attacker writes in front of the proxy's does not make them someone else.
    assert_eq!(login("192.0.2.1, 203.0.113.7", "guess"), 429);
    let api = |forwarded: &str, token: &str| {
        http.get_with(
            "/api/v1/deals",
            Some(token),
            &[("X-Forwarded-For", forwarded)],
        )
        .status
    };
    assert_eq!(api("203.0.113.7", "guess"), 429);
    // Another client behind the same proxy is not limited, for a mistake or a good token.
    assert_eq!(login("203.0.113.8", "typo"), 401);
    assert_eq!(api("203.0.113.8", "typo"), 401);
    assert_eq!(login("203.0.113.8", &team.manager.token), 303);
    assert_eq!(api("203.0.113.8", &team.manager.token), 200);
    // And the attacker's address with a valid token is let in too.
    assert_eq!(api("203.0.113.7", &team.admin.token), 200);
    // A bad list of proxies is refused by check-config, with its key.
    let config = std::fs::read_to_string(team.dir.config_path()).expect("config");
    std::fs::write(
        team.dir.config_path(),
        config.replace(
            "trusted_proxies = [\"127.0.0.1\"]",
            "trusted_proxies = [\"nginx\"]",
        ),
    )
    .expect("config");
    let check = team.dir.run(&["check-config"]);
    check.assert_code(2);
    assert!(
        check.stderr.contains("`http.trusted_proxies`")
            && check.stderr.contains("\"nginx\" is not an IP address"),
        "{}",
        check.stderr
    );
}

/// The CSRF token of a page's forms.
fn csrf_of(page: &str) -> String {
    page.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF token in the page")
        .to_string()
}

#[test]
fn each_role_sees_on_the_pages_only_what_it_may() {
    let team = Team::start("");
    let http = &team.http;
    let acme = team.id_of("Acme");
    let globex = team.id_of("Globex");
    let page = |session: &str, path: &str| http.get_with(path, None, &[("Cookie", session)]);
    let every_page = [
        "/funnel".to_string(),
        "/stalled".to_string(),
        "/deals".to_string(),
        format!("/deals/{acme}"),
    ];

    // Alice: another rep's deal does not exist; no amount anywhere; no files page.
    let alice = http.log_in(&team.alice.token);
    let other = page(&alice, &format!("/deals/{globex}"));
    other.assert_status(404);
    assert!(
        !other.body.contains("Globex") && !other.body.contains("gus@"),
        "{}",
        other.body
    );
    for path in &every_page {
        let shown = page(&alice, path);
        shown.assert_status(200);
        for hidden in [
            "1,000",
            "3,000",
            "1000.0",
            "name=\"amount\"",
            ">Amount<",
            "Won amount",
            "Open amount",
        ] {
            assert!(
                !shown.body.contains(hidden),
                "{path} shows {hidden:?} to a rep:\n{}",
                shown.body
            );
        }
        assert!(
            !shown.body.contains("href=\"/files\""),
            "{path} links the files page for a rep"
        );
    }
    let files = page(&alice, "/files");
    assert!([403, 404].contains(&files.status), "{}", files.status);
    assert!(!files.body.contains("pipeline.xlsx"), "{}", files.body);

    // The read-only ERP: no email, owner or stage on any page; no form to change a deal, and a
    // forged post is refused.
    let erp = http.log_in(&team.readonly.token);
    for path in &every_page {
        let shown = page(&erp, path);
        shown.assert_status(200);
        for hidden in [
            "ann@acme.example",
            "ivy@initech",
            "Alice Wang",
            "alice wang",
            "Bob Li",
        ] {
            assert!(
                !shown.body.contains(hidden),
                "{path} shows {hidden:?} to readonly:\n{}",
                shown.body
            );
        }
    }
    let deal = page(&erp, &format!("/deals/{acme}"));
    assert!(
        !deal.body.contains("Lead"),
        "the stage of the deal is shown:\n{}",
        deal.body
    );
    assert!(
        !deal.body.contains(&format!("action=\"/deals/{acme}"))
            && !deal.body.contains("name=\"version\""),
        "readonly gets an edit form:\n{}",
        deal.body
    );
    let csrf = csrf_of(&deal.body);
    for (path, form) in [
        (
            format!("/deals/{acme}"),
            format!("csrf={csrf}&next_step=Hacked"),
        ),
        (
            format!("/deals/{acme}/move"),
            format!("csrf={csrf}&stage=Won"),
        ),
    ] {
        let posted = http.send(
            "POST",
            &path,
            None,
            "application/x-www-form-urlencoded",
            form,
            &[("Cookie", &erp)],
        );
        posted.assert_status(403);
    }
    let acme_now = http
        .get(&format!("/api/v1/deals/{acme}"), Some(&team.admin.token))
        .json();
    assert_eq!(
        (acme_now["next_step"].as_str(), acme_now["stage"].as_str()),
        (Some("Call"), Some("Lead"))
    );

    // The API hides the same: no stage history without the stage, no filter on a hidden field.
    let read = http
        .get(&format!("/api/v1/deals/{acme}"), Some(&team.readonly.token))
        .assert_status(200)
        .json();
    for hidden in ["stage", "stage_history", "owner", "email"] {
        assert!(read.get(hidden).is_none(), "{hidden} in {read}");
    }
    for (query, field) in [("owner=Bob%20Li", "owner"), ("stage=Lead", "stage")] {
        let refused = http.get(
            &format!("/api/v1/deals?{query}"),
            Some(&team.readonly.token),
        );
        refused.assert_status(400);
        assert_eq!(refused.json()["error"]["field"], field);
    }
    http.get("/api/v1/funnel?owner=Bob%20Li", Some(&team.readonly.token))
        .assert_status(400);
    // The manager, who sees them, still filters by them.
    let bobs = http
        .get("/api/v1/deals?owner=Bob%20Li", Some(&team.manager.token))
        .assert_status(200)
        .json();
    assert_eq!(companies(&bobs), ["Globex"]);
}

#[test]
fn a_dead_file_watcher_shows_in_healthz_and_metrics() {
    let dir = TestDir::new();
    let admin = dir.token("root", "admin", None);
    // The share's folder is not there when the daemon starts (not mounted yet): the watcher
    // cannot watch it, so no event of it will ever come; only rescans see its files.
    let port = dir.http_source("share/p.csv", "", &[&admin]);
    let daemon = dir.start_process(&["run"]);
    daemon.wait_ready();
    let http = Http::new(port);
    wait_until(
        std::time::Duration::from_secs(20),
        "the server to listen",
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let health = http.get("/healthz", None);
    health.assert_status(503);
    let body = health.json();
    assert_eq!(
        (
            body["status"].as_str(),
            body["store"].as_str(),
            body["loop"].as_str(),
            body["watcher"].as_str()
        ),
        (Some("unhealthy"), Some("ok"), Some("ok"), Some("failed")),
        "{body}"
    );
    assert!(
        body["watcher_error"]
            .as_str()
            .is_some_and(|why| why.contains("share")),
        "{body}"
    );
    let metrics = http.get("/metrics", None).assert_status(200).clone();
    assert!(
        metrics
            .body
            .lines()
            .any(|line| line == "funnelsync_watcher_up 0"),
        "{}",
        metrics.body
    );
    drop(daemon);
    // With the folder there, the watcher is alive again after a restart.
    std::fs::create_dir_all(dir.path("share")).expect("share");
    std::fs::write(dir.path("share/p.csv"), "Company\nAcme\n").expect("csv");
    let (_daemon, http) = dir.start_serving(&["run"], port);
    let body = http.get("/healthz", None).assert_status(200).json();
    assert_eq!(
        (body["loop"].as_str(), body["watcher"].as_str()),
        (Some("ok"), Some("ok")),
        "{body}"
    );
    let metrics = http.get("/metrics", None).body;
    assert!(
        metrics
            .lines()
            .any(|line| line == "funnelsync_watcher_up 1"),
        "{metrics}"
    );
}

#[test]
fn a_hidden_stage_is_not_told_by_the_reason_of_a_stall() {
    let dir = TestDir::new();
    let month_ago = (chrono::Utc::now().date_naive() - chrono::Duration::days(30))
        .format("%Y-%m-%d")
        .to_string();
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Company", "Stage", "Owner", "Last Contact"])
        .row(&["Acme", "Prospect", "Alice Wang", &month_ago])
        .save(&dir.path("p.xlsx"));
    let manager = dir.token("mia", "manager", None);
    let mut erp = dir.token("erp", "readonly", None);
    erp.config_lines.push_str("\nhidden_fields = [\"stage\"]");
    let port = dir.http_source("p.xlsx", "language = \"en\"", &[&manager, &erp]);
    dir.sync().assert_code(0);
    let (_served, http) = dir.start_serving(&["serve"], port);
    // The manager is told why, stage and all.
    let stalled = http
        .get("/api/v1/stalled", Some(&manager.token))
        .assert_status(200)
        .json();
    assert!(
        stalled[0]["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("Prospect")),
        "{stalled}"
    );
    // The ERP is told that the deal is stalled, never in which stage.
    for path in [
        "/api/v1/stalled",
        "/api/v1/deals?stalled=true",
        "/api/v1/funnel",
    ] {
        let body = http
            .get(path, Some(&erp.token))
            .assert_status(200)
            .body
            .clone();
        assert!(!body.contains("Prospect"), "{path}: {body}");
        assert!(body.contains("Acme"), "{path}: {body}");
    }
    let session = http.log_in(&erp.token);
    for path in ["/stalled", "/deals?stalled=1", "/deals/1"] {
        let page = http.get_with(path, None, &[("Cookie", &session)]);
        page.assert_status(200);
        assert!(!page.body.contains("Prospect"), "{path}: {}", page.body);
    }
}

#[test]
fn sheet_values_are_escaped_in_the_pages() {
    let dir = TestDir::new();
    XlsxBuilder::new()
        .row(&["Company", "Contact", "Email", "Owner", "Next Step"])
        .row(&[
            "<script>alert(1)</script>",
            "Eve",
            "eve@x.example",
            "Eve",
            "\"><img src=x onerror=alert(2)>",
        ])
        .save(&dir.path("p.xlsx"));
    let admin = dir.token("root", "admin", None);
    let port = dir.http_source("p.xlsx", "language = \"en\"", &[&admin]);
    dir.sync().assert_code(0);
    let (_daemon, http) = dir.start_serving(&["serve"], port);
    let session = http.log_in(&admin.token);
    let page = http.get_with("/deals/1", None, &[("Cookie", &session)]);
    page.assert_status(200);
    assert!(!page.body.contains("<script>alert"), "{}", page.body);
    assert!(page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!page.body.contains("<img src=x"));
    // `serve` watches no file: health says so.
    assert_eq!(http.get("/healthz", None).json()["watcher"], "off");
}

#[test]
fn token_new_prints_a_token_and_the_config_line_and_http_config_is_checked() {
    let dir = TestDir::new();
    let user = dir.token("ops", "rep", Some("Alice Wang"));
    assert_eq!(user.token.len(), 64);
    assert!(
        user.config_lines.contains("role = \"rep\"")
            && user.config_lines.contains("rep = \"Alice Wang\"")
    );
    assert!(
        !user.config_lines.contains(&user.token),
        "the config holds the hash, not the token"
    );
    let other = dir.token("ops", "admin", None);
    std::fs::write(dir.path("a.csv"), "Company\nAcme\n").expect("csv");
    dir.http_source("a.csv", "", &[&user]);
    let summary = dir.run(&["check-config"]);
    summary.assert_code(0);
    assert!(
        summary.stdout.contains("http: http://127.0.0.1:")
            && summary.stdout.contains("users: ops (rep)"),
        "{}",
        summary.stdout
    );
    assert_ne!(user.token, other.token);
    dir.run(&["token", "new", "x", "--role", "boss"])
        .assert_code(2);
    dir.run(&["token", "new", "x", "--role", "rep"])
        .assert_code(2);

    // Every problem of [http] is reported with its line.
    std::fs::write(dir.path("p.csv"), "Company\nAcme\n").expect("csv");
    dir.single_source(
        "p.csv",
        "\n[http]\nlisten = \"localhost\"\nlanguage = \"fr\"\n\n[[http.users]]\nname = \"a\"\nrole = \"rep\"\ntoken_sha256 = \"abc\"\n\n[[http.users]]\nname = \"b\"\nrole = \"boss\"\ntoken_file = \"t\"\n\n[[http.users]]\nname = \"c\"\nrole = \"admin\"\ntoken = \"plain\"\n",
    );
    let run = dir.run(&["check-config"]);
    run.assert_code(2);
    let expected = [
        "line 9: `http.listen`",
        "line 10: `http.language`",
        "line 12: `http.users[1].rep`",
        "line 15: `http.users[1].token_sha256`",
        "line 19: `http.users[2].role`",
        "line 25: `http.users[3].token`",
    ];
    for line in expected {
        assert!(
            run.stderr.contains(line),
            "missing {line:?} in\n{}",
            run.stderr
        );
    }
    assert!(
        !run.stderr.contains("plain"),
        "a token in the config is never repeated"
    );
}

#[test]
fn the_funnel_of_the_api_is_the_funnel_of_the_command_line() {
    let team = Team::start("");
    let from_api = team
        .http
        .get(
            "/api/v1/funnel?since=2026-01-01&until=2026-12-31",
            Some(&team.manager.token),
        )
        .assert_status(200)
        .json();
    let run = team.dir.run(&[
        "funnel",
        "--since",
        "2026-01-01",
        "--until",
        "2026-12-31",
        "--format",
        "json",
    ]);
    run.assert_code(0);
    let from_cli = run.json();
    for key in ["period", "owner", "stages", "totals", "by_owner"] {
        assert_eq!(from_api[key], from_cli[key], "{key}");
    }
    assert_eq!(from_api["stages"][0]["open_count"], 1);
}

#[test]
fn an_admin_forces_a_held_file_from_the_files_page() {
    let dir = TestDir::new();
    let sheet = |companies: &[&str]| {
        let mut builder = XlsxBuilder::new()
            .sheet("Pipeline")
            .row(&["Company", "Email", "Stage"]);
        for company in companies {
            let email = format!("{}@example.com", company.to_lowercase());
            builder = builder.row(&[company, &email, "Lead"]);
        }
        builder
    };
    sheet(&["Acme", "Beta", "Core", "Delta"]).save(&dir.path("p.xlsx"));
    let admin = dir.token("root", "admin", None);
    let manager = dir.token("mia", "manager", None);
    let port = dir.http_source("p.xlsx", "", &[&admin, &manager]);
    dir.sync().assert_code(0);
    let (daemon, http) = dir.start_serving(&["run"], port);
    daemon.wait_ready();
    // Three of four rows gone: the daemon holds the file.
    sheet(&["Acme"]).save(&dir.path("p.xlsx"));
    wait_until(std::time::Duration::from_secs(20), "the file held", || {
        http.get("/api/v1/status", Some(&admin.token)).json()[0]["state"] == "held"
    });
    let live = |http: &Http| {
        http.get("/api/v1/deals", Some(&admin.token)).json()["total"]
            .as_i64()
            .unwrap_or(-1)
    };
    assert_eq!(live(&http), 4, "nothing applied while held");
    let file = http.get("/api/v1/status", Some(&admin.token)).json()[0]["file"]
        .as_str()
        .expect("file")
        .to_string();

    // The manager may not force; the admin does, through the page's form.
    http.json(
        "POST",
        "/api/v1/files/force",
        &manager.token,
        &json!({"file": file}),
    )
    .assert_status(403);
    let session = http.log_in(&admin.token);
    let page = http.get_with("/files", None, &[("Cookie", &session)]);
    page.assert_status(200);
    assert!(page.body.contains("Force"), "{}", page.body);
    let csrf = page
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF token in the page")
        .to_string();
    let form = format!("csrf={csrf}&file={}", file.replace('/', "%2F"));
    let forced = http.send(
        "POST",
        "/files/force",
        None,
        "application/x-www-form-urlencoded",
        form,
        &[("Cookie", &session)],
    );
    forced.assert_status(303);
    wait_until(
        std::time::Duration::from_secs(20),
        "the forced sync",
        || live(&http) == 1,
    );
    // `serve` has no daemon to force anything: 409.
    drop(daemon);
    let (_served, http) = dir.start_serving(&["serve"], port);
    http.json(
        "POST",
        "/api/v1/files/force",
        &admin.token,
        &json!({"file": file}),
    )
    .assert_status(409);
}

#[test]
fn with_tls_files_the_server_speaks_https_only() {
    let dir = TestDir::new();
    std::fs::write(dir.path("p.csv"), "Company,Email\nAcme,a@acme.example\n").expect("csv");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
    std::fs::write(dir.path("cert.pem"), certified.cert.pem()).expect("cert");
    std::fs::write(dir.path("key.pem"), certified.signing_key.serialize_pem()).expect("key");
    let admin = dir.token("root", "admin", None);
    let port = dir.http_source(
        "p.csv",
        "tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"",
        &[&admin],
    );
    dir.sync().assert_code(0);
    let daemon = dir.start_process(&["serve"]);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certificate =
        ureq::tls::Certificate::from_pem(certified.cert.pem().as_bytes()).expect("pem");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&[certificate]))
                .build(),
        )
        .build()
        .into();
    let url = format!("https://localhost:{port}/api/v1/deals");
    let mut status = 0;
    wait_until(
        std::time::Duration::from_secs(20),
        "HTTPS to answer",
        || {
            status = agent
                .get(&url)
                .header("Authorization", format!("Bearer {}", admin.token))
                .call()
                .map(|response| response.status().as_u16())
                .unwrap_or(0);
            status != 0
        },
    );
    assert_eq!(status, 200, "{}", daemon.log());
    // Plain HTTP on the same port gets no answer.
    assert!(!Http::new(port).answers_healthy());
}

/// A pipeline with extra columns a team formats: "Contract No" (a yellow fill, Globex's filled
/// in) and "Region".
fn workbook_with_extra_columns(path: &std::path::Path) {
    use rust_xlsxwriter::{Color, Format, Workbook};
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.set_name("Pipeline").expect("name");
    let fill = Format::new().set_background_color(Color::Yellow).set_bold();
    let headers = [
        "Company",
        "Email",
        "Stage",
        "Owner",
        "Contract No",
        "Region",
    ];
    for (column, text) in headers.iter().enumerate() {
        sheet.write_string(0, column as u16, *text).expect("header");
    }
    let rows = [
        [
            "Acme",
            "ann@acme.example",
            "Lead",
            "Alice Wang",
            "",
            "North",
        ],
        [
            "Globex",
            "gus@globex.example",
            "Prospect",
            "Bob Li",
            "HT-OLD",
            "South",
        ],
    ];
    for (row_idx, row) in rows.iter().enumerate() {
        let row_number = row_idx as u32 + 1;
        for (column, text) in row.iter().enumerate() {
            let column = column as u16;
            if headers[column as usize] == "Contract No" {
                if text.is_empty() {
                    sheet.write_blank(row_number, column, &fill).expect("cell");
                } else {
                    sheet
                        .write_string_with_format(row_number, column, *text, &fill)
                        .expect("cell");
                }
            } else {
                sheet.write_string(row_number, column, *text).expect("cell");
            }
        }
    }
    workbook.save(path).expect("save");
}

#[test]
fn an_extra_set_through_the_api_reaches_the_workbook_that_has_its_column() {
    use crate::in_place::{assert_other_entries_unchanged, entries, sheet_xml, PIPELINE_PART};
    let dir = TestDir::new();
    let path = dir.path("pipeline.xlsx");
    workbook_with_extra_columns(&path);
    let manager = dir.token("mia", "manager", None);
    let port = dir.http_source("pipeline.xlsx", "", &[&manager]);
    // The first sync adds the CRM ID column; what follows is measured against that.
    dir.sync().assert_code(0);
    let before = entries(&path);
    let (daemon, http) = dir.start_serving(&["run"], port);
    daemon.wait_ready();
    let acme = dir.deal_by("company", "Acme")["id"].as_i64().expect("id");
    let globex = dir.deal_by("company", "Globex")["id"].as_i64().expect("id");
    // The ERP pushes back a contract number, and one more value the sheet has no column for.
    http.json(
        "PATCH",
        &format!("/api/v1/deals/{acme}"),
        &manager.token,
        &json!({"extra": {"Contract No": "HT-2026-001", "PO Number": "PO-7"}}),
    )
    .assert_status(200);
    // A value that looks like a formula is text in the cell, never a live formula.
    http.json(
        "PATCH",
        &format!("/api/v1/deals/{globex}"),
        &manager.token,
        &json!({"extra": {"Contract No": "=HYPERLINK(\"http://evil.example\")"}}),
    )
    .assert_status(200);
    wait_until(
        std::time::Duration::from_secs(20),
        "both contract numbers in the workbook",
        || {
            read_xlsx(&path, "Pipeline").column("Contract No")
                == ["HT-2026-001", "=HYPERLINK(\"http://evil.example\")"]
        },
    );
    let sheet = read_xlsx(&path, "Pipeline");
    assert!(
        !sheet.values[0].iter().any(|header| header == "PO Number"),
        "an extra the file has no column for is not added: {:?}",
        sheet.values[0]
    );
    assert_eq!(sheet.column("Region"), ["North", "South"]);
    assert!(sheet.formulas.is_empty(), "{:?}", sheet.formulas);
    let after = entries(&path);
    assert_other_entries_unchanged(&before, &after, &[PIPELINE_PART]);
    let (cells_before, elements_before) = sheet_xml(&before[PIPELINE_PART].2);
    let (cells_after, elements_after) = sheet_xml(&after[PIPELINE_PART].2);
    let references: std::collections::BTreeSet<&String> =
        cells_before.keys().chain(cells_after.keys()).collect();
    let changed: Vec<&String> = references
        .into_iter()
        .filter(|reference| cells_after.get(*reference) != cells_before.get(*reference))
        .collect();
    assert_eq!(
        changed,
        ["E2", "E3"],
        "only the two contract numbers changed"
    );
    for reference in ["E2", "E3"] {
        assert!(
            cells_before[reference].style.is_some(),
            "{:?}",
            cells_before[reference]
        );
        assert_eq!(
            cells_after[reference].style, cells_before[reference].style,
            "{reference} keeps its fill"
        );
        assert_eq!(cells_after[reference].kind.as_deref(), Some("inlineStr"));
        assert!(
            !cells_after[reference].xml.contains("<f"),
            "{:?}",
            cells_after[reference]
        );
    }
    assert_eq!(elements_after, elements_before);
    // The store keeps the value no sheet shows; the sheet's own extras are as they were.
    let deal = http
        .get(&format!("/api/v1/deals/{acme}"), Some(&manager.token))
        .assert_status(200)
        .json();
    assert_eq!(deal["extra"]["PO Number"], "PO-7", "{deal}");
    assert_eq!(deal["extra"]["Region"], "North", "{deal}");
    assert_eq!(deal["extra"]["Contract No"], "HT-2026-001", "{deal}");
}

#[test]
fn a_reps_edit_of_an_extra_the_api_changed_too_is_a_conflict() {
    let dir = TestDir::new();
    let path = dir.path("pipeline.xlsx");
    workbook_with_extra_columns(&path);
    let manager = dir.token("mia", "manager", None);
    let admin = dir.token("root", "admin", None);
    let port = dir.http_source("pipeline.xlsx", "", &[&manager, &admin]);
    dir.sync().assert_code(0);
    // `serve` watches no file: the syncs below are the command line's, one at a time.
    let (_served, http) = dir.start_serving(&["serve"], port);
    let globex = dir.deal_by("company", "Globex")["id"].as_i64().expect("id");
    // The rep types a contract number into the cell while the ERP sends another one, and changes
    // a region the API leaves alone.
    crate::harness::UserEdit::open(&path, "Pipeline")
        .set("Company", "Globex", "Contract No", "HT-REP")
        .set("Company", "Acme", "Region", "East")
        .save();
    http.json(
        "PATCH",
        &format!("/api/v1/deals/{globex}"),
        &manager.token,
        &json!({"extra": {"Contract No": "HT-API"}}),
    )
    .assert_status(200);
    let run = dir.sync();
    run.assert_code(0);
    let report = run.json();
    let file = crate::harness::file_report(&report, "pipeline.xlsx");
    assert_eq!(file["conflicts"], 1, "{file}");
    assert!(
        file["issues"]
            .as_array()
            .is_some_and(|issues| issues.iter().any(|issue| {
                issue["message"].as_str().is_some_and(|message| {
                    message.contains("extra.Contract No")
                        && message.contains("HT-REP")
                        && message.contains("HT-API")
                })
            })),
        "{file}"
    );
    assert_eq!(
        dir.query(
            "SELECT base_value, sheet_value, store_value, winner FROM conflicts WHERE field = 'extra.Contract No'"
        ),
        [[
            Some("HT-OLD".to_string()),
            Some("HT-REP".to_string()),
            Some("HT-API".to_string()),
            Some("store".to_string())
        ]]
    );
    // The store's policy (the default) keeps the API's value and the sheet is set to it; the
    // rep's one-sided change reaches the store.
    let sheet = read_xlsx(&path, "Pipeline");
    assert_eq!(sheet.column("Contract No"), ["", "HT-API"]);
    assert_eq!(sheet.column("Region"), ["East", "South"]);
    assert_eq!(
        dir.deal_by("company", "Globex")["extra"]["Contract No"],
        "HT-API"
    );
    assert_eq!(dir.deal_by("company", "Acme")["extra"]["Region"], "East");
    let conflicts = http
        .get("/api/v1/conflicts", Some(&admin.token))
        .assert_status(200)
        .json();
    assert!(
        conflicts.to_string().contains("extra.Contract No"),
        "{conflicts}"
    );
}

#[test]
fn a_user_who_may_not_see_stages_gets_the_funnel_totals_without_stages() {
    let team = Team::start("language = \"en\"");
    let http = &team.http;
    let open_stages = ["Lead", "Prospect", "Opportunity"];
    // (user, sees stages, sees amounts)
    let users = [
        (&team.admin, true, true),
        (&team.manager, true, true),
        (&team.alice, true, false),
        (&team.readonly, false, true),
    ];
    for (user, sees_stages, sees_amounts) in users {
        let reply = http
            .get("/api/v1/funnel", Some(&user.token))
            .assert_status(200)
            .clone();
        let funnel = reply.json();
        let totals = &funnel["totals"];
        // Alice sees her own two deals; everyone else all three.
        let n_open = if user.token == team.alice.token { 2 } else { 3 };
        assert_eq!(totals["open_count"], n_open, "{funnel}");
        if sees_amounts {
            assert!(
                totals["open_amount"]
                    .as_f64()
                    .is_some_and(|amount| amount > 0.0),
                "{funnel}"
            );
        } else {
            assert_eq!(totals["open_amount"], Value::Null, "{funnel}");
        }
        assert!(totals.get("lead_to_won_rate").is_some(), "{funnel}");
        let session = http.log_in(&user.token);
        let page = http.get_with("/funnel", None, &[("Cookie", &session)]);
        page.assert_status(200);
        assert!(page.body.contains("Open deals"), "{}", page.body);
        if sees_stages {
            assert_eq!(
                funnel["stages"].as_array().map(Vec::len),
                Some(3),
                "{funnel}"
            );
            for stage in open_stages {
                assert!(reply.body.contains(stage), "{stage}: {}", reply.body);
                assert!(page.body.contains(stage), "{stage}: {}", page.body);
            }
        } else {
            assert_eq!(
                funnel["stages"],
                json!([]),
                "no per-stage entries: {funnel}"
            );
            for line in funnel["forecast"]["deals"].as_array().expect("forecast") {
                assert_eq!(line["stage"], Value::Null, "{line}");
                assert_eq!(line["probability"], Value::Null, "{line}");
            }
            for stage in open_stages {
                assert!(!reply.body.contains(stage), "{stage}: {}", reply.body);
                assert!(!page.body.contains(stage), "{stage}: {}", page.body);
            }
            assert!(!page.body.contains("By stage"), "{}", page.body);
            assert!(page.body.contains("Win rate"), "{}", page.body);
        }
    }
}

#[test]
fn the_deal_list_filters_by_stage_alias_search_update_time_and_pages() {
    let team = Team::start("");
    let http = &team.http;
    let list = |query: &str, token: &str| {
        http.get(&format!("/api/v1/deals?{query}"), Some(token))
            .assert_status(200)
            .json()
    };
    let manager = team.manager.token.as_str();
    // A stage by its name or any alias, in any case.
    for stage in ["Opportunity", "proposal", "%E5%95%86%E6%9C%BA"] {
        assert_eq!(
            companies(&list(&format!("stage={stage}"), manager)),
            ["Initech"],
            "{stage}"
        );
    }
    // A search over the visible text fields, folded.
    assert_eq!(companies(&list("q=GLOBEX", manager)), ["Globex"]);
    assert_eq!(companies(&list("q=demo", manager)), ["Globex"], "next step");
    assert_eq!(
        companies(&list("q=alice%20wang", manager)),
        ["Acme", "Initech"],
        "owner"
    );
    // The rep searches her own deals only, and not by the amount she does not see.
    assert_eq!(
        companies(&list("q=globex", &team.alice.token)),
        Vec::<String>::new()
    );
    // Changed since: only the deal changed after the moment.
    let acme = team.id_of("Acme");
    crate::harness::next_millisecond();
    let moment = chrono::Utc::now()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        .replace('+', "%2B");
    crate::harness::next_millisecond();
    http.json(
        "PATCH",
        &format!("/api/v1/deals/{acme}"),
        manager,
        &json!({"next_step": "Send the offer"}),
    )
    .assert_status(200);
    assert_eq!(
        companies(&list(&format!("updated_since={moment}"), manager)),
        ["Acme"]
    );
    assert_eq!(
        companies(&list("updated_since=2000-01-01", manager)).len(),
        3
    );
    // Pages: disjoint, together the whole list, with the total.
    let mut seen = Vec::new();
    for offset in [0, 2, 4] {
        let page = list(&format!("limit=2&offset={offset}"), manager);
        assert_eq!(page["total"], 3, "{page}");
        assert_eq!(page["limit"], 2);
        assert_eq!(page["offset"], offset);
        let n = page["deals"].as_array().map(Vec::len).unwrap_or(0);
        assert_eq!(n, [2, 1, 0][offset / 2], "{page}");
        seen.extend(companies(&page));
    }
    seen.sort();
    assert_eq!(seen, ["Acme", "Globex", "Initech"]);
}

#[test]
fn the_files_page_shows_synced_deferred_and_failed_files_with_their_reasons() {
    let dir = TestDir::new();
    let admin = dir.token("root", "admin", None);
    let port = crate::harness::free_port();
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Company", "Email", "Stage"])
        .row(&["Acme", "ann@acme.example", "Lead"])
        .save(&dir.path("open.xlsx"));
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&["Company", "Email", "Stage"])
        .row(&["Globex", "gus@globex.example", "Lead"])
        .save(&dir.path("broken.xlsx"));
    std::fs::write(
        dir.path("fine.csv"),
        "Company,Email\nInitech,ivy@initech.example\n",
    )
    .expect("csv");
    dir.config(&format!(
        "[[sources]]\nname = \"open\"\npath = \"open.xlsx\"\n\n\
         [[sources]]\nname = \"broken\"\npath = \"broken.xlsx\"\n\n\
         [[sources]]\nname = \"fine\"\npath = \"fine.csv\"\n\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\nlanguage = \"en\"\n\n{}\n",
        admin.config_lines
    ));
    dir.sync().assert_code(0);
    // broken.xlsx is cut short while the daemon is down: it cannot be read.
    let bytes = std::fs::read(dir.path("broken.xlsx")).expect("read");
    std::fs::write(dir.path("broken.xlsx"), &bytes[..bytes.len() / 2]).expect("truncate");
    // A rep has open.xlsx open in Excel when the store changes: its write-back waits.
    std::fs::write(dir.path("~$open.xlsx"), "owner").expect("lock file");
    let (daemon, http) = dir.start_serving(&["run"], port);
    daemon.wait_ready();
    let acme = dir.deal_by("company", "Acme")["id"].to_string();
    dir.run(&["deals", "set", &acme, "stage=Prospect"])
        .assert_code(0);
    let session = http.log_in(&admin.token);
    let item = |name: &str| -> String {
        let page = http.get_with("/files", None, &[("Cookie", &session)]);
        page.assert_status(200);
        page.body
            .split("<li")
            .find(|item| item.contains(&format!("<div class=\"file-name\">{name}</div>")))
            .unwrap_or_else(|| panic!("no {name} in {}", page.body))
            .to_string()
    };
    wait_until(
        std::time::Duration::from_secs(20),
        "open.xlsx deferred on the files page",
        || item("open.xlsx").contains("<span class=\"badge\">deferred</span>"),
    );
    assert!(
        item("open.xlsx").contains("is open in Excel"),
        "{}",
        item("open.xlsx")
    );
    let broken = item("broken.xlsx");
    assert!(
        broken.contains("class=\"state-failed\"") || broken.contains("class=\"state-retrying\""),
        "{broken}"
    );
    assert!(broken.contains("not a complete workbook"), "{broken}");
    let fine = item("fine.csv");
    assert!(fine.contains("<span class=\"badge\">ok</span>"), "{fine}");
    // Once the file is closed, the write-back happens and the page no longer says deferred.
    std::fs::remove_file(dir.path("~$open.xlsx")).expect("close");
    wait_until(
        std::time::Duration::from_secs(20),
        "the stage written",
        || read_xlsx(&dir.path("open.xlsx"), "Pipeline").column("Stage") == ["Prospect"],
    );
    wait_until(
        std::time::Duration::from_secs(10),
        "open.xlsx no longer deferred",
        || !item("open.xlsx").contains("deferred"),
    );
}

#[test]
fn the_funnel_page_and_api_for_one_owner_show_the_numbers_of_the_command_line() {
    let team = Team::start("language = \"en\"");
    let http = &team.http;
    let query = "since=2026-01-01&until=2026-12-31&owner=Bob%20Li";
    let from_api = http
        .get(
            &format!("/api/v1/funnel?{query}"),
            Some(&team.manager.token),
        )
        .assert_status(200)
        .json();
    let run = team.dir.run(&[
        "funnel",
        "--since",
        "2026-01-01",
        "--until",
        "2026-12-31",
        "--owner",
        "Bob Li",
        "--format",
        "json",
    ]);
    run.assert_code(0);
    let from_cli = run.json();
    for key in [
        "period", "owner", "stages", "totals", "forecast", "by_owner",
    ] {
        assert_eq!(from_api[key], from_cli[key], "{key}");
    }
    assert_eq!(from_api["totals"]["open_count"], 1, "Bob's Globex only");
    // The page shows the same figures, stage by stage, with the owner picked.
    let session = http.log_in(&team.manager.token);
    let page = http.get_with(&format!("/funnel?{query}"), None, &[("Cookie", &session)]);
    page.assert_status(200);
    assert!(
        page.body
            .contains("<option value=\"Bob Li\" selected>Bob Li</option>"),
        "{}",
        page.body
    );
    for stage in from_api["stages"].as_array().expect("stages") {
        let name = stage["stage"].as_str().expect("name");
        let card = format!(
            "<h3>{name}</h3><dl><dt>Open deals</dt><dd>{}</dd><dt>Open amount</dt><dd>{}</dd>",
            stage["open_count"],
            thousands(stage["open_amount"].as_f64().unwrap_or(-1.0))
        );
        assert!(page.body.contains(&card), "{card} in {}", page.body);
    }
    assert!(
        page.body.contains(&format!(
            "<span class=\"label\">Open deals</span><span class=\"value\">{}</span>",
            from_api["totals"]["open_count"]
        )),
        "{}",
        page.body
    );
}

/// An amount as the pages show it: whole, with thousands separated by commas.
fn thousands(amount: f64) -> String {
    let digits = format!("{:.0}", amount.abs());
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if amount < 0.0 {
        format!("-{grouped}")
    } else {
        grouped
    }
}

#[test]
fn a_token_kept_in_a_token_file_logs_in_and_check_config_warns_when_others_may_read_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new();
    std::fs::write(dir.path("p.csv"), "Company,Email\nAcme,a@acme.example\n").expect("csv");
    // A fresh token, kept in a file of its own instead of as a hash in the config.
    let token = dir.token("erp", "readonly", None).token;
    let token_path = dir.path("erp.token");
    std::fs::write(&token_path, format!("{token}\n")).expect("token file");
    std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let port = crate::harness::free_port();
    dir.single_source(
        "p.csv",
        &format!(
            "\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n[[http.users]]\nname = \"erp\"\nrole = \"readonly\"\ntoken_file = \"erp.token\"\n"
        ),
    );
    let checked = dir.run(&["check-config"]);
    assert!(
        checked.stdout.contains("token_file") && checked.stdout.contains("chmod 600")
            || checked.stderr.contains("token_file") && checked.stderr.contains("chmod 600"),
        "{checked:?}"
    );
    std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let quiet = dir.run(&["check-config"]);
    quiet.assert_code(0);
    assert!(
        !format!("{}{}", quiet.stdout, quiet.stderr).contains("chmod 600"),
        "{quiet:?}"
    );
    dir.sync().assert_code(0);
    let (served, http) = dir.start_serving(&["serve"], port);
    let deals = http
        .get("/api/v1/deals", Some(&token))
        .assert_status(200)
        .json();
    assert_eq!(companies(&deals), ["Acme"]);
    http.get("/api/v1/deals", Some(&format!("{token}x")))
        .assert_status(401);
    assert!(!served.log().contains(&token), "the token reached the log");
}

#[test]
fn an_extra_set_through_the_api_reaches_a_csv_escaped_and_other_lines_stay() {
    let dir = TestDir::new();
    std::fs::write(
        dir.path("p.csv"),
        "Company,Email,Contract No,Region\nAcme,a@acme.example,,North\nGlobex,g@globex.example,HT-OLD,South\n",
    )
    .expect("csv");
    let manager = dir.token("mia", "manager", None);
    let port = dir.http_source("p.csv", "", &[&manager]);
    dir.sync().assert_code(0);
    let before = std::fs::read_to_string(dir.path("p.csv")).expect("read");
    let (_served, http) = dir.start_serving(&["serve"], port);
    let acme = dir.deal_by("company", "Acme")["id"].as_i64().expect("id");
    http.json(
        "PATCH",
        &format!("/api/v1/deals/{acme}"),
        &manager.token,
        &json!({"extra": {"Contract No": "=1+2", "PO Number": "PO-7"}}),
    )
    .assert_status(200);
    dir.sync().assert_code(0);
    let after = std::fs::read_to_string(dir.path("p.csv")).expect("read");
    let before_lines: Vec<&str> = before.lines().collect();
    let after_lines: Vec<&str> = after.lines().collect();
    assert_eq!(after_lines.len(), before_lines.len(), "{after}");
    assert_eq!(after_lines[0], before_lines[0], "no column added: {after}");
    assert_eq!(
        after_lines[1],
        before_lines[1].replace(",,North", ",'=1+2,North"),
        "the value is escaped, never a formula"
    );
    assert_eq!(after_lines[2], before_lines[2], "the other row stays");
    // Read back, it is the value the API set.
    assert_eq!(
        dir.deal_by("company", "Acme")["extra"]["Contract No"],
        "=1+2"
    );
    dir.sync().assert_code(0);
    assert_eq!(
        std::fs::read_to_string(dir.path("p.csv")).expect("read"),
        after,
        "a second sync changes nothing"
    );
}

#[test]
fn the_deals_page_pages_through_a_long_list_keeping_its_search() {
    let dir = TestDir::new();
    let mut csv = String::from("Company,Email\nOther Co,o@other.example\n");
    for n in 1..=205 {
        csv.push_str(&format!("Firm {n:03},f{n}@firm.example\n"));
    }
    std::fs::write(dir.path("p.csv"), csv).expect("csv");
    let manager = dir.token("mia", "manager", None);
    let port = dir.http_source("p.csv", "language = \"en\"", &[&manager]);
    dir.sync().assert_code(0);
    let (_served, http) = dir.start_serving(&["serve"], port);
    let session = http.log_in(&manager.token);
    let firms = |body: &str| -> Vec<String> {
        body.split("<span class=\"company\">")
            .skip(1)
            .filter_map(|rest| rest.split('<').next())
            .map(str::to_string)
            .collect()
    };
    let first = http.get_with("/deals?q=firm%20", None, &[("Cookie", &session)]);
    first.assert_status(200);
    assert!(first.body.contains("205 deal(s)"), "{}", first.body);
    let mut seen = firms(&first.body);
    assert_eq!(seen.len(), 200);
    let next = first
        .body
        .split("rel=\"next\" href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("a link to the next page in {}", first.body))
        .replace("&amp;", "&");
    assert_eq!(next, "/deals?q=firm%20&offset=200", "the search is kept");
    let second = http.get_with(&next, None, &[("Cookie", &session)]);
    second.assert_status(200);
    let rest = firms(&second.body);
    assert_eq!(rest.len(), 5, "{}", second.body);
    assert!(second.body.contains("rel=\"prev\""), "{}", second.body);
    assert!(!second.body.contains("rel=\"next\""), "{}", second.body);
    seen.extend(rest);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 205, "every firm once, and no other company");
    assert!(seen.iter().all(|company| company.starts_with("Firm ")));
    // A list that fits one page has no pager.
    let short = http.get_with("/deals?q=other", None, &[("Cookie", &session)]);
    assert!(!short.body.contains("class=\"pager\""), "{}", short.body);
}
