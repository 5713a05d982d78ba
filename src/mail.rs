//! Sending mail over SMTP with lettre (tokio, rustls): the transport built from `[smtp]`, the
//! password read from a file, the environment or a systemd credential at send time, and one
//! message sent with a timeout.
//!
//! This module must not decide what to send or when; it only sends. The password never appears
//! in a log line or an error message.

use std::time::Duration;

use lettre::message::{header::ContentType, Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::{SmtpConfig, SmtpSecurity};

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("cannot read the SMTP password from {path}: {message}")]
    Password { path: String, message: String },
    #[error("an SMTP username is set but no password was found (password_file, FUNNELSYNC_SMTP_PASSWORD or the smtp-password credential)")]
    NoPassword,
    #[error("invalid address {address}: {message}")]
    Address { address: String, message: String },
    #[error("cannot build the message: {0}")]
    Build(String),
    #[error("cannot set up the SMTP connection to {host}: {message}")]
    Transport { host: String, message: String },
    #[error("sending to {recipient} failed: {message}")]
    Send { recipient: String, message: String },
    /// The server answered with a refusal: `permanent` for a 5xx reply (sending it again will
    /// not help), else a 4xx reply (try again later).
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
            .map_err(|error| MailError::Password {
                path: path.display().to_string(),
                message: error.to_string(),
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
    host: String,
    timeout: Duration,
}

impl Mailer {
    pub fn new(smtp: &SmtpConfig) -> Result<Mailer, MailError> {
        let transport_error = |error: lettre::transport::smtp::Error| MailError::Transport {
            host: smtp.host.clone(),
            message: error.to_string(),
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
        if let Some(username) = &smtp.username {
            let password = password(smtp)?.ok_or(MailError::NoPassword)?;
            builder = builder.credentials(Credentials::new(username.clone(), password));
        }
        let from = smtp
            .from
            .parse::<Mailbox>()
            .map_err(|error| MailError::Address {
                address: smtp.from.clone(),
                message: error.to_string(),
            })?;
        Ok(Mailer {
            transport: builder.build(),
            from,
            host: smtp.host.clone(),
            timeout: smtp.timeout,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Sends one multipart (text + HTML) message, with an optional .xlsx attachment.
    pub async fn send(
        &self,
        recipient: &str,
        subject: &str,
        text: &str,
        html: &str,
        attachment: Option<(&str, &[u8])>,
    ) -> Result<(), MailError> {
        let to = recipient
            .parse::<Mailbox>()
            .map_err(|error| MailError::Address {
                address: recipient.to_string(),
                message: error.to_string(),
            })?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .multipart({
                let alternative = MultiPart::alternative()
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_PLAIN)
                            .body(text.to_string()),
                    )
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_HTML)
                            .body(html.to_string()),
                    );
                match attachment {
                    None => alternative,
                    Some((name, bytes)) => {
                        let content_type = ContentType::parse(
                            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                        )
                        .map_err(|error| MailError::Build(error.to_string()))?;
                        MultiPart::mixed().multipart(alternative).singlepart(
                            Attachment::new(name.to_string()).body(bytes.to_vec(), content_type),
                        )
                    }
                }
            })
            .map_err(|error| MailError::Build(error.to_string()))?;
        // lettre's own timeout covers connecting only; this one covers the whole exchange.
        match tokio::time::timeout(self.timeout, self.transport.send(message)).await {
            Ok(Ok(_)) => Ok(()),
            // A 4xx or 5xx reply (to the end of the data, or to the sender or a recipient) is an
            // answer, not a lost connection: say which kind it is.
            Ok(Err(error)) if error.is_permanent() || error.is_transient() => {
                Err(MailError::Refused {
                    recipient: recipient.to_string(),
                    message: error.to_string(),
                    permanent: error.is_permanent(),
                })
            }
            Ok(Err(error)) => Err(MailError::Send {
                recipient: recipient.to_string(),
                message: error.to_string(),
            }),
            Err(_) => Err(MailError::Timeout {
                recipient: recipient.to_string(),
                timeout: self.timeout,
            }),
        }
    }
}
