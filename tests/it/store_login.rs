//! Logging in to a PostgreSQL store as a real deployment does: each scenario starts a cluster of
//! its own with password (`scram-sha-256`) authentication and, where it says so, TLS with a
//! certificate from a certificate authority made for the test. The password comes from
//! `password_file` or `FUNNELSYNC_STORE_PASSWORD` and never shows in output; the server is
//! trusted only as `sslmode` and `sslrootcert` say.
//!
//! They run on both passes of `tests/run` (and under plain `cargo test`); without PostgreSQL's
//! server binaries they say so and end, and in CI they fail.

use std::path::Path;

use crate::harness::{deal_sheet, Run, TestCa, TestCluster, TestDir};

const PASSWORD: &str = "Tr0ub4dor-and-3";

/// A folder with a workbook of two deals and the test CA's certificate.
fn scene(ca: &TestCa) -> TestDir {
    let test = TestDir::new();
    deal_sheet(&[
        ["Acme", "Ann", "ann@acme.com", "Lead", "1000", "Bob"],
        ["Beta", "Ben", "ben@beta.com", "Prospect", "2000", "Bob"],
    ])
    .save(&test.path("p.xlsx"));
    test.write("ca.pem", &ca.pem);
    test
}

/// Writes `name`: a config whose store is `url`, with `password_file` when given.
fn store_config(test: &TestDir, name: &str, url: &str, password_file: Option<&str>) {
    let password_line = password_file
        .map(|file| format!("password_file = \"{file}\"\n"))
        .unwrap_or_default();
    test.write(
        name,
        format!(
            "[store]\nurl = \"{url}\"\n{password_line}\n[[sources]]\nname = \"pipeline\"\npath = \"p.xlsx\"\n"
        ),
    );
}

fn write_secret(path: &Path, secret: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{secret}\n")).expect("password file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("mode");
}

/// Runs the binary with a config of the scenario and the environment it is given, and none of
/// the store password variables it is not.
fn run(test: &TestDir, config: &str, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut command = test.command_with_config(&test.path(config), args);
    command
        .env_remove("FUNNELSYNC_STORE_PASSWORD")
        .env_remove("CREDENTIALS_DIRECTORY");
    for (name, value) in env {
        command.env(name, value);
    }
    Run::from_output(command.output().expect("run funnelsync"))
}

#[track_caller]
fn assert_refused(run: &Run, says: &str, secrets: &[&str]) {
    assert_ne!(run.code, 0, "refused\n{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(says),
        "says {says:?}\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    for secret in secrets {
        assert!(
            !run.stderr.contains(secret) && !run.stdout.contains(secret),
            "a password in the output\n{}\n{}",
            run.stdout,
            run.stderr
        );
    }
}

