//! `funnelsync check-config` and how config problems reach the admin.

use crate::harness::TestDir;

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
    assert!(
        run.stderr.contains("line 4") || run.stderr.contains("line 3"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_syntax_error_names_its_line() {
    let test = TestDir::new();
    test.config("[[sources]]\nname = \"p\npath = \"p.xlsx\"\n");
    let run = test.run(&["check-config"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("line 5") || run.stderr.contains("line 6"),
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
