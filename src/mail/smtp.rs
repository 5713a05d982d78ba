//! The SMTP transport (lettre over tokio and rustls): built from `[smtp]`, with the password read
//! from a file, the environment or a systemd credential when mail is sent, and one message sent
//! with a timeout around the whole exchange.
//!
//! The password never appears in a log line or an error message, and neither does a server's
//! reply that could repeat the login ([`redact_reply`]).

use std::time::Duration;

use lettre::message::{header::ContentType, Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message as Email, Tokio1Executor};

use super::Message;
use crate::config::{SmtpConfig, SmtpSecurity};

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("cannot read the SMTP password from {path}: {source}")]
    Password {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("an SMTP username is set but no password was found (password_file, FUNNELSYNC_SMTP_PASSWORD or the smtp-password credential)")]
    NoPassword,
    #[error("invalid address {address}: {source}")]
    Address {
        address: String,
        #[source]
        source: lettre::address::AddressError,
    },
    #[error("cannot build the message: {source}")]
    Build {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot set up the SMTP connection to {host}: {source}")]
    Transport {
        host: String,
        #[source]
        source: lettre::transport::smtp::Error,
    },
    /// No answer, or a broken exchange. The server's error is kept as text with the credentials
    /// taken out ([`redact_reply`]), never as the error itself, which could repeat the login.
    #[error("sending to {recipient} failed: {message}")]
    Send { recipient: String, message: String },
    /// The server answered with a refusal: `permanent` for a 5xx reply (sending it again will
    /// not help), else a 4xx reply (try again later). Its reply is kept as redacted text, like
    /// [`MailError::Send`]'s.
    #[error("the mail server refused the message to {recipient}: {message}")]
    Refused {
        recipient: String,
        message: String,
        permanent: bool,
    },
    #[error("sending to {recipient} timed out after {timeout:?}")]
    Timeout {
        recipient: String,
        timeout: Duration,
    },
}

/// The password, wherever the admin put it. Read when mail is sent, never stored in the config.
fn password(smtp: &SmtpConfig) -> Result<Option<String>, MailError> {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|text| text.trim_end_matches(['\r', '\n']).to_string())
            .map_err(|source| MailError::Password {
                path: path.display().to_string(),
                source,
            })
    };
    if let Some(path) = &smtp.password_file {
        return read(path).map(Some);
    }
    if let Ok(password) = std::env::var("FUNNELSYNC_SMTP_PASSWORD") {
        return Ok(Some(password));
    }
    if let Some(folder) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let path = std::path::Path::new(&folder).join("smtp-password");
        if path.is_file() {
            return read(&path).map(Some);
        }
    }
    Ok(None)
}

impl MailError {
    /// Whether the server said no for good (a 5xx reply): retrying the same message is useless.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            MailError::Refused {
                permanent: true,
                ..
            }
        )
    }
}

/// A ready SMTP transport.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    timeout: Duration,
    /// The forms the credentials take on the wire, to keep them out of error messages.
    secrets: Vec<String>,
}

/// SMTP reply codes a server gives to the AUTH exchange (RFC 4954 and RFC 5321): a reply with
/// one of them may quote the command it answers, base64 credentials included.
const AUTH_REPLY_CODES: [&str; 10] = [
    "432", "454", "500", "501", "502", "504", "530", "534", "535", "538",
];

/// What funnelsync keeps of an SMTP error: the error with every form of the credentials taken
/// out, and — when a login was sent and the reply code is one the AUTH exchange gives — without
/// the server's text at all, since a server may repeat the AUTH line in its error.
pub fn redact_reply(error_text: &str, secrets: &[String]) -> String {
    let mut text = error_text.to_string();
    for secret in secrets.iter().filter(|secret| secret.len() >= 4) {
        text = text.replace(secret.as_str(), "[redacted]");
    }
    if secrets.is_empty() {
        return text;
    }
    let code = AUTH_REPLY_CODES
        .iter()
        .find(|code| text.contains(&format!("({code})")));
    match (code, text.split_once("): ")) {
        (Some(_), Some((head, _))) => {
            format!("{head}): the server's reply is not kept, as it may repeat the login")
        }
        _ => text,
    }
}

/// The forms a username and password take in the AUTH exchange: the password itself, and the
/// base64 of the PLAIN and LOGIN responses.
fn credential_forms(username: &str, password: &str) -> Vec<String> {
    use base64::Engine;
    let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    vec![
        password.to_string(),
        encode(format!("\0{username}\0{password}").as_bytes()),
        encode(format!("{username}\0{password}").as_bytes()),
        encode(password.as_bytes()),
    ]
}

