//! Several offices, one CRM: a daemon per office share, each with its own site name, on one
//! PostgreSQL store. An edit in one office's file reaches the other office's master file; edits
//! through both daemons and the command line at once arrive exactly once; a rep gets one digest
//! per due time however many daemons run; killing one daemon mid-sync loses nothing and the other
//! goes on.
//!
//! These scenarios need a PostgreSQL server: they run on the PostgreSQL pass of `tests/run`, and
//! on the SQLite pass say so and end.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::harness::{
    deal_sheet, on_postgres, read_xlsx, wait_until, SmtpServer, TestDir, UserEdit,
};

/// Whether this is the PostgreSQL pass; on the SQLite pass the scenario says why it ends.
fn shared_store_available(test_name: &str) -> bool {
    if !on_postgres() {
        eprintln!(
            "{test_name}: needs a PostgreSQL store; runs on the PostgreSQL pass of tests/run"
        );
    }
    on_postgres()
}

/// The watch settings of both offices' daemons: quick to settle, polling as a safety net.
const WATCH: &str = "[watch]\nsettle = \"100ms\"\npoll_interval = \"300ms\"\n";

/// Shanghai (the manager's master file of every deal) and Beijing (Bob's file of his own deals),
/// each with its share, config and daemon log, on one store.
fn two_offices(beijing_rows: &[[&str; 6]]) -> (TestDir, TestDir) {
    let shanghai = TestDir::for_site("shanghai");
    let beijing = TestDir::joining(&shanghai, "beijing");
    for office in [&shanghai, &beijing] {
        std::fs::create_dir_all(office.path("share")).expect("share");
    }
    deal_sheet(&[]).save(&shanghai.path("share/master.xlsx"));
    shanghai.config(&format!(
        "{WATCH}\n[[sources]]\nname = \"master\"\npath = \"share/master.xlsx\"\nview = \"all\"\n"
    ));
    deal_sheet(beijing_rows).save(&beijing.path("share/bob.xlsx"));
    beijing.config(&format!(
        "{WATCH}\n[[sources]]\nname = \"beijing\"\npath = \"share/bob.xlsx\"\nfilter = {{ owner = \"Bob\" }}\n"
    ));
    (shanghai, beijing)
}

/// A rep's edit the way Excel makes it: the file is opened (Excel's `~$` owner file appears, and
/// funnelsync holds its write-backs to the file from then on), edited over a moment, saved, and
/// closed. An edit made without the owner file, against a write-back landing between the read
/// and the save, would save stale cells over the written ones: a change of the rep's as far as
/// anyone can tell.
fn edit_in_excel(path: &std::path::Path, edit: impl FnOnce(UserEdit) -> UserEdit) {
    let name = path
        .file_name()
        .and_then(|name| name.to_str())
        .expect("file name");
    let owner_file = path.with_file_name(format!("~${}", &name[2..]));
    std::fs::write(&owner_file, b"rep").expect("owner file");
    // A write-back that began before the file was opened ends first.
    std::thread::sleep(Duration::from_millis(300));
    edit(UserEdit::open(path, "Pipeline")).save();
    std::fs::remove_file(&owner_file).expect("close the file");
}

fn companies_in(path: &std::path::Path) -> Vec<String> {
    read_xlsx(path, "Pipeline").column("Company")
}

