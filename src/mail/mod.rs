//! Mail: every message funnelsync sends — reminders, escalations, the weekly digest, alerts — goes
//! through the outbox ([`outbox`]), which records it as pending in the store before the SMTP
//! transport ([`Mailer`]) sends it, so a restart neither loses nor repeats a message.
//!
//! This module must not decide what to send, to whom or when: reminders (`remind`), the report
//! and alerts build the [`Message`]s; it records and sends them. The SMTP password never appears
//! in a log line, an error message or the store.

pub mod outbox;
mod smtp;

pub use smtp::Mailer;

/// A message ready to record and send: its recipient, subject, and the same content as plain text
/// and as HTML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub recipient: String,
    pub subject: String,
    pub text: String,
    pub html: String,
}
