//! Small helpers for editing XML parts byte for byte: everything not edited is copied exactly as
//! it was, so attribute order, namespaces and whitespace survive.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// An unprefixed attribute's raw (still escaped) value: `r`, not `x:r`.
pub fn attribute(element: &BytesStart<'_>, name: &str) -> Option<String> {
    element
        .attributes()
        .with_checks(false)
        .flatten()
        .find(|attribute| attribute.key.as_ref() == name)
        .map(|attribute| attribute.value.into_owned())
}

/// A prefixed attribute by its local name, whatever the prefix: `r:id` for `id`.
pub fn prefixed_attribute(element: &BytesStart<'_>, local: &str) -> Option<String> {
    element
        .attributes()
        .with_checks(false)
        .flatten()
        .find(|attribute| {
            attribute.key.as_ref().contains(':') && attribute.key.local_name().as_ref() == local
        })
        .map(|attribute| attribute.value.into_owned())
}

/// The element with some attributes set (replacing the value where present, appended where not)
/// or removed (`None`), other attributes kept in their order.
pub fn with_attributes(
    element: &BytesStart<'_>,
    changes: &[(&str, Option<&str>)],
) -> BytesStart<'static> {
    let name = element.name().as_ref().to_string();
    let mut edited = BytesStart::new(name);
    let mut done = vec![false; changes.len()];
    for attribute in element.attributes().with_checks(false).flatten() {
        let key = attribute.key.as_ref();
        match changes.iter().position(|(name, _)| *name == key) {
            Some(change_idx) => {
                done[change_idx] = true;
                if let Some(value) = changes[change_idx].1 {
                    edited.push_attribute((changes[change_idx].0, value));
                }
            }
            None => edited.push_attribute(attribute),
        }
    }
    for ((name, value), done) in changes.iter().zip(done) {
        if let (false, Some(value)) = (done, value) {
            edited.push_attribute((*name, *value));
        }
    }
    edited
}

/// The namespace prefix of an element name, with its colon (`x:`), or empty.
pub fn prefix_of(qualified_name: &str) -> String {
    match qualified_name.find(':') {
        Some(colon) => qualified_name[..=colon].to_string(),
        None => String::new(),
    }
}

/// One edit of an XML part: replace the bytes in `start..end` with `text` (an insertion when the
/// range is empty).
#[derive(Debug, Clone)]
pub struct Splice {
    pub start: usize,
    pub end: usize,
    pub text: Vec<u8>,
}

/// Applies splices (sorted by position, not overlapping) to a part's bytes.
pub fn apply_splices(original: &[u8], mut splices: Vec<Splice>) -> Vec<u8> {
    splices.sort_by_key(|splice| (splice.start, splice.end));
    let mut out = Vec::with_capacity(original.len() + 256);
    let mut position = 0;
    for splice in splices {
        if splice.start < position {
            continue;
        }
        out.extend_from_slice(&original[position..splice.start]);
        out.extend_from_slice(&splice.text);
        position = splice.end;
    }
    out.extend_from_slice(&original[position..]);
    out
}

/// The bytes of a start or empty tag.
pub fn tag_bytes(element: &BytesStart<'_>, empty: bool) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(element.len() + 3);
    bytes.push(b'<');
    bytes.extend_from_slice(element.as_bytes());
    if empty {
        bytes.extend_from_slice(b"/>");
    } else {
        bytes.push(b'>');
    }
    bytes
}

/// Walks a part held in memory, calling `visit` with each event and its byte range.
pub fn walk(
    bytes: &[u8],
    mut visit: impl FnMut(&Event<'_>, usize, usize),
) -> Result<(), quick_xml::Error> {
    let mut reader = Reader::from_reader(bytes);
    reader.config_mut().check_end_names = false;
    loop {
        let start = reader.buffer_position() as usize;
        let event = reader.read_event()?;
        let end = reader.buffer_position() as usize;
        if matches!(event, Event::Eof) {
            return Ok(());
        }
        visit(&event, start, end);
    }
}

/// Text for an XML attribute value or element content.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            // Characters XML 1.0 does not allow at all are dropped rather than written into a
            // part Excel would refuse to open.
            '\t' | '\n' | '\r' => escaped.push(character),
            character if (character as u32) < 0x20 => {}
            '\u{FFFE}' | '\u{FFFF}' => {}
            character => escaped.push(character),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_edited_in_place_and_others_kept_in_order() {
        let mut reader = Reader::from_reader(&b"<c r=\"B2\" s=\"3\" t=\"s\"/>"[..]);
        let Ok(Event::Empty(element)) = reader.read_event() else {
            panic!("an empty element");
        };
        let edited = with_attributes(
            &element,
            &[("r", Some("B3")), ("t", None), ("x", Some("1"))],
        );
        assert_eq!(tag_bytes(&edited, true), b"<c r=\"B3\" s=\"3\" x=\"1\"/>");
        assert_eq!(attribute(&element, "s").as_deref(), Some("3"));
        assert_eq!(attribute(&element, "q"), None);
    }

    #[test]
    fn splices_replace_and_insert() {
        let text = b"<a><b/></a>";
        let out = apply_splices(
            text,
            vec![
                Splice {
                    start: 3,
                    end: 7,
                    text: b"<c/>".to_vec(),
                },
                Splice {
                    start: 7,
                    end: 7,
                    text: b"<d/>".to_vec(),
                },
            ],
        );
        assert_eq!(out, b"<a><c/><d/></a>");
    }

    #[test]
    fn escaping_drops_what_xml_cannot_hold() {
        assert_eq!(escape("a<b & \"c\"\u{1}"), "a&lt;b &amp; &quot;c&quot;");
    }
}