#[test]
fn an_edit_in_one_office_reaches_the_other_offices_master_file() {
    if !shared_store_available("an_edit_in_one_office_reaches_the_other_offices_master_file") {
        return;
    }
    let (shanghai, beijing) = two_offices(&[
        ["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Bob"],
        ["Beta", "Ben", "ben@beta.com", "Lead", "2000", "Bob"],
    ]);
    let shanghai_daemon = shanghai.start_daemon();
    shanghai_daemon.wait_ready();
    let beijing_daemon = beijing.start_daemon();
    beijing_daemon.wait_ready();
    let master = shanghai.path("share/master.xlsx");
    wait_until(
        Duration::from_secs(15),
        "Beijing's deals in Shanghai's master file",
        || {
            let companies = companies_in(&master);
            companies.contains(&"Acme".to_string()) && companies.contains(&"Beta".to_string())
        },
    );

    // Bob moves Acme on and adds a row in Beijing; the master file in Shanghai follows.
    UserEdit::open(&beijing.path("share/bob.xlsx"), "Pipeline")
        .set("Company", "Acme", "Stage", "Opportunity")
        .add_row(&["Gamma", "Gus", "gus@gamma.com", "Lead", "700", "Bob"])
        .save();
    wait_until(
        Duration::from_secs(15),
        "the Beijing edit in Shanghai's master file",
        || {
            let sheet = read_xlsx(&master, "Pipeline");
            let companies = sheet.column("Company");
            let stages = sheet.column("Stage");
            companies
                .iter()
                .zip(&stages)
                .any(|(company, stage)| company == "Acme" && stage == "Opportunity")
                && companies.contains(&"Gamma".to_string())
        },
    );
    // It came by notification: the Shanghai daemon listens for the store's changes.
    assert!(
        shanghai_daemon
            .log()
            .contains("listening for the store's changes"),
        "{}",
        shanghai_daemon.log()
    );

    // The connections that listen are cut (a database restart, a network blip): the daemons
    // poll the change counter meanwhile, an edit still arrives, and they listen again.
    shanghai.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    );
    wait_until(Duration::from_secs(15), "the daemon to notice", || {
        shanghai_daemon
            .log()
            .contains("the store's notifications stopped; polling the change counter")
    });
    UserEdit::open(&beijing.path("share/bob.xlsx"), "Pipeline")
        .set("Company", "Gamma", "Amount", "777")
        .save();
    wait_until(
        Duration::from_secs(15),
        "the edit made while nobody listened in the master file",
        || {
            let sheet = read_xlsx(&master, "Pipeline");
            sheet
                .column("Company")
                .iter()
                .zip(sheet.column("Amount"))
                .any(|(company, amount)| company == "Gamma" && amount == "777")
        },
    );
    wait_until(
        Duration::from_secs(15),
        "the daemon to listen again",
        || shanghai_daemon.log_count("listening for the store's changes") >= 2,
    );

    // And back: the manager hands Beta to Carol in the master file; it leaves Bob's file in
    // Beijing, and is not archived.
    UserEdit::open(&master, "Pipeline")
        .set("Company", "Beta", "Owner", "Carol")
        .save();
    wait_until(
        Duration::from_secs(15),
        "Beta to leave Bob's file in Beijing",
        || !companies_in(&beijing.path("share/bob.xlsx")).contains(&"Beta".to_string()),
    );
    let beta = shanghai.deal_by("company", "Beta");
    assert_eq!(beta["owner"], "Carol");
    assert!(beta["archived_at"].is_null());

    // Each daemon's file state and mirror are its own site's.
    let sites: HashSet<String> = shanghai
        .query("SELECT DISTINCT site FROM mirror_files")
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .collect();
    assert_eq!(
        sites,
        HashSet::from(["shanghai".to_string(), "beijing".to_string()])
    );
    // The admin's views show the whole store, whichever office's config they run with: every
    // site's files, each with its site (a reporting host runs with a config of its own).
    let status = beijing.run(&["status", "--format", "json"]).json();
    let files: HashSet<(String, String)> = status
        .as_array()
        .expect("status array")
        .iter()
        .map(|file| {
            let name = file["file"].as_str().unwrap_or("");
            let name = name.rsplit('/').next().unwrap_or(name);
            (
                file["site"].as_str().unwrap_or("").to_string(),
                name.to_string(),
            )
        })
        .collect();
    assert_eq!(
        files,
        HashSet::from([
            ("shanghai".to_string(), "master.xlsx".to_string()),
            ("beijing".to_string(), "bob.xlsx".to_string()),
        ]),
        "{status}"
    );
    let table = beijing.run(&["status"]);
    table.assert_code(0);
    let header = table.stdout.lines().next().unwrap_or("");
    assert!(header.starts_with("site"), "{}", table.stdout);
    assert!(
        table
            .stdout
            .lines()
            .any(|line| line.starts_with("shanghai") && line.contains("master.xlsx")),
        "{}",
        table.stdout
    );
    // A row error in Shanghai's file shows in `errors` run with Beijing's config, named by site.
    UserEdit::open(&master, "Pipeline")
        .add_row(&["Zeta", "Zed", "not an address", "Lead", "abc", "Carol"])
        .save();
    wait_until(
        Duration::from_secs(15),
        "Shanghai's row error in `errors`",
        || {
            let errors = beijing.run(&["errors", "--format", "json"]).json();
            errors.as_array().is_some_and(|issues| {
                issues.iter().any(|issue| {
                    issue["site"] == "shanghai"
                        && issue["file"]
                            .as_str()
                            .is_some_and(|file| file.ends_with("master.xlsx"))
                })
            })
        },
    );
    let errors = beijing.run(&["errors"]);
    assert!(
        errors.stdout.contains("site \"shanghai\""),
        "{}",
        errors.stdout
    );
}

/// The notifications heard on the change channel: those that come within `wait`, and whatever
/// follows them closely; as the change counters they carry.
fn heard(listener: &mut postgres::Client, wait: Duration) -> Vec<i64> {
    use postgres::fallible_iterator::FallibleIterator;
    let mut versions = Vec::new();
    let mut notifications = listener.notifications();
    let mut next = notifications
        .timeout_iter(wait)
        .next()
        .expect("the listening connection");
    while let Some(notification) = next {
        assert_eq!(notification.channel(), "funnelsync_changes");
        versions.push(
            notification
                .payload()
                .parse()
                .unwrap_or_else(|_| panic!("a change counter: {:?}", notification.payload())),
        );
        next = notifications
            .timeout_iter(Duration::from_millis(300))
            .next()
            .expect("the listening connection");
    }
    versions
}

#[test]
fn the_store_itself_announces_every_committed_change_on_the_change_channel() {
    if !shared_store_available(
        "the_store_itself_announces_every_committed_change_on_the_change_channel",
    ) {
        return;
    }
    let test = TestDir::new();
    deal_sheet(&[["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Bob"]])
        .save(&test.path("p.xlsx"));
    test.single_source("p.xlsx", "");
    test.sync().assert_code(0);
    let url = test.store_url().expect("the scenario's database");
    let mut listener = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    listener
        .batch_execute("LISTEN funnelsync_changes")
        .expect("listen");
    let version = || test.count("SELECT version FROM store_meta WHERE id = 1");

    // A command-line edit: one notification, with the counter it committed.
    let acme = test.deal_by("company", "Acme")["id"].to_string();
    test.run(&["deals", "set", &acme, "amount=1500"])
        .assert_code(0);
    assert_eq!(
        heard(&mut listener, Duration::from_secs(5)),
        vec![version()]
    );

    // A transaction that moves the counter and rolls back announces nothing.
    let mut writer = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    writer
        .batch_execute("BEGIN; UPDATE store_meta SET version = version + 1 WHERE id = 1; ROLLBACK")
        .expect("a rolled-back change");
    assert_eq!(
        heard(&mut listener, Duration::from_millis(500)),
        Vec::<i64>::new()
    );

    // Any writer that moves the counter is announced at its commit, not only funnelsync's code:
    // an admin's fix made in SQL reaches the daemons like an edit.
    writer
        .batch_execute(
            "BEGIN; \
             UPDATE store_meta SET version = version + 1 WHERE id = 1; \
             UPDATE deals SET amount = 1600, changed_version = (SELECT version FROM store_meta) \
             WHERE company = 'Acme'; \
             COMMIT",
        )
        .expect("an admin's change");
    assert_eq!(
        heard(&mut listener, Duration::from_secs(5)),
        vec![version()]
    );
    // Statements that leave the counter where it was announce nothing.
    writer
        .batch_execute("UPDATE store_meta SET version = version WHERE id = 1")
        .expect("a no-op");
    assert_eq!(
        heard(&mut listener, Duration::from_millis(500)),
        Vec::<i64>::new()
    );
}

