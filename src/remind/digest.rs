//! The reminder emails: one digest per rep (their stalled deals, worst first) and one escalation
//! digest for the manager (escalated deals by rep), each as plain text and HTML, in English or
//! Chinese. Pure: deals and stalls in, texts out. Every value from a sheet is escaped in the HTML
//! and stripped of line breaks in the text, so a name cannot break the markup or the layout; the
//! subject carries no sheet values at all.

use crate::config::Language;
use crate::deal::{format_amount, Deal, Field};
use crate::mail::Message;

use super::Stall;

/// One line of a digest.
#[derive(Debug, Clone)]
pub struct DigestLine<'a> {
    pub deal: &'a Deal,
    pub stall: &'a Stall,
    /// The file that shows the deal, if any.
    pub file: Option<String>,
}

struct Words {
    columns: [&'static str; 8],
    greeting: &'static str,
    intro: &'static str,
    escalation_intro: &'static str,
    owner: &'static str,
    never: &'static str,
    footer: &'static str,
}

fn words(language: Language) -> Words {
    match language {
        Language::English => Words {
            columns: [
                "Company",
                "Contact",
                "Stage",
                "Days in stage",
                "Last contact",
                "Amount",
                "Next step",
                "File",
            ],
            greeting: "Hello",
            intro: "These deals have been in their stage longer than the funnel allows:",
            escalation_intro: "These deals are still stalled after repeated reminders:",
            owner: "Owner",
            never: "never",
            footer:
                "Sent by funnelsync. Update the deal in your spreadsheet and this reminder stops.",
        },
        Language::Chinese => Words {
            columns: [
                "公司",
                "联系人",
                "阶段",
                "停留天数",
                "最近联系",
                "金额",
                "下一步",
                "文件",
            ],
            greeting: "您好",
            intro: "以下商机在当前阶段停留的时间已超过规定：",
            escalation_intro: "以下商机多次提醒后仍未推进：",
            owner: "负责人",
            never: "无",
            footer: "由 funnelsync 发送。在表格中更新商机后，提醒即会停止。",
        },
    }
}

pub fn subject(language: Language, n_deals: usize, escalation: bool) -> String {
    match (language, escalation) {
        (Language::English, false) if n_deals == 1 => "1 deal needs follow-up".to_string(),
        (Language::English, false) => format!("{n_deals} deals need follow-up"),
        (Language::English, true) if n_deals == 1 => {
            "Escalation: 1 deal is still stalled".to_string()
        }
        (Language::English, true) => format!("Escalation: {n_deals} deals are still stalled"),
        (Language::Chinese, false) => format!("{n_deals} 个商机需要跟进"),
        (Language::Chinese, true) => format!("升级提醒：{n_deals} 个商机仍停滞"),
    }
}

/// Text from a sheet made safe for one line of plain text.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|character| {
            if character.is_control() {
                ' '
            } else {
                character
            }
        })
        .collect::<String>()
        .trim()
        .to_string()
}

fn html(text: &str) -> String {
    html_escape::encode_safe(&one_line(text)).into_owned()
}

fn cells(line: &DigestLine<'_>, words: &Words) -> [String; 8] {
    let text = |field: Field| {
        line.deal
            .fields
            .get(&field)
            .map(|value| value.to_string())
            .unwrap_or_default()
    };
    let amount = match (
        line.deal
            .fields
            .get(&Field::Amount)
            .and_then(|value| value.as_amount()),
        line.deal.text(Field::Currency),
    ) {
        (Some(amount), Some(currency)) => format!(
            "{} {currency}",
            crate::text::group_thousands(&format_amount(amount))
        ),
        (Some(amount), None) => crate::text::group_thousands(&format_amount(amount)),
        _ => String::new(),
    };
    let last_contact = match (
        line.deal.text(Field::LastContact),
        line.stall.last_contact_days,
    ) {
        (Some(day), Some(days)) => format!("{day} ({days})"),
        _ => words.never.to_string(),
    };
    [
        text(Field::Company),
        text(Field::Contact),
        line.stall.stage.clone(),
        line.stall
            .days_in_stage
            .map(|days| days.to_string())
            .unwrap_or_else(|| "?".to_string()),
        last_contact,
        amount,
        text(Field::NextStep),
        line.file.as_deref().map(file_name).unwrap_or_default(),
    ]
}