#[test]
fn the_password_from_password_file_or_the_environment_logs_in_over_verified_tls() {
    let ca = TestCa::new("funnelsync test CA");
    let Some(cluster) = TestCluster::start(
        "the_password_from_password_file_or_the_environment_logs_in_over_verified_tls",
        Some(&ca.server_cert(&["localhost"])),
    ) else {
        return;
    };
    cluster.create_login("funnelsync", PASSWORD);
    let test = scene(&ca);
    let ca_path = test.path("ca.pem");
    let url = format!(
        "postgresql://funnelsync@localhost:{}/funnelsync?sslmode=verify-full&sslrootcert={}",
        cluster.port,
        ca_path.display()
    );
    write_secret(&test.path("store-password"), PASSWORD);
    store_config(&test, "tls.toml", &url, Some("store-password"));

    // The right password, from the file: the config checks, the sync creates the store and its
    // deals, and they read back.
    run(&test, "tls.toml", &[], &["check-config"]).assert_code(0);
    run(&test, "tls.toml", &[], &["sync"]).assert_code(0);
    let deals = run(
        &test,
        "tls.toml",
        &[],
        &["deals", "list", "--format", "json"],
    );
    deals.assert_code(0);
    assert_eq!(
        deals.json().as_array().map(Vec::len),
        Some(2),
        "{}",
        deals.stdout
    );
    let n_deals: i64 = cluster
        .admin("funnelsync")
        .query_one("SELECT count(*) FROM deals", &[])
        .expect("count")
        .get(0);
    assert_eq!(n_deals, 2, "the deals are in the cluster's database");

    // A wrong password in the file: refused, said plainly, and neither password is shown.
    write_secret(&test.path("store-password"), "not-the-Password-42");
    let wrong = run(&test, "tls.toml", &[], &["deals", "list"]);
    assert_refused(
        &wrong,
        "password authentication failed for user \"funnelsync\"",
        &["not-the-Password-42", PASSWORD],
    );
    let synced = run(&test, "tls.toml", &[], &["sync"]);
    assert_refused(
        &synced,
        "password authentication failed",
        &["not-the-Password-42", PASSWORD],
    );

    // From the environment, without a password file.
    store_config(&test, "env.toml", &url, None);
    run(
        &test,
        "env.toml",
        &[("FUNNELSYNC_STORE_PASSWORD", PASSWORD)],
        &["deals", "list"],
    )
    .assert_code(0);
    let wrong = run(
        &test,
        "env.toml",
        &[("FUNNELSYNC_STORE_PASSWORD", "wrong-from-the-env")],
        &["deals", "list"],
    );
    assert_refused(
        &wrong,
        "password authentication failed",
        &["wrong-from-the-env", PASSWORD],
    );
    // No password anywhere: the message says where one goes.
    let none = run(&test, "env.toml", &[], &["deals", "list"]);
    assert_refused(
        &none,
        "password_file, FUNNELSYNC_STORE_PASSWORD",
        &[PASSWORD],
    );

    // The server takes no TCP connection without TLS, so the logins above were over TLS.
    store_config(
        &test,
        "plain.toml",
        &format!(
            "postgresql://funnelsync@localhost:{}/funnelsync?sslmode=disable",
            cluster.port
        ),
        None,
    );
    let plain = run(
        &test,
        "plain.toml",
        &[("FUNNELSYNC_STORE_PASSWORD", PASSWORD)],
        &["deals", "list"],
    );
    assert_refused(&plain, "no encryption", &[PASSWORD]);
}

#[test]
fn verify_full_trusts_only_the_named_ca_and_the_host_its_certificate_names() {
    let ca = TestCa::new("funnelsync test CA");
    let Some(cluster) = TestCluster::start(
        "verify_full_trusts_only_the_named_ca_and_the_host_its_certificate_names",
        Some(&ca.server_cert(&["localhost"])),
    ) else {
        return;
    };
    cluster.create_login("funnelsync", PASSWORD);
    let test = scene(&ca);
    let stranger = TestCa::new("some other CA");
    test.write("other-ca.pem", &stranger.pem);
    let env = [("FUNNELSYNC_STORE_PASSWORD", PASSWORD)];
    let url = |host: &str, query: &str| {
        format!(
            "postgresql://funnelsync@{host}:{}/funnelsync?{query}",
            cluster.port
        )
    };
    let ca_path = test.path("ca.pem").display().to_string();
    let other_path = test.path("other-ca.pem").display().to_string();

    // With the test CA named, verify-full connects.
    store_config(
        &test,
        "trusted.toml",
        &url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca_path}"),
        ),
        None,
    );
    run(&test, "trusted.toml", &env, &["sync"]).assert_code(0);

    // Without it (the system's trust store knows nothing of the test CA), or with another CA,
    // the server is refused, and the message says how to trust it.
    for (name, query) in [
        ("system.toml", "sslmode=verify-full".to_string()),
        (
            "other.toml",
            format!("sslmode=verify-full&sslrootcert={other_path}"),
        ),
        // `require` checks the certificate too.
        ("require.toml", "sslmode=require".to_string()),
    ] {
        store_config(&test, name, &url("localhost", &query), None);
        let refused = run(&test, name, &env, &["deals", "list"]);
        assert_refused(
            &refused,
            "the server's certificate was refused",
            &[PASSWORD],
        );
        assert!(
            refused.stderr.contains("sslrootcert="),
            "{}",
            refused.stderr
        );
    }

    // By an address the certificate does not name: verify-full refuses, verify-ca (the chain
    // only) connects.
    store_config(
        &test,
        "by-address.toml",
        &url(
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={ca_path}"),
        ),
        None,
    );
    let refused = run(&test, "by-address.toml", &env, &["deals", "list"]);
    assert_refused(
        &refused,
        "the server's certificate was refused",
        &[PASSWORD],
    );
    assert!(
        refused.stderr.contains("sslmode=verify-ca"),
        "{}",
        refused.stderr
    );
    store_config(
        &test,
        "chain-only.toml",
        &url(
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={ca_path}"),
        ),
        None,
    );
    let listed = run(
        &test,
        "chain-only.toml",
        &env,
        &["deals", "list", "--format", "json"],
    );
    listed.assert_code(0);
    assert_eq!(listed.json().as_array().map(Vec::len), Some(2));
}

