//! `[http]` validated: where the API and pages listen, TLS, the users with their roles and token
//! hashes, and the fields each role or user does not see.
//!
//! Tokens are never in the config in clear: `token_sha256` holds a hash, `token_file` names a
//! file the server reads when it starts. This module checks the shape of both; it does not read
//! token files (that is `http::auth`, and `check-config` warns about them).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{RawHttp, RawHttpUser};
use super::validate::{parse_duration, resolve};
use super::Language;
use crate::deal::Field;

/// What a user may do; see `http::auth::authorize` for the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Admin,
    Manager,
    Rep,
    Readonly,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Manager, Role::Rep, Role::Readonly];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Manager => "manager",
            Role::Rep => "rep",
            Role::Readonly => "readonly",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == name)
    }
}

/// Where a user's token is checked against.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The SHA-256 of the token.
    Sha256([u8; 32]),
    /// A file holding the token itself, read when the server starts.
    File(PathBuf),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Sha256(_) => formatter.write_str("Sha256(..)"),
            TokenSource::File(path) => formatter.debug_tuple("File").field(path).finish(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUser {
    pub name: String,
    pub role: Role,
    /// For role `rep`: the owner name they are in the sheets.
    pub rep: Option<String>,
    pub token: TokenSource,
    /// Fields this user does not see or change: their own list, else their role's.
    pub hidden_fields: Vec<Field>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// The pages' language; `None`: by each browser's `Accept-Language`.
    pub language: Option<Language>,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub session_ttl: Duration,
    /// Whether the session cookie is marked `Secure` (only sent over HTTPS, or to localhost).
    pub secure_cookie: bool,
    /// Reverse proxies whose `X-Forwarded-For` names the client (for the login limiter).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    pub users: Vec<HttpUser>,
}

/// The default address: loopback only, for a reverse proxy in front.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8750";

/// Parses a hex SHA-256 (64 hex digits, either case).
pub fn parse_sha256(written: &str) -> Option<[u8; 32]> {
    let written = written.trim();
    if written.len() != 64 || !written.is_ascii() {
        return None;
    }
    let mut hash = [0u8; 32];
    for (index, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&written[index * 2..index * 2 + 2], 16).ok()?;
    }
    Some(hash)
}