fn file_name(path: &str) -> String {
    std::path::Path::new(path)
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

fn text_table(lines: &[DigestLine<'_>], words: &Words) -> String {
    let mut out = String::new();
    for line in lines {
        let [company, contact, stage, days, last_contact, amount, next_step, file] =
            cells(line, words);
        out.push_str(&format!(
            "* {} — {}\n",
            one_line(&company),
            one_line(&contact)
        ));
        out.push_str(&format!(
            "  {}: {} | {}: {} | {}: {}\n",
            words.columns[2], stage, words.columns[3], days, words.columns[4], last_contact
        ));
        if !amount.is_empty() {
            out.push_str(&format!("  {}: {}\n", words.columns[5], amount));
        }
        if !next_step.is_empty() {
            out.push_str(&format!(
                "  {}: {}\n",
                words.columns[6],
                one_line(&next_step)
            ));
        }
        if !file.is_empty() {
            out.push_str(&format!("  {}: {}\n", words.columns[7], one_line(&file)));
        }
        out.push_str(&format!("  ({})\n", line.stall.reason));
    }
    out
}

fn html_table(lines: &[DigestLine<'_>], words: &Words) -> String {
    let mut out = String::from("<table cellpadding=\"4\" style=\"border-collapse:collapse\"><tr>");
    for column in words.columns {
        out.push_str(&format!(
            "<th style=\"text-align:left;border-bottom:1px solid #999\">{column}</th>"
        ));
    }
    out.push_str("</tr>\n");
    for line in lines {
        out.push_str("<tr>");
        for cell in cells(line, words) {
            out.push_str(&format!("<td>{}</td>", html(&cell)));
        }
        out.push_str(&format!(
            "</tr>\n<tr><td colspan=\"8\" style=\"color:#666\">{}</td></tr>\n",
            html(&line.stall.reason)
        ));
    }
    out.push_str("</table>");
    out
}

/// A rep's digest of their stalled deals (already sorted worst first).
pub fn rep_digest(
    language: Language,
    recipient: &str,
    owner: &str,
    lines: &[DigestLine<'_>],
) -> Message {
    let words = words(language);
    let greeting = format!("{} {},", words.greeting, one_line(owner));
    let text = format!(
        "{greeting}\n\n{}\n\n{}\n{}\n",
        words.intro,
        text_table(lines, &words),
        words.footer
    );
    let html = format!(
        "<!DOCTYPE html><html><body><p>{}</p><p>{}</p>{}<p style=\"color:#666\">{}</p></body></html>",
        html(&greeting),
        words.intro,
        html_table(lines, &words),
        words.footer
    );
    Message {
        recipient: recipient.to_string(),
        subject: subject(language, lines.len(), false),
        text,
        html,
    }
}

/// The manager's digest of escalated deals, grouped by owner.
pub fn escalation_digest(
    language: Language,
    recipient: &str,
    by_owner: &[(String, Vec<DigestLine<'_>>)],
) -> Message {
    let words = words(language);
    let n_deals = by_owner.iter().map(|(_, lines)| lines.len()).sum();
    let mut text = format!("{}\n\n", words.escalation_intro);
    let mut html_body = format!(
        "<!DOCTYPE html><html><body><p>{}</p>",
        words.escalation_intro
    );
    for (owner, lines) in by_owner {
        text.push_str(&format!(
            "{}: {}\n{}\n",
            words.owner,
            one_line(owner),
            text_table(lines, &words)
        ));
        html_body.push_str(&format!(
            "<h3>{}: {}</h3>{}",
            words.owner,
            html(owner),
            html_table(lines, &words)
        ));
    }
    text.push_str(words.footer);
    text.push('\n');
    html_body.push_str(&format!(
        "<p style=\"color:#666\">{}</p></body></html>",
        words.footer
    ));
    Message {
        recipient: recipient.to_string(),
        subject: subject(language, n_deals, true),
        text,
        html: html_body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deal::{ExtraMap, FieldMap, FieldValue};
    use chrono::{NaiveDate, Utc};

    fn deal(company: &str) -> Deal {
        let mut fields = FieldMap::new();
        fields.insert(Field::Company, FieldValue::Text(company.to_string()));
        fields.insert(Field::Amount, FieldValue::Amount(12000.0));
        fields.insert(Field::Currency, FieldValue::Text("CNY".to_string()));
        let now = Utc::now();
        Deal {
            id: 7,
            fields,
            extra: ExtraMap::new(),
            created_at: now,
            updated_at: now,
            stage_entered_at: Some(now),
            archived_at: None,
        }
    }

    fn stall() -> Stall {
        Stall {
            deal_id: 7,
            stage: "Prospect".to_string(),
            idle_days: 12,
            days_in_stage: Some(12),
            last_contact_days: None,
            limit: 10,
            since: NaiveDate::from_ymd_opt(2026, 11, 1).expect("date"),
            reason: "in Prospect for 12 days, no contact recorded; limit 10".to_string(),
        }
    }

    #[test]
    fn subjects_in_both_languages() {
        assert_eq!(
            subject(Language::English, 3, false),
            "3 deals need follow-up"
        );
        assert_eq!(
            subject(Language::English, 1, false),
            "1 deal needs follow-up"
        );
        assert_eq!(subject(Language::Chinese, 3, false), "3 个商机需要跟进");
        assert_eq!(
            subject(Language::English, 2, true),
            "Escalation: 2 deals are still stalled"
        );
    }

    #[test]
    fn sheet_values_cannot_break_the_markup() {
        let hostile = deal("<script>alert(1)</script>\r\nBcc: evil@example.com");
        let stall = stall();
        let lines = [DigestLine {
            deal: &hostile,
            stall: &stall,
            file: Some("/srv/share/a.xlsx".to_string()),
        }];
        let digest = rep_digest(
            Language::English,
            "alice@example.com",
            "Alice\r\n<b>",
            &lines,
        );
        assert!(!digest.html.contains("<script>"), "{}", digest.html);
        assert!(digest.html.contains("&lt;script&gt;"));
        assert!(!digest.text.contains("\r\nBcc"), "{}", digest.text);
        assert!(!digest.subject.contains('\n'));
        assert!(digest.text.contains("12,000 CNY"), "{}", digest.text);
        assert!(digest.text.contains("a.xlsx"));
        assert!(!digest.html.contains("<b>"));
    }
}