#[test]
fn concurrent_edits_through_both_offices_and_the_command_line_arrive_exactly_once() {
    if !shared_store_available(
        "concurrent_edits_through_both_offices_and_the_command_line_arrive_exactly_once",
    ) {
        return;
    }
    let rows: Vec<[String; 6]> = (0..20)
        .map(|index| {
            [
                format!("Deal {index}"),
                format!("Contact {index}"),
                format!("c{index}@example.com"),
                "Lead".to_string(),
                "100".to_string(),
                "Bob".to_string(),
            ]
        })
        .collect();
    let row_refs: Vec<[&str; 6]> = rows
        .iter()
        .map(|row| {
            [
                row[0].as_str(),
                row[1].as_str(),
                row[2].as_str(),
                row[3].as_str(),
                row[4].as_str(),
                row[5].as_str(),
            ]
        })
        .collect();
    let (shanghai, beijing) = two_offices(&row_refs);
    let shanghai_daemon = shanghai.start_daemon();
    shanghai_daemon.wait_ready();
    let beijing_daemon = beijing.start_daemon();
    beijing_daemon.wait_ready();
    wait_until(Duration::from_secs(20), "the 20 deals", || {
        shanghai.count("SELECT count(*) FROM deals") == 20
    });
    let ids: Vec<String> = shanghai
        .deals()
        .iter()
        .map(|deal| deal["id"].to_string())
        .collect();

    // 200 `deals set` from eight command lines at once (each deal's amount set ten times, the
    // last value known), while reps add rows in both offices' files.
    let expected_amounts: HashMap<String, String> = ids
        .iter()
        .enumerate()
        .map(|(index, id)| (id.clone(), format!("{}", 9000 + index)))
        .collect();
    let commands: Vec<(String, String)> = (0..200)
        .map(|index| {
            let id = ids[index % ids.len()].clone();
            let round = index / ids.len();
            let amount = if round == 9 {
                expected_amounts[&id].clone()
            } else {
                format!("{}", 1000 + index)
            };
            (id, amount)
        })
        .collect();
    let failures = std::sync::Mutex::new(Vec::new());
    // A deal's ten sets go out in order (one worker per group of deals), the groups at once.
    let per_deal: Vec<Vec<(String, String)>> = {
        let mut by_deal: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for (id, amount) in commands {
            by_deal.entry(id.clone()).or_default().push((id, amount));
        }
        by_deal.into_values().collect()
    };
    std::thread::scope(|scope| {
        for (worker, chunk) in per_deal.chunks(per_deal.len().div_ceil(8)).enumerate() {
            // Half the command lines run with Shanghai's config, half with Beijing's.
            let office = if worker % 2 == 0 { &shanghai } else { &beijing };
            let failures = &failures;
            scope.spawn(move || {
                for sets in chunk {
                    for (id, amount) in sets {
                        let run = office.run(&["deals", "set", id, &format!("amount={amount}")]);
                        if run.code != 0 {
                            failures
                                .lock()
                                .expect("failures")
                                .push(format!("deals set {id} amount={amount}: {}", run.stderr));
                        }
                    }
                }
            });
        }
        scope.spawn(|| {
            for round in 0..5 {
                edit_in_excel(&beijing.path("share/bob.xlsx"), |edit| {
                    edit.add_row(&[
                        &format!("Beijing new {round}"),
                        "N",
                        &format!("bj{round}@example.com"),
                        "Lead",
                        "50",
                        "Bob",
                    ])
                });
                std::thread::sleep(Duration::from_millis(150));
                edit_in_excel(&shanghai.path("share/master.xlsx"), |edit| {
                    edit.add_row(&[
                        &format!("Shanghai new {round}"),
                        "S",
                        &format!("sh{round}@example.com"),
                        "Lead",
                        "60",
                        "Carol",
                    ])
                });
                std::thread::sleep(Duration::from_millis(150));
            }
        });
    });
    let failures = failures.into_inner().expect("failures");
    assert!(failures.is_empty(), "{failures:#?}");

    // Every added row arrives, once; every deal ends at its last amount.
    let n_expected: usize = 20 + 10;
    wait_until(
        Duration::from_secs(30),
        "every added row in the store",
        || shanghai.count("SELECT count(*) FROM deals") >= n_expected as i64,
    );
    for round in 0..5 {
        for company in [
            format!("Beijing new {round}"),
            format!("Shanghai new {round}"),
        ] {
            assert_eq!(
                shanghai.count(&format!(
                    "SELECT count(*) FROM deals WHERE company = '{company}'"
                )),
                1,
                "{company} exactly once\nShanghai:\n{}\nBeijing:\n{}",
                shanghai_daemon.log(),
                beijing_daemon.log()
            );
        }
    }
    assert_eq!(
        shanghai.count("SELECT count(*) FROM deals"),
        n_expected as i64
    );
    let amounts: HashMap<String, String> = shanghai
        .deals()
        .iter()
        .map(|deal| (deal["id"].to_string(), deal["amount"].to_string()))
        .collect();
    for (id, amount) in &expected_amounts {
        assert_eq!(
            amounts[id].trim_end_matches(".0"),
            amount,
            "deal {id} ends at its last amount"
        );
    }
    assert_eq!(
        shanghai.count(
            "SELECT count(*) FROM changes c JOIN sync_runs r ON r.id = c.run_id \
             WHERE r.source = 'cli' AND c.field = 'amount'"
        ),
        200,
        "each of the 200 sets is recorded once"
    );

    // Both files come to show the store: the master every deal with its amount, Bob's file his.
    let shown_amounts = |path: &std::path::Path| -> HashMap<String, String> {
        let sheet = read_xlsx(path, "Pipeline");
        sheet
            .column("CRM ID")
            .into_iter()
            .zip(sheet.column("Amount"))
            .collect()
    };
    let files_show_the_store = || {
        let master = shown_amounts(&shanghai.path("share/master.xlsx"));
        let bob = shown_amounts(&beijing.path("share/bob.xlsx"));
        master.len() == n_expected
            && expected_amounts
                .iter()
                .all(|(id, amount)| master.get(id) == Some(amount) && bob.get(id) == Some(amount))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !files_show_the_store() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        files_show_the_store(),
        "both files show the final amounts\nexpected {expected_amounts:?}\nmaster {:?}\nbob {:?}\nShanghai:\n{}\nBeijing:\n{}",
        shown_amounts(&shanghai.path("share/master.xlsx")),
        shown_amounts(&beijing.path("share/bob.xlsx")),
        shanghai_daemon.log(),
        beijing_daemon.log()
    );
}

