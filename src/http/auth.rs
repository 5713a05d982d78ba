//! Who is asking and what they may do. Tokens are known only by their SHA-256 (from the config,
//! or hashed from a token file when the server starts); the pages trade a token for a session
//! cookie once; failed logins and bad tokens are rate-limited per client address (a valid token
//! is never refused by the limiter).
//!
//! [`authorize`] is the one place that decides whether a user may do something: every handler of
//! the API and the pages asks it, and nothing else decides. This module must not know about HTTP
//! routes or the store; it decides over plain data.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::config::{HttpConfig, Role, TokenSource};
use crate::deal::{normalize_label, Deal, Field};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("http user \"{user}\": cannot read token_file {path}: {source}")]
    TokenFile {
        user: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("http user \"{user}\": token_file {path} is empty")]
    EmptyTokenFile {
        user: String,
        path: std::path::PathBuf,
    },
    #[error("http users \"{first}\" and \"{second}\" have the same token; give each user a token of their own")]
    SharedToken { first: String, second: String },
    #[error("cannot make a random token: {0}")]
    Random(#[source] getrandom::Error),
}

/// A user as the server knows them (the token is not kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// For role `rep`: the owner name they are.
    pub rep: Option<String>,
    pub hidden_fields: Vec<Field>,
}

impl User {
    /// Whether the user sees (and may change) this field.
    pub fn sees(&self, field: Field) -> bool {
        !self.hidden_fields.contains(&field)
    }

    /// Whether the user is the rep who owns this deal.
    fn owns(&self, deal: &Deal) -> bool {
        self.rep.as_deref().is_some_and(|rep| {
            deal.text(Field::Owner)
                .is_some_and(|owner| normalize_label(owner) == normalize_label(rep))
        })
    }
}

