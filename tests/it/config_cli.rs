//! `funnelsync check-config` and how config problems reach the admin.

use crate::harness::{Run, TestDir};

#[test]
fn check_config_reports_every_problem_with_key_and_exits_2() {
    let test = TestDir::new();
    test.config(
        r#"
[[sources]]
name = "pipeline"
path = "pipeline.txt"
header_row = 0
match_on = ["email", "fax"]
on_row_removed = "shred"

[sources.columns]
amount = ["Amount", "Total"]
budget = "Budget"

[[stages]]
name = "Lead"
probability = 1.5

[watch]
settle = "soon"
"#,
    );
    let run = test.run(&["check-config"]);
    run.assert_code(2);
    for expected in [
        "`sources[1].path`: \"pipeline.txt\" is neither a folder nor a spreadsheet",
        "`sources[1].header_row`: 0 is not a row number",
        "`sources[1].match_on`: \"fax\" is not a field",
        "`sources[1].on_row_removed`: \"shred\" is not one of archive, delete, ignore",
        "`sources[1].columns.budget`: \"budget\" is not a field",
        "`stages[1].probability`: 1.5 must be between 0 and 1",
        "`stages`: the funnel needs a stage with `terminal = \"won\"`",
        "`watch.settle`: \"soon\" is not a duration",
    ] {
        assert!(
            run.stderr.contains(expected),
            "missing {expected:?} in:\n{}",
            run.stderr
        );
    }
}

#[test]
fn unknown_keys_are_errors_with_line_numbers() {
    let test = TestDir::new();
    test.config("[[sources]]\nname = \"p\"\npath = \"p.xlsx\"\nsheeet = \"Pipeline\"\n\n[[sources]]\nname = \"q\"\npath = \"q.csv\"\nmatch = [\"email\"]\n");
    let run = test.run(&["check-config"]);
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("`sources[1].sheeet`: unknown field `sheeet`"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("`sources[2].match`: unknown field `match`"),
        "{}",
        run.stderr
    );
    // Each at its own line (the harness puts two lines of [store] and a blank line first).
    assert!(
        run.stderr.contains("line 7: `sources[1].sheeet`")
            && run.stderr.contains("line 12: `sources[2].match`"),
        "{}",
        run.stderr
    );
}