#[test]
fn a_rep_gets_one_digest_per_due_time_however_many_daemons_run() {
    if !shared_store_available("a_rep_gets_one_digest_per_due_time_however_many_daemons_run") {
        return;
    }
    let smtp = SmtpServer::start(0);
    let (shanghai, beijing) = two_offices(&[
        ["Acme", "Ann", "ann@acme.com", "Prospect", "1000", "Bob"],
        ["Beta", "Ben", "ben@beta.com", "Lead", "2000", "Bob"],
    ]);
    beijing.sync().assert_code(0);
    // Make the open deals old, in the shared store.
    shanghai.execute("UPDATE deals SET stage_entered_at = '2026-01-05T00:00:00.000Z'");
    let due = chrono::Utc::now() + chrono::Duration::seconds(8);
    let remind = format!(
        "\n[remind]\nat = \"{}\"\ntimezone = \"UTC\"\nweekdays_only = false\nmanager = \"lead@example.com\"\n\n[reps]\nBob = \"bob@example.com\"\n\n[smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"Funnel Sync <funnelsync@example.com>\"\n",
        due.format("%H:%M:%S"),
        smtp.port
    );
    for office in [&shanghai, &beijing] {
        let config = std::fs::read_to_string(office.config_path()).expect("config");
        std::fs::write(office.config_path(), format!("{config}{remind}")).expect("config");
    }
    let shanghai_daemon = shanghai.start_daemon();
    let beijing_daemon = beijing.start_daemon();
    shanghai_daemon.wait_ready();
    beijing_daemon.wait_ready();
    wait_until(Duration::from_secs(20), "Bob's digest", || {
        !smtp.to("bob@example.com").is_empty()
    });
    // Both daemons had their chance at the due time, and a while more.
    wait_until(
        Duration::from_secs(20),
        "both daemons past the due time",
        || {
            [&shanghai_daemon, &beijing_daemon].iter().all(|daemon| {
                daemon.log().contains("reminder run") || daemon.log().contains("done by another")
            })
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let n_done_by_the_other = [&shanghai_daemon, &beijing_daemon]
        .iter()
        .filter(|daemon| daemon.log().contains("was done by another daemon"))
        .count();
    assert_eq!(
        n_done_by_the_other,
        1,
        "one daemon ran the reminders, the other found them done\nShanghai:\n{}\nBeijing:\n{}",
        shanghai_daemon.log(),
        beijing_daemon.log()
    );
    assert_eq!(
        smtp.to("bob@example.com").len(),
        1,
        "one digest for Bob, not one per daemon\nShanghai:\n{}\nBeijing:\n{}",
        shanghai_daemon.log(),
        beijing_daemon.log()
    );
}

#[test]
fn killing_one_office_daemon_mid_sync_loses_nothing_and_the_other_goes_on() {
    if !shared_store_available(
        "killing_one_office_daemon_mid_sync_loses_nothing_and_the_other_goes_on",
    ) {
        return;
    }
    let (shanghai, beijing) =
        two_offices(&[["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Bob"]]);
    let shanghai_daemon = shanghai.start_daemon();
    shanghai_daemon.wait_ready();
    let mut beijing_daemon = beijing.start_daemon();
    beijing_daemon.wait_ready();

    // A big save in Beijing; its daemon is killed as soon as the store transaction begins.
    let mut edit = UserEdit::open(&beijing.path("share/bob.xlsx"), "Pipeline");
    for index in 0..2000 {
        edit = edit.add_row(&[
            &format!("Bulk {index}"),
            "B",
            &format!("bulk{index}@example.com"),
            "Lead",
            "10",
            "Bob",
        ]);
    }
    edit.save();
    wait_until(
        Duration::from_secs(30),
        "the Beijing sync's transaction",
        || beijing_daemon.log().contains("phase=\"transaction\""),
    );
    beijing_daemon.child.kill().expect("SIGKILL");
    let _ = beijing_daemon.child.wait();

    // Shanghai goes on: an edit in the master file is synced while Beijing is down.
    UserEdit::open(&shanghai.path("share/master.xlsx"), "Pipeline")
        .set("Company", "Acme", "Stage", "Prospect")
        .save();
    wait_until(
        Duration::from_secs(15),
        "Shanghai's edit in the store",
        || shanghai.deal_by("company", "Acme")["stage"] == "Prospect",
    );

    // Beijing comes back: its save arrives whole, once, and reaches the master file.
    let beijing_daemon = beijing.start_daemon();
    beijing_daemon.wait_ready_within(Duration::from_secs(60));
    wait_until(
        Duration::from_secs(60),
        "the bulk rows in the store",
        || shanghai.count("SELECT count(*) FROM deals WHERE company LIKE 'Bulk %'") == 2000,
    );
    assert_eq!(
        shanghai.count("SELECT count(DISTINCT company) FROM deals WHERE company LIKE 'Bulk %'"),
        2000
    );
    wait_until(
        Duration::from_secs(60),
        "the bulk rows in Shanghai's master file",
        || {
            companies_in(&shanghai.path("share/master.xlsx"))
                .iter()
                .filter(|company| company.starts_with("Bulk "))
                .count()
                == 2000
        },
    );
    assert_eq!(shanghai.deal_by("company", "Acme")["stage"], "Prospect");
}

/// Runs the binary with another config of the same scenario.
fn run_with(test: &TestDir, config: &str, args: &[&str]) -> crate::harness::Run {
    test.run_with_config(&test.path(config), args)
}

#[test]
fn store_copy_moves_a_sqlite_store_to_postgresql_and_every_command_answers_the_same() {
    if !shared_store_available(
        "store_copy_moves_a_sqlite_store_to_postgresql_and_every_command_answers_the_same",
    ) {
        return;
    }
    // A team on SQLite with some history: a sync, command-line edits, an undo, a removal, and
    // reminder mail the server has not taken yet (pending in the outbox).
    let smtp = SmtpServer::start(1000);
    let test = TestDir::new();
    let url = test.store_url().expect("the scenario's database");
    deal_sheet(&[
        ["Acme", "Ann", "ann@acme.com", "Prospect", "1000", "Alice"],
        ["Beta", "Ben", "ben@beta.com", "Lead", "2000", "Bob"],
        [
            "Gamma",
            "Gus",
            "gus@gamma.com",
            "Opportunity",
            "3000",
            "Alice",
        ],
        ["Delta", "Dan", "dan@delta.com", "Lead", "400", "Bob"],
    ])
    .save(&test.path("p.xlsx"));
    let rest = format!(
        "\n[[sources]]\nname = \"pipeline\"\npath = \"p.xlsx\"\n\n[remind]\nat = \"09:00\"\ntimezone = \"UTC\"\n\n[reps]\nAlice = \"alice@example.com\"\nBob = \"bob@example.com\"\n\n[smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"Funnel Sync <funnelsync@example.com>\"\n",
        smtp.port
    );
    std::fs::write(
        test.path("sqlite.toml"),
        format!("[store]\npath = \"state/crm.db\"\n{rest}"),
    )
    .expect("config");
    run_with(&test, "sqlite.toml", &["sync"]).assert_code(0);
    let acme = run_with(&test, "sqlite.toml", &["deals", "list", "--format", "json"]).json()[0]
        ["id"]
        .to_string();
    run_with(
        &test,
        "sqlite.toml",
        &["deals", "set", &acme, "amount=1500"],
    )
    .assert_code(0);
    run_with(
        &test,
        "sqlite.toml",
        &["deals", "move", &acme, "Opportunity"],
    )
    .assert_code(0);
    let history = run_with(&test, "sqlite.toml", &["history", "--format", "json"]).json();
    let move_run = history[0]["id"].to_string();
    run_with(&test, "sqlite.toml", &["undo", &move_run]).assert_code(0);
    UserEdit::open(&test.path("p.xlsx"), "Pipeline")
        .set("Company", "Beta", "Stage", "Won")
        .save();
    run_with(&test, "sqlite.toml", &["sync"]).assert_code(0);
    let later = (chrono::Utc::now() + chrono::Duration::days(40)).to_rfc3339();
    // The server refuses for now: the digests stay pending.
    run_with(&test, "sqlite.toml", &["--now", &later, "remind"]).assert_code(1);

    // The copy: it checks what it copied and says which lines to change.
    let copy = run_with(&test, "sqlite.toml", &["store", "copy", "--to", &url]);
    copy.assert_code(0);
    assert!(copy.stdout.contains("and checked"), "{}", copy.stdout);
    assert!(
        copy.stdout.contains(&format!("url = \"{url}\"")),
        "{}",
        copy.stdout
    );
    // Into a database that is not empty it refuses.
    let again = run_with(&test, "sqlite.toml", &["store", "copy", "--to", &url]);
    assert_ne!(again.code, 0, "{}", again.stdout);
    assert!(
        again.stderr.contains("already holds a store") && again.stderr.contains("empty database"),
        "{}",
        again.stderr
    );

    std::fs::write(
        test.path("postgres.toml"),
        format!("[store]\nurl = \"{url}\"\n{rest}"),
    )
    .expect("config");
    let since = (chrono::Utc::now() - chrono::Duration::days(30))
        .format("%Y-%m-%d")
        .to_string();
    let until = chrono::Utc::now().format("%Y-%m-%d").to_string();
    for args in [
        vec!["deals", "list", "--include-archived", "--format", "json"],
        vec!["history", "--format", "json"],
        vec!["history", &move_run, "--format", "json"],
        vec!["conflicts", "--format", "json"],
        vec![
            "funnel", "--since", &since, "--until", &until, "--format", "json",
        ],
    ] {
        let on_sqlite = run_with(&test, "sqlite.toml", &args);
        let on_postgres = run_with(&test, "postgres.toml", &args);
        on_postgres.assert_code(on_sqlite.code);
        assert_eq!(
            on_postgres.json(),
            on_sqlite.json(),
            "{args:?} answers the same on PostgreSQL"
        );
    }
    assert!(test.count("SELECT count(*) FROM outbox WHERE status = 'pending'") > 0);
    // The mirror came along: the file is known, nothing to create or change.
    let sync = run_with(&test, "postgres.toml", &["sync", "--format", "json"]).json();
    let counts = &sync["files"][0]["counts"];
    assert_eq!(counts["created"], 0, "{sync}");
    assert_eq!(counts["updated"], 0, "{sync}");
}

/// Ends every connection to the scenario's database but the one asking: a database restart, or
/// an admin cleaning up, as far as the daemon can tell.
const TERMINATE_EVERY_BACKEND: &str = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
     WHERE datname = current_database() AND pid <> pg_backend_pid()";

/// The advisory-lock key of a store-wide claim, as funnelsync computes it.
fn claim_key(name: &str) -> i64 {
    let digest = xxhash_rust::xxh3::xxh3_64(format!("funnelsync:{name}").as_bytes());
    i64::from_ne_bytes(digest.to_ne_bytes())
}

#[test]
fn a_daemon_whose_connections_are_all_cut_connects_again_and_keeps_syncing() {
    if !shared_store_available(
        "a_daemon_whose_connections_are_all_cut_connects_again_and_keeps_syncing",
    ) {
        return;
    }
    let (shanghai, beijing) =
        two_offices(&[["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Bob"]]);
    let shanghai_daemon = shanghai.start_daemon();
    shanghai_daemon.wait_ready();
    let beijing_daemon = beijing.start_daemon();
    beijing_daemon.wait_ready();
    let bob = beijing.path("share/bob.xlsx");
    wait_until(Duration::from_secs(15), "Acme in the store", || {
        shanghai.count("SELECT count(*) FROM deals WHERE company = 'Acme'") == 1
    });

    let cut_at = chrono::Utc::now();
    shanghai.execute(TERMINATE_EVERY_BACKEND);
    wait_until(
        Duration::from_secs(15),
        "Beijing's daemon to connect again",
        || {
            beijing_daemon
                .log()
                .contains("connected to the store again; the site is claimed again")
        },
    );
    assert_eq!(
        beijing_daemon.log_count("lost the daemon's connection to the store"),
        1,
        "the loss is logged once\n{}",
        beijing_daemon.log()
    );

    // An edit in Beijing's share still reaches the store, and a change in the store still
    // reaches Beijing's file.
    UserEdit::open(&bob, "Pipeline")
        .set("Company", "Acme", "Amount", "1234")
        .save();
    wait_until(Duration::from_secs(15), "the edit in the store", || {
        shanghai.deal_by("company", "Acme")["amount"]
            .to_string()
            .trim_end_matches(".0")
            == "1234"
    });
    let acme = shanghai.deal_by("company", "Acme")["id"].to_string();
    shanghai
        .run(&["deals", "set", &acme, "stage=Prospect"])
        .assert_code(0);
    wait_until(
        Duration::from_secs(15),
        "the store's change in Bob's file",
        || read_xlsx(&bob, "Pipeline").column("Stage") == vec!["Prospect".to_string()],
    );

    // `status` answers, and shows the file's state as recorded after the cut.
    let status = beijing.run(&["status", "--format", "json"]);
    status.assert_code(0);
    let files = status.json();
    let bob_status = files
        .as_array()
        .expect("status array")
        .iter()
        .find(|file| {
            file["file"]
                .as_str()
                .is_some_and(|file| file.ends_with("bob.xlsx"))
        })
        .cloned()
        .unwrap_or_else(|| panic!("bob.xlsx in the status: {files}"));
    let checked_at: chrono::DateTime<chrono::Utc> = bob_status["last_checked_at"]
        .as_str()
        .and_then(|at| at.parse().ok())
        .unwrap_or_else(|| panic!("a time: {bob_status}"));
    assert!(checked_at > cut_at, "{bob_status}");
}

#[test]
fn a_daemon_whose_site_was_taken_while_it_was_cut_off_stops() {
    if !shared_store_available("a_daemon_whose_site_was_taken_while_it_was_cut_off_stops") {
        return;
    }
    let shanghai = TestDir::for_site("shanghai");
    std::fs::create_dir_all(shanghai.path("share")).expect("share");
    deal_sheet(&[]).save(&shanghai.path("share/master.xlsx"));
    shanghai.config(&format!(
        "{WATCH}\n[[sources]]\nname = \"master\"\npath = \"share/master.xlsx\"\nview = \"all\"\n"
    ));
    let mut daemon = shanghai.start_daemon();
    daemon.wait_ready();
    // Another process takes the site the moment the daemon's connections are cut.
    let url = shanghai.store_url().expect("the scenario's database");
    let mut other = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    other
        .batch_execute(&format!(
            "{TERMINATE_EVERY_BACKEND}; SELECT pg_advisory_lock({})",
            claim_key("site:shanghai")
        ))
        .expect("take the site");
    let code = daemon.wait_exit(Duration::from_secs(20));
    assert!(
        code.is_some_and(|code| code != 0),
        "the daemon stops with an error ({code:?})\n{}",
        daemon.log()
    );
    assert!(
        daemon
            .log()
            .contains("another daemon claimed this site meanwhile"),
        "{}",
        daemon.log()
    );
    drop(other);
}

/// An amount as the store's history and conflicts write it, without a trailing `.0`.
fn amount_text(value: &str) -> String {
    value.trim_end_matches(".0").to_string()
}

#[test]
fn sheet_edits_and_command_lines_of_both_offices_on_one_deal_lose_no_update() {
    if !shared_store_available(
        "sheet_edits_and_command_lines_of_both_offices_on_one_deal_lose_no_update",
    ) {
        return;
    }
    let (shanghai, beijing) = two_offices(&[["Acme", "Ann", "ann@acme.com", "Lead", "100", "Bob"]]);
    let shanghai_daemon = shanghai.start_daemon();
    shanghai_daemon.wait_ready();
    let beijing_daemon = beijing.start_daemon();
    beijing_daemon.wait_ready();
    let master = shanghai.path("share/master.xlsx");
    let bob = beijing.path("share/bob.xlsx");
    wait_until(Duration::from_secs(15), "Acme in both files", || {
        companies_in(&master) == vec!["Acme".to_string()]
            && read_xlsx(&bob, "Pipeline").column("CRM ID").len() == 1
    });
    let acme = shanghai.deal_by("company", "Acme")["id"].to_string();

    // Acme's amount, written at once by a command line with each office's config and by a rep
    // in each office's file: every value is a different one.
    let failures = std::sync::Mutex::new(Vec::new());
    let mut written: Vec<String> = Vec::new();
    std::thread::scope(|scope| {
        for (worker, office) in [&shanghai, &beijing].into_iter().enumerate() {
            let failures = &failures;
            let acme = &acme;
            scope.spawn(move || {
                for index in 0..10 {
                    let amount = format!("{}", 1000 + worker * 100 + index);
                    let run = office.run(&["deals", "set", acme, &format!("amount={amount}")]);
                    if run.code != 0 {
                        failures
                            .lock()
                            .expect("failures")
                            .push(format!("deals set amount={amount}: {}", run.stderr));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
        scope.spawn(|| {
            for round in 0..4 {
                for (path, base) in [(&bob, 5000), (&master, 6000)] {
                    edit_in_excel(path, |edit| {
                        edit.set("Company", "Acme", "Amount", &format!("{}", base + round))
                    });
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
    });
    let failures = failures.into_inner().expect("failures");
    assert!(failures.is_empty(), "{failures:#?}");
    written.extend(
        (0..2).flat_map(|worker| {
            (0..10).map(move |index| format!("{}", 1000 + worker * 100 + index))
        }),
    );
    written.extend(
        (0..4).flat_map(|round| [format!("{}", 5000 + round), format!("{}", 6000 + round)]),
    );

    // Once both files have settled on the store's value: it is one of the writes, and each
    // write is in the history or was recorded as a conflict, none silently dropped.
    let settled = || {
        let store = amount_text(&shanghai.deal_by("company", "Acme")["amount"].to_string());
        let shown = |path: &std::path::Path| {
            read_xlsx(path, "Pipeline")
                .column("Amount")
                .first()
                .map(|amount| amount_text(amount))
        };
        (shown(&master) == Some(store.clone()) && shown(&bob) == Some(store.clone()))
            .then_some(store)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut final_amount = settled();
    while final_amount.is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        final_amount = settled();
    }
    let final_amount = final_amount.unwrap_or_else(|| {
        panic!(
            "both files show the store's amount\nShanghai:\n{}\nBeijing:\n{}",
            shanghai_daemon.log(),
            beijing_daemon.log()
        )
    });
    assert!(
        written.contains(&final_amount),
        "{final_amount} is one of {written:?}"
    );
    let in_history: HashSet<String> = shanghai
        .query(&format!(
            "SELECT new_value FROM changes WHERE deal_id = {acme} AND field = 'amount'"
        ))
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .map(|value| amount_text(&value))
        .collect();
    let in_conflicts: HashSet<String> = shanghai
        .query(&format!(
            "SELECT sheet_value FROM conflicts WHERE deal_id = {acme} AND field = 'amount' \
             UNION SELECT store_value FROM conflicts WHERE deal_id = {acme} AND field = 'amount'"
        ))
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .map(|value| amount_text(&value))
        .collect();
    let lost: Vec<&String> = written
        .iter()
        .filter(|amount| !in_history.contains(*amount) && !in_conflicts.contains(*amount))
        .collect();
    assert!(
        lost.is_empty(),
        "every write is in the history or a conflict; lost: {lost:?}\nhistory {in_history:?}\nconflicts {in_conflicts:?}\nShanghai:\n{}\nBeijing:\n{}",
        shanghai_daemon.log(),
        beijing_daemon.log()
    );
    // The history's last amount is the store's.
    let last = shanghai.query_value(&format!(
        "SELECT new_value FROM changes WHERE deal_id = {acme} AND field = 'amount' ORDER BY id DESC LIMIT 1"
    ));
    assert_eq!(last.as_deref().map(amount_text), Some(final_amount));
}

#[test]
fn a_delivery_under_way_elsewhere_is_left_to_it_not_waited_for() {
    if !shared_store_available("a_delivery_under_way_elsewhere_is_left_to_it_not_waited_for") {
        return;
    }
    let smtp = SmtpServer::start(0);
    let test = TestDir::for_site("shanghai");
    deal_sheet(&[["Acme", "Ann", "ann@acme.com", "Prospect", "1000", "Bob"]])
        .save(&test.path("p.xlsx"));
    test.config(&format!(
        "[[sources]]\nname = \"pipeline\"\npath = \"p.xlsx\"\n\n[remind]\nat = \"09:00\"\ntimezone = \"UTC\"\n\n[reps]\nBob = \"bob@example.com\"\n\n[smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"Funnel Sync <funnelsync@example.com>\"\n",
        smtp.port
    ));
    test.sync().assert_code(0);
    test.execute("UPDATE deals SET stage_entered_at = '2026-01-05T00:00:00.000Z'");

    // Another daemon is delivering (its mail server hangs, say): it holds the mail claim.
    let url = test.store_url().expect("the scenario's database");
    let mut other = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    other
        .batch_execute(&format!("SELECT pg_advisory_lock({})", claim_key("mail")))
        .expect("take the mail claim");
    let later = (chrono::Utc::now() + chrono::Duration::days(40)).to_rfc3339();
    let mut remind = test
        .command(&["--now", &later, "remind"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("remind");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut finished = false;
    while std::time::Instant::now() < deadline {
        if remind.try_wait().expect("wait").is_some() {
            finished = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !finished {
        let _ = remind.kill();
        let _ = remind.wait();
    }
    assert!(finished, "remind waited for the other daemon's delivery");
    // The digest is recorded, and left pending for the daemon that holds the claim.
    assert!(smtp.to("bob@example.com").is_empty());
    assert!(test.count("SELECT count(*) FROM outbox WHERE status = 'pending'") > 0);
    drop(other);
}

/// A SQLite store of `n_deals` deals, imported from a .csv, over `n_owners` owners who each have
/// an address (the digests of their stalled deals wait in the outbox: the SMTP server refuses).
fn a_sqlite_store_of(test: &TestDir, n_deals: usize, n_owners: usize, smtp_port: u16) {
    let mut csv = String::from("Company,Contact,Email,Stage,Amount,Owner\n");
    for n in 0..n_deals {
        csv.push_str(&format!(
            "Company {n},Contact {n},contact{n}@example{}.com,Lead,{},Rep {}\n",
            n % 97,
            1000 + n,
            n % n_owners
        ));
    }
    test.write("p.csv", csv);
    let reps: String = (0..n_owners)
        .map(|n| format!("\"Rep {n}\" = \"rep{n}@example.com\"\n"))
        .collect();
    std::fs::write(
        test.config_path(),
        format!(
            "[store]\npath = \"state/crm.db\"\n\n[[sources]]\nname = \"pipeline\"\npath = \"p.csv\"\n\n[remind]\nat = \"09:00\"\ntimezone = \"UTC\"\n\n[reps]\n{reps}\n[smtp]\nhost = \"127.0.0.1\"\nport = {smtp_port}\nsecurity = \"none\"\nfrom = \"Funnel Sync <funnelsync@example.com>\"\n"
        ),
    )
    .expect("config");
    test.run(&["sync"]).assert_code(0);
    let later = (chrono::Utc::now() + chrono::Duration::days(40)).to_rfc3339();
    test.run(&["--now", &later, "remind"]);
}

#[test]
fn store_copy_streams_a_large_store_in_batches_and_checks_every_row() {
    if !shared_store_available("store_copy_streams_a_large_store_in_batches_and_checks_every_row") {
        return;
    }
    // The same store small and large: a few hundred deals, and 20,000 (ten times the largest
    // batch) over 60 reps whose digests (a few hundred kilobytes each) wait in the outbox.
    let smtp = SmtpServer::start(1_000_000);
    let small = TestDir::new();
    a_sqlite_store_of(&small, 200, 3, smtp.port);
    let small_url = small.store_url().expect("the scenario's database");
    let (copy, small_peak) = small.run_measuring_memory(&["store", "copy", "--to", &small_url]);
    copy.assert_code(0);

    let large = TestDir::new();
    a_sqlite_store_of(&large, 20_000, 60, smtp.port);
    let url = large.store_url().expect("the scenario's database");
    let (copy, peak) = large.run_measuring_memory(&["store", "copy", "--to", &url]);
    copy.assert_code(0);
    assert!(copy.stdout.contains("and checked"), "{}", copy.stdout);

    // Every row came, in every table that took many batches.
    let counted = |table: &str, n: i64| {
        assert_eq!(
            large.count(&format!("SELECT count(*) FROM {table}")),
            n,
            "{table} in PostgreSQL"
        );
        assert!(
            copy.stdout
                .lines()
                .any(|line| line.split_whitespace().take(2).eq([table, &n.to_string()])),
            "{table} {n} in the report\n{}",
            copy.stdout
        );
    };
    for table in ["deals", "stage_history", "changes", "mirror_rows"] {
        counted(table, 20_000);
    }
    counted("outbox", 60);
    std::fs::write(
        large.path("postgres.toml"),
        std::fs::read_to_string(large.config_path())
            .expect("config")
            .replace("path = \"state/crm.db\"", &format!("url = \"{url}\"")),
    )
    .expect("config");
    let args = ["deals", "list", "--include-archived", "--format", "json"];
    let on_sqlite = large.run(&args);
    let on_postgres = run_with(&large, "postgres.toml", &args);
    on_postgres.assert_code(0);
    assert_eq!(on_postgres.json(), on_sqlite.json());

    // The copy's memory does not grow with the store: it holds a batch, not a table (holding
    // the tables, it took about 90 MB more for the large store than for the small one).
    let grew = peak.saturating_sub(small_peak);
    assert!(
        grew < 24 << 20,
        "the copy of 20,000 deals took {} MB more than that of 200 ({} MB against {} MB)",
        grew >> 20,
        peak >> 20,
        small_peak >> 20
    );
}