#[test]
fn sslmode_require_refuses_a_server_without_tls() {
    let ca = TestCa::new("funnelsync test CA");
    let Some(cluster) = TestCluster::start("sslmode_require_refuses_a_server_without_tls", None)
    else {
        return;
    };
    cluster.create_login("funnelsync", PASSWORD);
    let test = scene(&ca);
    let env = [("FUNNELSYNC_STORE_PASSWORD", PASSWORD)];
    let ca_path = test.path("ca.pem").display().to_string();
    for (name, query) in [
        ("require.toml", "sslmode=require".to_string()),
        (
            "verify.toml",
            format!("sslmode=verify-full&sslrootcert={ca_path}"),
        ),
    ] {
        store_config(
            &test,
            name,
            &format!(
                "postgresql://funnelsync@localhost:{}/funnelsync?{query}",
                cluster.port
            ),
            None,
        );
        let refused = run(&test, name, &env, &["sync"]);
        assert_refused(&refused, "server does not support TLS", &[PASSWORD]);
    }
    // `prefer` (the default) connects without TLS to a server that offers none.
    store_config(
        &test,
        "prefer.toml",
        &format!(
            "postgresql://funnelsync@localhost:{}/funnelsync",
            cluster.port
        ),
        None,
    );
    run(&test, "prefer.toml", &env, &["sync"]).assert_code(0);
}

#[test]
fn check_config_checks_sslmode_and_sslrootcert() {
    let ca = TestCa::new("funnelsync test CA");
    let test = scene(&ca);
    test.write("not-a-cert.pem", "hello\n");
    let ca_path = test.path("ca.pem").display().to_string();
    let cases = [
        (format!("sslmode=verify-full&sslrootcert={ca_path}"), None),
        ("sslmode=verify-ca&sslrootcert=system".to_string(), None),
        (
            "sslmode=verify_full".to_string(),
            Some("sslmode \"verify_full\" is not one funnelsync knows"),
        ),
        (
            "sslmode=verify-full&sslrootcert=ca.pem".to_string(),
            Some("must be an absolute path"),
        ),
        (
            format!(
                "sslmode=verify-full&sslrootcert={}",
                test.path("missing.pem").display()
            ),
            Some("cannot read the certificate authorities of sslrootcert"),
        ),
        (
            format!(
                "sslmode=verify-full&sslrootcert={}",
                test.path("not-a-cert.pem").display()
            ),
            Some("holds no certificate"),
        ),
    ];
    for (query, problem) in cases {
        store_config(
            &test,
            "check.toml",
            &format!("postgresql://funnelsync@db.example/crm?{query}"),
            None,
        );
        let checked = run(&test, "check.toml", &[], &["check-config"]);
        match problem {
            None => {
                checked.assert_code(0);
            }
            Some(problem) => {
                assert_ne!(checked.code, 0, "{query}: {}", checked.stdout);
                let said = format!("{}{}", checked.stdout, checked.stderr);
                assert!(
                    said.contains("store.url") && said.contains(problem),
                    "{query}: says {problem:?}\n{said}"
                );
            }
        }
    }
}