#[test]
fn every_problem_of_every_source_is_reported_at_its_own_line() {
    let test = TestDir::new();
    test.config(
        r#"[[sources]]
name = "pipeline"
path = "pipeline.xlsx"
writeback = false
on_row_remove = "ignore"
conflict = "loudest"
filter = { stag = "Lead" }

[[sources]]
name = "leads"
"#,
    );
    let run = test.run(&["check-config"]);
    run.assert_code(2);
    for expected in [
        "line 7: `sources[1].writeback`: unknown field `writeback`",
        "line 8: `sources[1].on_row_remove`: unknown field `on_row_remove`",
        "line 9: `sources[1].conflict`: \"loudest\" is not one of store, sheet, newest",
        "line 10: `sources[1].filter.stag`: \"stag\" is not a field",
        "line 12: `sources[2].path`: missing field `path`",
    ] {
        assert!(
            run.stderr.contains(expected),
            "missing {expected:?} in:
{}",
            run.stderr
        );
    }
    assert!(
        !run.stderr.contains("no [[sources]] given"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_value_of_the_wrong_type_is_said_at_its_line_and_hides_nothing() {
    let test = TestDir::new();
    test.config(
        r#"[[sources]]
name = "pipeline"
path = "pipeline.xlsx"
write_back = "yes"
max_delete = true
on_row_removed = "shred"
conflict = 3
backups = -1

[sources.columns]
amount = 5
owner = "Rep"
budget = "Budget"

[[sources]]
name = 7
path = "leads.csv"
view = "everything"
max_delete = "lots"

[[sources]]
name = "third"
header_row = 0
"#,
    );
    let run = test.run(&["check-config"]);
    run.assert_code(2);
    // Line 4 is the first `[[sources]]` (the harness writes `[store]` first).
    for expected in [
        "line 7: `sources[1].write_back`: must be true or false, not the text \"yes\"",
        "line 8: `sources[1].max_delete`: must be a share such as \"50%\" or a count such as 200, not true",
        "line 9: `sources[1].on_row_removed`: \"shred\" is not one of archive, delete, ignore",
        "line 10: `sources[1].conflict`: must be one of \"store\", \"sheet\", \"newest\", not the number 3",
        "line 11: `sources[1].backups`: -1 must be between 0 and 1000",
        "line 14: `sources[1].columns.amount`: must be a header text or a list of them",
        "line 16: `sources[1].columns.budget`: \"budget\" is not a field",
        "line 19: `sources[2].name`: must be a name in quotes, such as \"pipeline\", not the number 7",
        "line 21: `sources[2].view`: \"everything\" is not one of rows, all",
        "line 22: `sources[2].max_delete`: \"lots\" must be a share such as \"50%\"",
        "line 24: `sources[3].path`: missing field `path`",
        "line 26: `sources[3].header_row`: 0 is not a row number",
    ] {
        assert!(
            run.stderr.contains(expected),
            "missing {expected:?} in:\n{}",
            run.stderr
        );
    }
    for unwanted in [
        "untagged",
        "did not match",
        "`sources[2].name`: missing",
        "no [[sources]] given",
    ] {
        assert!(
            !run.stderr.contains(unwanted),
            "{unwanted:?} in:\n{}",
            run.stderr
        );
    }
    // Nothing is said twice (the stand-in for a missing or mistyped name or path says nothing).
    assert_eq!(
        run.stderr.matches("`sources[2].name`").count(),
        1,
        "{}",
        run.stderr
    );
    assert_eq!(
        run.stderr.matches("`sources[3].path`").count(),
        1,
        "{}",
        run.stderr
    );
}

#[test]
fn check_config_checks_the_store_folder_and_warns_about_missing_source_folders() {
    let test = TestDir::new();
    test.write("blocked", "a file where the store's folder should be");
    std::fs::write(
        test.config_path(),
        "[store]\npath = \"blocked/state/crm.db\"\n\n[[sources]]\nname = \"share\"\npath = \"share/*.xlsx\"\n",
    )
    .expect("config");
    let run = test.run(&["check-config"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("blocked is a file, not a folder"),
        "{}",
        run.stderr
    );
    // The store's problem does not hide the rest: the missing source folder is warned about too.
    assert!(
        run.stderr.contains("warning: source \"share\"")
            && run
                .stderr
                .contains("the folder does not exist (is the share mounted?)"),
        "{}",
        run.stderr
    );
    assert!(!run.stdout.contains("is valid"), "{}", run.stdout);

    // A sound store, a source folder that is not there and a CSV source: the summary says what
    // each source does, with clean paths.
    std::fs::write(
        test.config_path(),
        "[store]\npath = \"config/../state/crm.db\"\n\n[[sources]]\nname = \"share\"\npath = \"share/*.xlsx\"\n\n[[sources]]\nname = \"leads\"\npath = \"leads.csv\"\nwrite_back = false\n",
    )
    .expect("config");
    test.write(
        "leads.csv",
        "Company,Stage
Acme,Lead
",
    );
    let run = test.run(&["check-config"]);
    run.assert_code(0);
    let store_line = format!("store: {}", test.path("state/crm.db").display());
    assert!(run.stdout.contains(&store_line), "{}", run.stdout);
    assert!(!run.stdout.contains(".."), "{}", run.stdout);
    assert!(
        run.stderr.contains("warning: source \"share\"")
            && run
                .stderr
                .contains("the folder does not exist (is the share mounted?)"),
        "{}",
        run.stderr
    );
    let leads = run
        .stdout
        .lines()
        .find(|line| line.trim_start().starts_with("leads:"))
        .expect("the leads line");
    assert!(leads.contains("write-back: off"), "{leads}");
    assert!(!leads.contains("sheet"), "a CSV has no sheet: {leads}");
    let share = run
        .stdout
        .lines()
        .find(|line| line.trim_start().starts_with("share:"))
        .expect("the share line");
    assert!(
        share.contains("write-back: on, showing the deals of its own rows"),
        "{share}"
    );

    // The sync itself fails for the missing folder, saying why.
    let sync = test.run(&["sync"]);
    sync.assert_code(1);
    assert!(
        sync.stdout.contains("is the share mounted?"),
        "{}",
        sync.stdout
    );
}

#[test]
fn a_syntax_error_names_its_line() {
    let test = TestDir::new();
    test.config("[[sources]]\nname = \"p\npath = \"p.xlsx\"\n");
    let run = test.run(&["check-config"]);
    run.assert_code(2);
    // The string that is not closed starts on line 5 (after the two lines of `[store]` and a
    // blank one), and that is where it is reported.
    assert!(
        run.stderr.contains("  - line 5: invalid basic string"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_valid_config_prints_a_summary() {
    let test = TestDir::new();
    std::fs::create_dir_all(test.path("share")).expect("folder");
    test.write("share/a.xlsx", b"");
    test.write("share/~$a.xlsx", b"");
    test.write("share/b.csv", b"");
    test.config("[[sources]]\nname = \"share\"\npath = \"share\"\n");
    let run = test.run(&["check-config"]);
    run.assert_code(0);
    assert!(run.stdout.contains("share: folder"), "{}", run.stdout);
    assert!(
        run.stdout.contains("files now: 2"),
        "lock files are not counted: {}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("Lead (10%) → Prospect (30%) → Opportunity (60%) → Won (won) → Lost (lost)"),
        "{}",
        run.stdout
    );
}

#[test]
fn the_config_path_comes_from_the_environment_and_a_missing_one_is_exit_2() {
    let test = TestDir::new();
    test.config("[[sources]]\nname = \"p\"\npath = \"p.csv\"\n");
    let output = std::process::Command::new(crate::harness::BINARY)
        .arg("check-config")
        .env("FUNNELSYNC_CONFIG", test.config_path())
        .output()
        .expect("run");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let output = std::process::Command::new(crate::harness::BINARY)
        .args(["--config", "/nonexistent/funnelsync.toml", "check-config"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr)
        .contains("cannot read config file /nonexistent/funnelsync.toml"));
}

#[test]
fn usage_errors_exit_2() {
    let test = TestDir::new();
    test.config("[[sources]]\nname = \"p\"\npath = \"p.csv\"\n");
    test.run(&["sync", "--format", "yaml"]).assert_code(2);
    test.run(&["frobnicate"]).assert_code(2);
}

#[test]
fn write_back_on_a_read_only_format_is_a_config_error() {
    let test = TestDir::new();
    test.config("[[sources]]\nname = \"old\"\npath = \"old.xls\"\nwrite_back = true\n\n[[sources]]\nname = \"team\"\npath = \"team.ods\"\nfilter = { stage = [\"Negotiating\"] }\nconflict = \"loudest\"\n");
    let run = test.run(&["check-config"]);
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("`sources[1].write_back`: \"old.xls\" is a read-only format"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("`sources[2].filter.stage`: \"Negotiating\" is not a stage"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("`sources[2].conflict`: \"loudest\" is not one of store, sheet, newest"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_postgresql_store_is_checked_and_its_password_never_shown() {
    let test = TestDir::new();
    test.write("leads.csv", "Company,Stage\nAcme,Lead\n");
    // Every problem of the section at once: both a file and a database, a site that is not a
    // name, a password in the URL.
    std::fs::write(
        test.config_path(),
        "[store]\npath = \"state/crm.db\"\nurl = \"postgresql://funnelsync:hunter2@db.example/crm\"\nsite = \"Bei jing\"\n\n[[sources]]\nname = \"leads\"\npath = \"leads.csv\"\n",
    )
    .expect("config");
    let run = test.run(&["check-config"]);
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("has both `path` (a SQLite file) and `url`"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("`store.site`"), "{}", run.stderr);
    std::fs::write(
        test.config_path(),
        "[store]\nurl = \"postgresql://funnelsync:hunter2@db.example/crm\"\n\n[[sources]]\nname = \"leads\"\npath = \"leads.csv\"\n",
    )
    .expect("config");
    let run = test.run(&["check-config"]);
    run.assert_code(2);
    assert!(run.stderr.contains("holds a password"), "{}", run.stderr);
    assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);

    // A sound one: check-config says where the store is and which site this daemon is; a
    // server that does not answer is an error that names the URL without the password, which
    // comes from the environment and is never printed.
    let port = crate::harness::free_port();
    std::fs::write(
        test.config_path(),
        format!("[store]\nurl = \"postgresql://funnelsync@127.0.0.1:{port}/crm\"\nsite = \"beijing\"\n\n[[sources]]\nname = \"leads\"\npath = \"leads.csv\"\n"),
    )
    .expect("config");
    let run = test.run(&["check-config"]);
    run.assert_code(0);
    assert!(
        run.stdout.contains(&format!(
            "store: postgresql://funnelsync@127.0.0.1:{port}/crm (PostgreSQL), site \"beijing\""
        )),
        "{}",
        run.stdout
    );
    let sync = Run::from_output(
        test.command(&["sync"])
            .env("FUNNELSYNC_STORE_PASSWORD", "s3cret-Passw0rd")
            .output()
            .expect("sync"),
    );
    sync.assert_code(3);
    assert!(
        sync.stderr.contains(&format!(
            "cannot connect to the store postgresql://funnelsync@127.0.0.1:{port}/crm"
        )),
        "{}",
        sync.stderr
    );
    assert!(!sync.stderr.contains("s3cret"), "{}", sync.stderr);
}

#[test]
fn a_password_given_as_a_url_parameter_is_refused_and_never_shown() {
    let test = TestDir::new();
    test.write("leads.csv", "Company,Stage\nAcme,Lead\n");
    for url in [
        "postgresql://funnelsync@db.example/crm?password=hunter2",
        "postgresql://funnelsync@db.example/crm?sslmode=require&PassWord=hunter2",
        "postgresql://funnelsync@db.example/crm?%70assword=hunter2",
    ] {
        std::fs::write(
            test.config_path(),
            format!(
                "[store]\nurl = \"{url}\"\n\n[[sources]]\nname = \"leads\"\npath = \"leads.csv\"\n"
            ),
        )
        .expect("config");
        let run = test.run(&["check-config"]);
        run.assert_code(2);
        assert!(
            run.stderr.contains("`store.url`") && run.stderr.contains("holds a password"),
            "{url}: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains("password_file")
                && run.stderr.contains("FUNNELSYNC_STORE_PASSWORD"),
            "{url}: {}",
            run.stderr
        );
        assert!(!run.stderr.contains("hunter2"), "{url}: {}", run.stderr);
        assert!(!run.stdout.contains("hunter2"), "{url}: {}", run.stdout);
    }

    // `store copy --to` refuses one too, before it prints or connects to anything.
    test.single_source("leads.csv", "");
    test.sync().assert_code(0);
    let port = crate::harness::free_port();
    for to in [
        format!("postgresql://funnelsync@127.0.0.1:{port}/crm?password=hunter2"),
        format!("postgresql://funnelsync:hunter2@127.0.0.1:{port}/crm"),
    ] {
        let copy = test.run(&["store", "copy", "--to", &to]);
        copy.assert_code(2);
        assert!(copy.stderr.contains("holds a password"), "{}", copy.stderr);
        assert!(!copy.stderr.contains("hunter2"), "{}", copy.stderr);
        assert!(!copy.stdout.contains("hunter2"), "{}", copy.stdout);
    }
}
