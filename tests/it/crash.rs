//! Crash consistency: the daemon runs on a folder of workbooks while edits keep coming through
//! file saves and the CLI, and is killed with SIGKILL — at random moments, and aimed at each
//! phase of a sync (reading, the store transaction, the write-back) as the daemon logs it — then
//! restarted. Where each kill landed is recorded, and every phase must have been hit a few times.
//! At the end store, mirror and files agree.
//!
//! `FUNNELSYNC_CRASH_ROUNDS` sets the number of planned kill/restart rounds (default 50); more
//! follow, up to three times as many, while a phase is still short of kills.

use std::collections::HashMap;
use std::time::Duration;

use crate::harness::{read_xlsx, Random, TestDir, UserEdit, XlsxBuilder};

/// The phases of a sync, as the daemon logs them when each begins (`sync phase … phase="…"`).
const PHASES: [&str; 3] = ["read", "transaction", "write-back"];

/// The phases the syncs in a daemon's log were in when it stopped: each file's last logged phase,
/// unless that is "done". Empty when no sync was running.
fn phases_at_stop(log: &str) -> Vec<String> {
    let mut last_phase: HashMap<String, String> = HashMap::new();
    for line in log.lines().filter(|line| line.contains("sync phase")) {
        let field = |name: &str| {
            line.split(&format!("{name}="))
                .nth(1)
                .map(|rest| {
                    rest.trim_start_matches('"')
                        .split(['"', ' '])
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
                .unwrap_or_default()
        };
        last_phase.insert(field("file"), field("phase"));
    }
    let mut phases: Vec<String> = last_phase
        .into_values()
        .filter(|phase| phase != "done")
        .collect();
    phases.sort();
    phases
}

#[test]
fn killing_the_daemon_at_any_moment_loses_nothing() {
    let rounds: u64 = crate::harness::env_number("FUNNELSYNC_CRASH_ROUNDS", 50);
    let seed: u64 = crate::harness::env_number("FUNNELSYNC_CRASH_SEED", 0x5EED_1234);
    let mut random = Random(seed);
    let test = TestDir::new();
    std::fs::create_dir_all(test.path("share")).expect("share");
    let files = ["a.xlsx", "b.xlsx"];
    for (name, owner) in [("a.xlsx", "A"), ("b.xlsx", "B")] {
        XlsxBuilder::new()
            .sheet("Pipeline")
            .row(&["Company", "Stage", "Amount", "Owner"])
            .row(&[&format!("{name} first"), "Lead", "500", owner])
            .save(&test.path(&format!("share/{name}")));
    }
    // Each file shows its owner's deals, so a rep's edits stay in their file.
    test.config(
        "[watch]\nsettle = \"50ms\"\npoll_interval = \"200ms\"\n\n[[sources]]\nname = \"a\"\npath = \"share/a.xlsx\"\nmatch_on = []\nfilter = { owner = \"A\" }\n\n[[sources]]\nname = \"b\"\npath = \"share/b.xlsx\"\nmatch_on = []\nfilter = { owner = \"B\" }\n",
    );
    test.sync().assert_code(0);

    let mut added: Vec<(String, &str)> = Vec::new();
    let mut amounts: HashMap<String, String> = HashMap::new();
    // Where each kill landed: how many kills found a sync in each phase, and how many found none.
    let mut landed: HashMap<String, u64> = HashMap::new();
    // A kill in every phase, a few times over, or the rounds did not test what they say.
    let enough = (rounds / 16).clamp(1, 3);
    // Kills aimed at a short phase can all come a moment late on a slow or busy machine, so after
    // the planned rounds more follow, aimed at the phases still short of kills, up to a bound.
    let max_rounds = rounds * 3;
    for round in 0..max_rounds {
        let short_of_kills = PHASES
            .iter()
            .copied()
            .find(|phase| landed.get(*phase).copied().unwrap_or(0) < enough);
        if round >= rounds && short_of_kills.is_none() {
            break;
        }
        let mut daemon = test.start_daemon();
        // One round in five kills at a random moment; the others aim at a phase, the kill coming
        // as soon as the daemon logs that a sync entered it. The store transaction, the shortest
        // phase, is aimed at twice as often.
        let aim = if round >= rounds {
            short_of_kills
        } else {
            [
                None,
                Some("read"),
                Some("transaction"),
                Some("write-back"),
                Some("transaction"),
            ][(round % 5) as usize]
        };
        if aim.is_none() {
            // Let it get somewhere: start-up scan, a sync, a write-back, or nothing at all.
            std::thread::sleep(Duration::from_millis(random.below(150)));
        }
        // A rep saves a new row (and moves a deal on) in one of the files.
        let name = files[random.below(2) as usize];
        let company = format!("{name} round {round}");
        let mut edit = UserEdit::open(&test.path(&format!("share/{name}")), "Pipeline");
        if random.below(2) == 0 {
            let stage = ["Prospect", "Opportunity", "Lead"][random.below(3) as usize];
            edit = edit.set("Company", &format!("{name} first"), "Stage", stage);
        }
        let owner = if name.starts_with('a') { "A" } else { "B" };
        edit.add_row(&[&company, "Lead", "1000", owner]).save();
        added.push((company, name));
        // Someone changes an amount through the CLI.
        if random.below(2) == 0 {
            let deals = test.deals();
            if let Some(deal) = deals.get(random.below(deals.len() as u64) as usize) {
                let amount = format!("{}", 1000 + random.below(9000));
                let id = deal["id"].as_i64().expect("id").to_string();
                if test
                    .run(&["deals", "set", &id, &format!("amount={amount}")])
                    .code
                    == 0
                {
                    amounts.insert(id, amount);
                }
            }
        }
        match aim {
            None => std::thread::sleep(Duration::from_millis(random.below(200))),
            Some(phase) => {
                let marker = format!("phase=\"{phase}\"");
                let deadline = std::time::Instant::now() + Duration::from_secs(3);
                while !daemon.log().contains(&marker) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        daemon.child.kill().expect("SIGKILL");
        let _ = daemon.child.wait();
        let phases = phases_at_stop(&daemon.log());
        if phases.is_empty() {
            *landed.entry("between syncs".to_string()).or_default() += 1;
        }
        for phase in phases {
            *landed.entry(phase).or_default() += 1;
        }
    }
    eprintln!("where the kills landed: {landed:?}");
    for phase in PHASES {
        assert!(
            landed.get(phase).copied().unwrap_or(0) >= enough,
            "fewer than {enough} kills landed in the {phase} phase: {landed:?}"
        );
    }

    // Restart once more and let everything settle.
    let mut daemon = test.start_daemon();
    daemon.wait_ready();
    let missing = || -> Vec<String> {
        added
            .iter()
            .filter(|(company, _)| test.count(&format!("SELECT count(*) FROM deals WHERE company = '{company}' AND archived_at IS NULL")) < 1)
            .map(|(company, _)| company.clone())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !missing().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let still_missing = missing();
    if !still_missing.is_empty() {
        let files: Vec<Vec<String>> = files
            .iter()
            .map(|name| {
                read_xlsx(&test.path(&format!("share/{name}")), "Pipeline").column("Company")
            })
            .collect();
        let history = test.run(&["history", "--limit", "400"]).stdout;
        panic!(
            "missing {still_missing:?}\nfiles: {files:?}\nhistory:\n{history}\nlog:\n{}",
            daemon.log()
        );
    }
    // Then until every file shows the store: each row with its id and the store's amount (the
    // CLI's changes written back).
    let files_show_the_store = || {
        let stored_amounts: HashMap<String, String> = test
            .deals()
            .into_iter()
            .map(|deal| (deal["id"].to_string(), deal["amount"].to_string()))
            .collect();
        files.iter().all(|name| {
            let sheet = read_xlsx(&test.path(&format!("share/{name}")), "Pipeline");
            sheet
                .column("CRM ID")
                .iter()
                .zip(sheet.column("Amount"))
                .all(|(id, amount)| {
                    stored_amounts
                        .get(id)
                        .is_some_and(|stored| stored.trim_end_matches(".0") == amount)
                })
        })
    };
    crate::harness::wait_until(
        Duration::from_secs(20),
        "the files to show the store",
        files_show_the_store,
    );
    daemon.signal("TERM");
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        daemon.log()
    );

    // No temp file is left behind.
    let leftovers: Vec<String> = std::fs::read_dir(test.path("share"))
        .expect("share")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp") || name.starts_with(".~funnelsync"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

    // Every edit made it, once.
    for (company, _) in &added {
        assert_eq!(
            test.count(&format!(
                "SELECT count(*) FROM deals WHERE company = '{company}'"
            )),
            1,
            "{company} is in the store exactly once"
        );
    }
    for name in files {
        let first = format!("{name} first");
        assert_eq!(
            test.count(&format!(
                "SELECT count(*) FROM deals WHERE company = '{first}'"
            )),
            1
        );
    }
    let n_deals = test.count("SELECT count(*) FROM deals");
    assert_eq!(
        n_deals as usize,
        added.len() + files.len(),
        "no duplicated deals"
    );
    assert!(!amounts.is_empty(), "the CLI edited some deals");

    // Files are whole, and a final sync finds store, mirror and files in agreement.
    let report = test.sync();
    report.assert_code(0);
    let report = report.json();
    for file in report["files"].as_array().expect("files") {
        assert_eq!(file["status"], "unchanged", "{file}");
        assert_eq!(file["counts"]["created"], 0, "{file}");
    }
    for name in files {
        let sheet = read_xlsx(&test.path(&format!("share/{name}")), "Pipeline");
        let companies = sheet.column("Company");
        for (company, file) in &added {
            if *file == name {
                assert!(companies.contains(company), "{company} is still in {name}");
            }
        }
        let ids = sheet.column("CRM ID");
        assert!(
            ids.iter().all(|id| !id.is_empty()),
            "every row of {name} carries its id: {ids:?}"
        );
        // The file and the store agree on every amount, the CLI's changes included.
        let stored_amounts: HashMap<String, String> = test
            .deals()
            .into_iter()
            .map(|deal| (deal["id"].to_string(), deal["amount"].to_string()))
            .collect();
        for (id, amount) in ids.iter().zip(sheet.column("Amount")) {
            let stored = stored_amounts.get(id).cloned();
            assert_eq!(
                stored
                    .as_deref()
                    .map(|text| text.trim_end_matches(".0").to_string()),
                Some(amount.clone()),
                "deal {id} in {name}"
            );
        }
    }
}