fn fields(
    key: &str,
    names: &[String],
    problem: &mut impl FnMut(&str, String),
) -> Option<Vec<Field>> {
    let mut fields = Vec::new();
    let mut ok = true;
    for name in names {
        match Field::from_name(name.trim()) {
            Some(field) => fields.push(field),
            None => {
                problem(
                    key,
                    format!(
                        "\"{name}\" is not a field ({})",
                        super::source::field_list()
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(fields)
}

pub(super) fn validate_http(
    raw: RawHttp,
    base: &Path,
    problem: &mut impl FnMut(&str, String),
) -> Option<HttpConfig> {
    let mut ok = true;
    let mut fail = |key: &str, message: String| {
        problem(key, message);
        ok = false;
    };
    let listen = validate_listen(raw.listen, &mut fail);
    let tls = validate_tls(raw.tls_cert, raw.tls_key, base, &mut fail);
    let language = validate_language(raw.language.as_deref(), &mut fail);
    let request_timeout = validate_duration(
        "http.request_timeout",
        raw.request_timeout,
        30,
        600,
        &mut fail,
    );
    let session_ttl = validate_duration(
        "http.session_ttl",
        raw.session_ttl,
        12 * 3600,
        30 * 86400,
        &mut fail,
    );
    let max_body_bytes = validate_max_body(raw.max_body_kb, &mut fail);
    let role_hidden = validate_role_hidden(raw.hidden_fields.unwrap_or_default(), &mut fail);
    let trusted_proxies =
        validate_trusted_proxies(raw.trusted_proxies.unwrap_or_default(), &mut fail);
    let users = validate_users(raw.users, base, &role_hidden, &mut fail);
    let http = HttpConfig {
        listen,
        tls,
        language,
        request_timeout,
        max_body_bytes,
        session_ttl,
        secure_cookie: raw.secure_cookie.unwrap_or(true),
        trusted_proxies,
        users,
    };
    ok.then_some(http)
}

/// `listen`, [`DEFAULT_LISTEN`] when not given (and after a mistake, which is reported).
fn validate_listen(written: Option<String>, fail: &mut impl FnMut(&str, String)) -> SocketAddr {
    let listen_text = written.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    match listen_text.trim().parse::<SocketAddr>() {
        Ok(listen) => listen,
        Err(_) => {
            fail(
                "http.listen",
                format!("\"{listen_text}\" is not an address and port such as \"127.0.0.1:8750\" or \"[::1]:8750\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 8750))
        }
    }
}

/// `tls_cert` and `tls_key`, which come together or not at all.
fn validate_tls(
    cert: Option<String>,
    key: Option<String>,
    base: &Path,
    fail: &mut impl FnMut(&str, String),
) -> Option<TlsFiles> {
    match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: resolve(base, &cert),
            key: resolve(base, &key),
        }),
        (Some(_), None) => {
            fail("http.tls_cert", "needs `tls_key` beside it".to_string());
            None
        }
        (None, Some(_)) => {
            fail("http.tls_key", "needs `tls_cert` beside it".to_string());
            None
        }
    }
}

/// `language`: `None` for `auto` (the browser's choice).
fn validate_language(
    written: Option<&str>,
    fail: &mut impl FnMut(&str, String),
) -> Option<Language> {
    match written {
        None | Some("auto") => None,
        Some("en") => Some(Language::English),
        Some("zh") => Some(Language::Chinese),
        Some(other) => {
            fail(
                "http.language",
                format!("\"{other}\" is not one of auto, en, zh"),
            );
            None
        }
    }
}

/// A duration of `[http]` in seconds, at most `longest`; `default` when not given, zero or wrong.
fn validate_duration(
    key: &str,
    written: Option<String>,
    default: u64,
    longest: u64,
    fail: &mut impl FnMut(&str, String),
) -> Duration {
    match written {
        None => Duration::from_secs(default),
        Some(written) => parse_duration(key, &written, Duration::from_secs(longest), fail)
            .filter(|duration| !duration.is_zero())
            .unwrap_or(Duration::from_secs(default)),
    }
}

/// `max_body_kb` in bytes: 64 KiB unless given, 10 MiB at most.
fn validate_max_body(written: Option<i64>, fail: &mut impl FnMut(&str, String)) -> usize {
    match written {
        None => 64 * 1024,
        Some(kilobytes) if (1..=10 * 1024).contains(&kilobytes) => kilobytes as usize * 1024,
        Some(kilobytes) => {
            fail(
                "http.max_body_kb",
                format!("{kilobytes} must be between 1 and 10240"),
            );
            64 * 1024
        }
    }
}

/// `hidden_fields`: the fields each role does not see, by role.
fn validate_role_hidden(
    written: BTreeMap<String, Vec<String>>,
    fail: &mut impl FnMut(&str, String),
) -> BTreeMap<Role, Vec<Field>> {
    let mut role_hidden = BTreeMap::new();
    for (role_name, names) in written {
        let key = format!("http.hidden_fields.{role_name}");
        let Some(role) = Role::from_name(&role_name) else {
            fail(
                &key,
                format!("\"{role_name}\" is not a role (admin, manager, rep, readonly)"),
            );
            continue;
        };
        if let Some(fields) = fields(&key, &names, fail) {
            role_hidden.insert(role, fields);
        }
    }
    role_hidden
}

/// `trusted_proxies`: the addresses whose `X-Forwarded-For` is believed.
fn validate_trusted_proxies(
    written: Vec<String>,
    fail: &mut impl FnMut(&str, String),
) -> Vec<std::net::IpAddr> {
    let mut trusted_proxies = Vec::new();
    for written in written {
        match written.trim().parse::<std::net::IpAddr>() {
            Ok(address) => trusted_proxies.push(address),
            Err(_) => fail(
                "http.trusted_proxies",
                format!("\"{written}\" is not an IP address such as \"127.0.0.1\" or \"::1\""),
            ),
        }
    }
    trusted_proxies
}

/// `[[http.users]]`: every user without a mistake, names and tokens each used once.
fn validate_users(
    raw_users: Vec<RawHttpUser>,
    base: &Path,
    role_hidden: &BTreeMap<Role, Vec<Field>>,
    fail: &mut impl FnMut(&str, String),
) -> Vec<HttpUser> {
    // "No users" is said only when none was written: a user with a mistake is reported as such.
    let none_written = raw_users.is_empty();
    let mut users: Vec<HttpUser> = Vec::new();
    let mut seen_hashes: BTreeMap<[u8; 32], String> = BTreeMap::new();
    for raw_user in raw_users {
        if let Some(user) =
            validate_user(raw_user, base, &users, &mut seen_hashes, role_hidden, fail)
        {
            users.push(user);
        }
    }
    if users.is_empty() && none_written {
        fail(
            "http",
            "has no [[http.users]]: add one (see `funnelsync token new NAME`), or remove [http]"
                .to_string(),
        );
    }
    users
}

/// One `[[http.users]]` entry; `None` when it cannot be used (every mistake is reported, and
/// the name, role and rep are checked even when the token is wrong).
fn validate_user(
    raw_user: RawHttpUser,
    base: &Path,
    users: &[HttpUser],
    seen_hashes: &mut BTreeMap<[u8; 32], String>,
    role_hidden: &BTreeMap<Role, Vec<Field>>,
    fail: &mut impl FnMut(&str, String),
) -> Option<HttpUser> {
    let key = format!("http.users[{}]", raw_user.position);
    let name = raw_user.name.trim().to_string();
    if name.is_empty() {
        fail(&format!("{key}.name"), "must not be empty".to_string());
    } else if users.iter().any(|user| user.name == name) {
        fail(
            &format!("{key}.name"),
            format!("\"{name}\" is already the name of another user"),
        );
    }
    let Some(role) = Role::from_name(raw_user.role.trim()) else {
        fail(
            &format!("{key}.role"),
            format!(
                "\"{}\" is not one of admin, manager, rep, readonly",
                raw_user.role
            ),
        );
        return None;
    };
    let rep = raw_user
        .rep
        .map(|rep| rep.trim().to_string())
        .filter(|rep| !rep.is_empty());
    match (role, &rep) {
        (Role::Rep, None) => fail(
            &format!("{key}.rep"),
            "a user with role \"rep\" needs `rep`: the owner name they are in the sheets"
                .to_string(),
        ),
        (Role::Admin | Role::Manager | Role::Readonly, Some(_)) => fail(
            &format!("{key}.rep"),
            format!(
                "only a user with role \"rep\" has `rep` (this one is \"{}\")",
                role.name()
            ),
        ),
        _ => {}
    }
    let token = validate_token(
        &key,
        &name,
        raw_user.token_sha256,
        raw_user.token_file,
        base,
        seen_hashes,
        fail,
    );
    let hidden_fields = match raw_user.hidden_fields {
        Some(names) => fields(&format!("{key}.hidden_fields"), &names, fail),
        None => Some(role_hidden.get(&role).cloned().unwrap_or_default()),
    };
    Some(HttpUser {
        name,
        role,
        rep,
        token: token?,
        hidden_fields: hidden_fields?,
    })
}

/// A user's `token_sha256` or `token_file` (one of them), a hash no other user has.
fn validate_token(
    key: &str,
    name: &str,
    sha256: Option<String>,
    file: Option<String>,
    base: &Path,
    seen_hashes: &mut BTreeMap<[u8; 32], String>,
    fail: &mut impl FnMut(&str, String),
) -> Option<TokenSource> {
    match (sha256, file) {
        (Some(hash), None) => match parse_sha256(&hash) {
            Some(hash) => {
                if let Some(other) = seen_hashes.insert(hash, name.to_string()) {
                    fail(
                        &format!("{key}.token_sha256"),
                        format!("is the same token as user \"{other}\"'s; give each user a token of their own"),
                    );
                }
                Some(TokenSource::Sha256(hash))
            }
            None => {
                // The value is a secret's hash (or a token pasted by mistake): never repeat it.
                fail(
                    &format!("{key}.token_sha256"),
                    "must be 64 hex digits, as printed by `funnelsync token new NAME`".to_string(),
                );
                None
            }
        },
        (None, Some(file)) => Some(TokenSource::File(resolve(base, &file))),
        (Some(_), Some(_)) => {
            fail(
                &format!("{key}.token_file"),
                "give `token_sha256` or `token_file`, not both".to_string(),
            );
            None
        }
        (None, None) => {
            fail(
                key,
                "needs `token_sha256` (see `funnelsync token new NAME`) or `token_file`"
                    .to_string(),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(http: &str) -> Result<Vec<HttpUser>, String> {
        let text = format!(
            "[store]\npath = \"crm.db\"\n[[sources]]\nname = \"p\"\npath = \"p.csv\"\n{http}"
        );
        crate::config::Config::from_text(&text, Path::new("/tmp/funnelsync.toml"))
            .map(|config| config.http.map(|http| http.users).unwrap_or_default())
            .map_err(|error| error.to_string())
    }

    #[test]
    fn a_user_hides_the_fields_of_their_role_unless_they_list_their_own() {
        let hash = "ab".repeat(32);
        let other = "cd".repeat(32);
        let found = users(&format!(
            "[http]\nhidden_fields = {{ rep = [\"amount\", \"phone\"] }}\n             [[http.users]]\nname = \"a\"\nrole = \"rep\"\nrep = \"A\"\ntoken_sha256 = \"{hash}\"\n             [[http.users]]\nname = \"b\"\nrole = \"rep\"\nrep = \"B\"\ntoken_sha256 = \"{other}\"\nhidden_fields = []\n"
        ))
        .expect("valid");
        assert_eq!(found[0].hidden_fields, [Field::Amount, Field::Phone]);
        assert!(found[1].hidden_fields.is_empty());
    }

    #[test]
    fn the_same_token_for_two_users_is_refused() {
        let hash = "ab".repeat(32);
        let problems = users(&format!(
            "[http]\n[[http.users]]\nname = \"a\"\nrole = \"admin\"\ntoken_sha256 = \"{hash}\"\n             [[http.users]]\nname = \"b\"\nrole = \"readonly\"\ntoken_sha256 = \"{hash}\"\n"
        ))
        .expect_err("refused");
        assert!(
            problems.contains("`http.users[2].token_sha256`"),
            "{problems}"
        );
        assert!(
            !problems.contains(&hash),
            "the hash is not repeated: {problems}"
        );
    }

    #[test]
    fn sha256_is_parsed_from_hex_only() {
        let cases: [(&str, bool); 5] = [
            (&"ab".repeat(32), true),
            (&"AB".repeat(32), true),
            (&"ab".repeat(31), false),
            (&"zz".repeat(32), false),
            (&"é".repeat(32), false),
        ];
        for (written, valid) in cases {
            assert_eq!(parse_sha256(written).is_some(), valid, "{written}");
        }
    }
}