impl Mailer {
    pub fn new(smtp: &SmtpConfig) -> Result<Mailer, MailError> {
        let transport_error = |source: lettre::transport::smtp::Error| MailError::Transport {
            host: smtp.host.clone(),
            source,
        };
        let mut builder = match smtp.security {
            SmtpSecurity::None => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(smtp.host.as_str())
            }
            SmtpSecurity::StartTls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)
                    .map_err(transport_error)?
            }
            SmtpSecurity::Tls => {
                AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host).map_err(transport_error)?
            }
        }
        .port(smtp.port)
        .timeout(Some(smtp.timeout));
        let mut secrets = Vec::new();
        if let Some(username) = &smtp.username {
            let password = password(smtp)?.ok_or(MailError::NoPassword)?;
            secrets = credential_forms(username, &password);
            builder = builder.credentials(Credentials::new(username.clone(), password));
        }
        let from = smtp
            .from
            .parse::<Mailbox>()
            .map_err(|source| MailError::Address {
                address: smtp.from.clone(),
                source,
            })?;
        Ok(Mailer {
            transport: builder.build(),
            from,
            timeout: smtp.timeout,
            secrets,
        })
    }

    /// Sends one multipart (text + HTML) message, with an optional .xlsx attachment.
    pub async fn send(
        &self,
        message: &Message,
        attachment: Option<(&str, &[u8])>,
    ) -> Result<(), MailError> {
        let recipient = message.recipient.as_str();
        let to = recipient
            .parse::<Mailbox>()
            .map_err(|source| MailError::Address {
                address: recipient.to_string(),
                source,
            })?;
        let email = Email::builder()
            .from(self.from.clone())
            .to(to)
            .subject(message.subject.as_str())
            .multipart({
                let alternative = MultiPart::alternative()
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_PLAIN)
                            .body(message.text.clone()),
                    )
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_HTML)
                            .body(message.html.clone()),
                    );
                match attachment {
                    None => alternative,
                    Some((name, bytes)) => {
                        let content_type = ContentType::parse(
                            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                        )
                        .map_err(|error| MailError::Build {
                            source: Box::new(error),
                        })?;
                        MultiPart::mixed().multipart(alternative).singlepart(
                            Attachment::new(name.to_string()).body(bytes.to_vec(), content_type),
                        )
                    }
                }
            })
            .map_err(|error| MailError::Build {
                source: Box::new(error),
            })?;
        // lettre's own timeout covers connecting only; this one covers the whole exchange.
        match tokio::time::timeout(self.timeout, self.transport.send(email)).await {
            Ok(Ok(_)) => Ok(()),
            // A 4xx or 5xx reply (to the end of the data, or to the sender or a recipient) is an
            // answer, not a lost connection: say which kind it is.
            Ok(Err(error)) if error.is_permanent() || error.is_transient() => {
                Err(MailError::Refused {
                    recipient: recipient.to_string(),
                    message: redact_reply(&error.to_string(), &self.secrets),
                    permanent: error.is_permanent(),
                })
            }
            Ok(Err(error)) => Err(MailError::Send {
                recipient: recipient.to_string(),
                message: redact_reply(&error.to_string(), &self.secrets),
            }),
            Err(_) => Err(MailError::Timeout {
                recipient: recipient.to_string(),
                timeout: self.timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_replies_and_credentials_never_reach_a_message() {
        let secrets = credential_forms("alice", "s3cret-pass");
        let plain = secrets[1].clone();
        let echoed =
            format!("permanent error (535): 5.7.8 Authentication failed: AUTH PLAIN {plain}");
        let kept = redact_reply(&echoed, &secrets);
        assert!(
            !kept.contains(&plain) && !kept.contains("Authentication failed"),
            "{kept}"
        );
        assert!(kept.contains("535"), "{kept}");
        let partial = format!(
            "transient error (451): try later, you said {}",
            &plain[..10]
        );
        assert_eq!(
            redact_reply(&partial, &secrets),
            partial,
            "other replies are kept"
        );
        let leaked = "permanent error (550): no such user; password s3cret-pass".to_string();
        assert!(!redact_reply(&leaked, &secrets).contains("s3cret-pass"));
        // Without a login, nothing is secret.
        assert_eq!(redact_reply(&echoed, &[]), echoed);
    }
}