/// Something a user wants to do.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// See this deal (in a list, alone, in the stalled list or the forecast).
    ReadDeal(&'a Deal),
    /// Change this deal (fields or stage).
    ChangeDeal(&'a Deal),
    /// Set a field to a value (`None` clears it), on a deal or a new one.
    SetField(Field, Option<&'a str>),
    /// Create a deal.
    CreateDeal,
    /// See the funnel of one owner, or of everyone (`None`).
    ReadFunnel(Option<&'a str>),
    /// Files, row errors, conflicts, the run history and the status.
    Administer,
    /// Undo a run.
    Undo,
    /// Apply a held file's sync.
    ForceFile,
}

/// Why a user may not do something. A deal the user may not see is not found, so that ids of
/// other reps' deals do not leak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    Forbidden(String),
}

/// The one authorisation rule of the API and the pages:
/// - `admin` sees and changes everything, and alone administers (files, errors, history, undo);
/// - `manager` sees and changes every deal;
/// - `rep` sees and changes only the deals they own, and gives no deal to someone else;
/// - `readonly` sees every deal and changes nothing;
/// - nobody sees or sets a field hidden from them.
pub fn authorize(user: &User, action: Action<'_>) -> Result<(), Refusal> {
    let forbidden = |why: &str| Err(Refusal::Forbidden(why.to_string()));
    match (user.role, action) {
        (Role::Rep, Action::ReadDeal(deal) | Action::ChangeDeal(deal)) if !user.owns(deal) => {
            Err(Refusal::NotFound)
        }
        (_, Action::ReadDeal(_)) => Ok(()),
        (Role::Readonly, Action::ChangeDeal(_) | Action::CreateDeal | Action::SetField(..)) => {
            forbidden("this user may read but not change deals")
        }
        (_, Action::ChangeDeal(_) | Action::CreateDeal) => Ok(()),
        (_, Action::SetField(field, _)) if !user.sees(field) => {
            forbidden(&format!("the field {field} is not shown to this user"))
        }
        (Role::Rep, Action::SetField(Field::Owner, value)) => {
            let own = user.rep.as_deref().map(normalize_label);
            if value.map(normalize_label) == own {
                Ok(())
            } else {
                forbidden("a rep cannot give a deal to someone else")
            }
        }
        (_, Action::SetField(..)) => Ok(()),
        (Role::Rep, Action::ReadFunnel(owner)) => {
            if owner.map(normalize_label) == user.rep.as_deref().map(normalize_label) {
                Ok(())
            } else {
                forbidden("a rep sees only their own funnel")
            }
        }
        (_, Action::ReadFunnel(_)) => Ok(()),
        (Role::Admin, Action::Administer | Action::Undo | Action::ForceFile) => Ok(()),
        (_, Action::Administer | Action::Undo | Action::ForceFile) => {
            forbidden("only an admin may do this")
        }
    }
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// `n_bytes` random bytes as hex.
pub fn random_hex(n_bytes: usize) -> Result<String, AuthError> {
    let mut bytes = vec![0u8; n_bytes];
    getrandom::fill(&mut bytes).map_err(AuthError::Random)?;
    Ok(hex(&bytes))
}

/// A fresh API token: 32 random bytes, as 64 hex digits.
pub fn new_token() -> Result<String, AuthError> {
    random_hex(32)
}

/// The configured users, found by the hash of their token or by name.
#[derive(Debug, Default)]
pub struct Users {
    by_hash: HashMap<[u8; 32], Arc<User>>,
    by_name: HashMap<String, Arc<User>>,
}

impl Users {
    /// Reads the users of `[http]`, hashing the tokens of token files.
    pub fn load(config: &HttpConfig) -> Result<Users, AuthError> {
        let mut users = Users::default();
        for configured in &config.users {
            let hash = match &configured.token {
                TokenSource::Sha256(hash) => *hash,
                TokenSource::File(path) => {
                    let text =
                        std::fs::read_to_string(path).map_err(|source| AuthError::TokenFile {
                            user: configured.name.clone(),
                            path: path.clone(),
                            source,
                        })?;
                    if text.trim().is_empty() {
                        return Err(AuthError::EmptyTokenFile {
                            user: configured.name.clone(),
                            path: path.clone(),
                        });
                    }
                    hash_token(&text)
                }
            };
            let user = Arc::new(User {
                name: configured.name.clone(),
                role: configured.role,
                rep: configured.rep.clone(),
                hidden_fields: configured.hidden_fields.clone(),
            });
            if let Some(other) = users.by_hash.insert(hash, Arc::clone(&user)) {
                return Err(AuthError::SharedToken {
                    first: other.name.clone(),
                    second: user.name.clone(),
                });
            }
            users.by_name.insert(user.name.clone(), user);
        }
        Ok(users)
    }

    pub fn by_token(&self, token: &str) -> Option<Arc<User>> {
        self.by_hash.get(&hash_token(token)).cloned()
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<User>> {
        self.by_name.get(name).cloned()
    }
}

/// A logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    /// The token every form of this session carries.
    pub csrf: String,
    expires: Instant,
}

/// Sessions by the hash of their cookie, in memory (a restart logs everyone out).
#[derive(Debug, Default)]
pub struct Sessions {
    by_hash: Mutex<HashMap<[u8; 32], Session>>,
}

impl Sessions {
    /// Opens a session; returns the cookie value and the session.
    pub fn open(&self, user: &str, ttl: Duration) -> Result<(String, Session), AuthError> {
        let cookie = random_hex(32)?;
        let session = Session {
            user: user.to_string(),
            csrf: random_hex(24)?,
            expires: Instant::now() + ttl,
        };
        let mut sessions = self
            .by_hash
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let now = Instant::now();
        sessions.retain(|_, session| session.expires > now);
        sessions.insert(hash_token(&cookie), session.clone());
        Ok((cookie, session))
    }

    pub fn find(&self, cookie: &str) -> Option<Session> {
        let sessions = self
            .by_hash
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        sessions
            .get(&hash_token(cookie))
            .filter(|session| session.expires > Instant::now())
            .cloned()
    }

    pub fn close(&self, cookie: &str) {
        let mut sessions = self
            .by_hash
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        sessions.remove(&hash_token(cookie));
    }
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same_secret(left: &str, right: &str) -> bool {
    let (left, right) = (hash_token(left), hash_token(right));
    left.iter()
        .zip(right.iter())
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

/// How many failed logins (or bad tokens) one address may make per window.
pub const MAX_FAILURES: u32 = 5;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(600);

/// Failed logins per client address: after [`MAX_FAILURES`] within [`FAILURE_WINDOW`], further
/// failing attempts from that address are refused (429) until the window has passed. Only
/// failures are counted and only failures are refused: a valid token is let in whatever the
/// count of its address, so an attacker sharing an address (a NAT, a proxy) with the team locks
/// nobody out, and a success does not reset the count, so a colleague's login does not give the
/// attacker fresh tries.
#[derive(Debug, Default)]
pub struct LoginLimiter {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl LoginLimiter {
    /// Whether this address has used up its failures: its next failing attempt is refused.
    #[cfg(test)]
    pub fn is_limited(&self, address: IpAddr) -> bool {
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        match failures.get(&address) {
            Some((count, since)) => *count >= MAX_FAILURES && since.elapsed() < FAILURE_WINDOW,
            None => false,
        }
    }

    /// Counts a failed attempt; returns whether the address is limited (the attempt is to be
    /// answered 429 rather than 401).
    pub fn failed(&self, address: IpAddr) -> bool {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if failures.len() > 10_000 {
            failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = failures.entry(address).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        let limited = entry.0 >= MAX_FAILURES;
        entry.0 = entry.0.saturating_add(1);
        limited
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deal::FieldValue;

    fn user(role: Role, rep: Option<&str>, hidden: &[Field]) -> User {
        User {
            name: "someone".to_string(),
            role,
            rep: rep.map(str::to_string),
            hidden_fields: hidden.to_vec(),
        }
    }

    fn deal_of(owner: &str) -> Deal {
        let mut deal = Deal {
            id: 1,
            fields: Default::default(),
            extra: Default::default(),
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            stage_entered_at: None,
            archived_at: None,
        };
        deal.fields
            .insert(Field::Owner, FieldValue::Text(owner.to_string()));
        deal
    }

    /// Every role against every kind of action: what is allowed, what is not found, what is
    /// forbidden.
    #[test]
    fn each_role_may_do_what_the_rules_say() {
        let own = deal_of(" alice wang ");
        let other = deal_of("Bob Li");
        let admin = user(Role::Admin, None, &[]);
        let manager = user(Role::Manager, None, &[]);
        let rep = user(Role::Rep, Some("Alice Wang"), &[Field::Amount]);
        let readonly = user(Role::Readonly, None, &[]);
        #[derive(Debug, PartialEq)]
        enum Want {
            Ok,
            NotFound,
            Forbidden,
        }
        let cases: Vec<(&User, Action<'_>, Want)> = vec![
            (&admin, Action::ReadDeal(&other), Want::Ok),
            (&admin, Action::ChangeDeal(&other), Want::Ok),
            (&admin, Action::Administer, Want::Ok),
            (&admin, Action::Undo, Want::Ok),
            (&admin, Action::ForceFile, Want::Ok),
            (
                &admin,
                Action::SetField(Field::Owner, Some("Bob Li")),
                Want::Ok,
            ),
            (&manager, Action::ReadDeal(&other), Want::Ok),
            (&manager, Action::ChangeDeal(&other), Want::Ok),
            (&manager, Action::CreateDeal, Want::Ok),
            (&manager, Action::ReadFunnel(None), Want::Ok),
            (&manager, Action::Administer, Want::Forbidden),
            (&manager, Action::Undo, Want::Forbidden),
            (&rep, Action::ReadDeal(&own), Want::Ok),
            (&rep, Action::ChangeDeal(&own), Want::Ok),
            (&rep, Action::ReadDeal(&other), Want::NotFound),
            (&rep, Action::ChangeDeal(&other), Want::NotFound),
            (&rep, Action::CreateDeal, Want::Ok),
            (
                &rep,
                Action::SetField(Field::NextStep, Some("call")),
                Want::Ok,
            ),
            (
                &rep,
                Action::SetField(Field::Amount, Some("1")),
                Want::Forbidden,
            ),
            (
                &rep,
                Action::SetField(Field::Owner, Some("alice  wang")),
                Want::Ok,
            ),
            (
                &rep,
                Action::SetField(Field::Owner, Some("Bob Li")),
                Want::Forbidden,
            ),
            (&rep, Action::SetField(Field::Owner, None), Want::Forbidden),
            (&rep, Action::ReadFunnel(Some("Alice Wang")), Want::Ok),
            (&rep, Action::ReadFunnel(None), Want::Forbidden),
            (&rep, Action::ReadFunnel(Some("Bob Li")), Want::Forbidden),
            (&rep, Action::Administer, Want::Forbidden),
            (&readonly, Action::ReadDeal(&other), Want::Ok),
            (&readonly, Action::ChangeDeal(&other), Want::Forbidden),
            (&readonly, Action::CreateDeal, Want::Forbidden),
            (
                &readonly,
                Action::SetField(Field::NextStep, None),
                Want::Forbidden,
            ),
            (&readonly, Action::ReadFunnel(None), Want::Ok),
            (&readonly, Action::ForceFile, Want::Forbidden),
        ];
        for (user, action, want) in cases {
            let got = match authorize(user, action) {
                Ok(()) => Want::Ok,
                Err(Refusal::NotFound) => Want::NotFound,
                Err(Refusal::Forbidden(_)) => Want::Forbidden,
            };
            assert_eq!(got, want, "{:?} {action:?}", user.role);
        }
    }

    #[test]
    fn a_rep_without_a_name_owns_nothing() {
        let nameless = user(Role::Rep, None, &[]);
        assert_eq!(
            authorize(&nameless, Action::ReadDeal(&deal_of(""))),
            Err(Refusal::NotFound)
        );
    }

    #[test]
    fn failed_logins_are_limited_per_address() {
        let limiter = LoginLimiter::default();
        let address: IpAddr = [127, 0, 0, 1].into();
        let other: IpAddr = [127, 0, 0, 2].into();
        for _ in 0..MAX_FAILURES {
            assert!(!limiter.is_limited(address));
            assert!(!limiter.failed(address));
        }
        assert!(limiter.is_limited(address));
        assert!(limiter.failed(address), "the sixth failure is refused");
        assert!(!limiter.is_limited(other));
    }

    #[test]
    fn tokens_and_sessions() {
        let token = new_token().expect("token");
        assert_eq!(token.len(), 64);
        assert_ne!(token, new_token().expect("token"));
        assert!(same_secret(&token, &token));
        assert!(!same_secret(&token, "x"));
        let sessions = Sessions::default();
        let (cookie, session) = sessions
            .open("alice", Duration::from_secs(60))
            .expect("session");
        assert_eq!(
            sessions.find(&cookie).map(|found| found.user),
            Some("alice".to_string())
        );
        assert_eq!(session.csrf.len(), 48);
        sessions.close(&cookie);
        assert!(sessions.find(&cookie).is_none());
    }
}
