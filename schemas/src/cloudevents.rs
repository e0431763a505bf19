//! CloudEvents 1.0 on the wire: binary mode (attributes in headers) and structured mode JSON.
//!
//! **Binary mode.** Attributes and extensions are headers named `ce-<attr>` ([`HeaderStyle::Dash`]:
//! HTTP, NATS, the memory bus) or `ce_<attr>` ([`HeaderStyle::Underscore`]: Kafka);
//! `datacontenttype` travels as the `content-type` header in both styles (HTTP binding and
//! Kafka binding; `ce-datacontenttype`, as the NATS binding draft spells it, is accepted on
//! read). Header names are case-insensitive on read and written in lowercase. `ce-` values are
//! percent-encoded as the HTTP and NATS bindings require (space, `"`, `%`, and everything
//! outside U+0021..U+007E, as UTF-8 octets) and percent-decoded on read; `ce_` values are raw
//! UTF-8 as the Kafka binding says. `data` is the body; an empty or null body means no data, so
//! an event whose data is `Some(vec![])` comes back with `None` (the only inexact round trip).
//!
//! **Structured mode** (`application/cloudevents+json`). `data` is embedded verbatim as a JSON
//! value when `datacontenttype` is JSON-ish (`application/json`, `text/json`, `*/*+json`) or
//! absent and the bytes are exactly one JSON value; otherwise it is written as `data_base64`.
//! Extensions are top-level members; on read, non-string extension values become their
//! canonical string form (`true`, `42`, `1.5`) and `null` means absent.
//!
//! Encoding is deterministic: attributes in a fixed order, extensions sorted by name. This
//! module knows nothing of Debezium, S3 or format detection; that is [`crate::wire`].

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine as _;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;

use crate::event::check_extension_name;
use crate::{DecodeError, Event, HeaderStyle, SPECVERSION};

/// `content-type` of a structured-mode event.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
/// The HTTP binding's batched mode: a JSON array of structured events (HTTP only; the broker
/// bindings have no batched mode).
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// The header that carries `datacontenttype` in binary mode (both styles).
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// What the CloudEvents HTTP and NATS bindings percent-encode in header values: space, `"`,
/// `%` and controls; non-ASCII is always encoded by [`utf8_percent_encode`].
const HEADER_VALUE_ESCAPES: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// One header of a received message. Transports hand headers over in whatever form they hold
/// them (owned pairs, or borrowed views of a broker client's own header map), so decoding
/// copies nothing it does not keep.
pub trait HeaderPair {
    fn name(&self) -> &str;
    fn value(&self) -> &str;
}

impl HeaderPair for (String, String) {
    fn name(&self) -> &str {
        &self.0
    }

    fn value(&self) -> &str {
        &self.1
    }
}

impl HeaderPair for (&str, &str) {
    fn name(&self) -> &str {
        self.0
    }

    fn value(&self) -> &str {
        self.1
    }
}

/// The first value of a header, by case-insensitive name.
pub fn header<'a, H: HeaderPair>(headers: &'a [H], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|pair| pair.name().eq_ignore_ascii_case(name))
        .map(HeaderPair::value)
}

/// Whether the headers make this a binary-mode event: a `ce-specversion` header (what the
/// HTTP and Kafka bindings key binary mode on) or a `ce-id` header, in either spelling. A
/// message with one but not the other is binary mode with an attribute missing, and is refused
/// as such rather than passed on as a custom event.
pub fn has_binary_headers<H: HeaderPair>(headers: &[H]) -> bool {
    ["ce-id", "ce_id", "ce-specversion", "ce_specversion"]
        .iter()
        .any(|name| header(headers, name).is_some())
}

/// Whether any header uses a CloudEvents prefix (`ce-` or `ce_`), even if `ce-id` is missing.
pub fn has_any_ce_header<H: HeaderPair>(headers: &[H]) -> bool {
    headers.iter().any(|pair| {
        let prefix = pair.name().get(..3).unwrap_or_default();
        prefix.eq_ignore_ascii_case("ce-") || prefix.eq_ignore_ascii_case("ce_")
    })
}

/// Whether a `content-type` announces structured mode (`application/cloudevents...`,
/// case-insensitive, as the bindings detect it).
pub fn is_structured_content_type(content_type: &str) -> bool {
    const STRUCTURED: &str = "application/cloudevents";
    media_type(content_type)
        .get(..STRUCTURED.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(STRUCTURED))
}

/// Whether a `content-type` announces the HTTP binding's batched mode (case-insensitive).
pub fn is_batch_content_type(content_type: &str) -> bool {
    media_type(content_type).eq_ignore_ascii_case(BATCH_CONTENT_TYPE)
}

/// Whether a media type is JSON: `application/json`, `text/json` or any `+json` suffix.
pub fn is_json_content_type(content_type: &str) -> bool {
    let media = media_type(content_type);
    media.eq_ignore_ascii_case("application/json")
        || media.eq_ignore_ascii_case("text/json")
        || media
            .len()
            .checked_sub(5)
            .and_then(|start| media.get(start..))
            .is_some_and(|end| end.eq_ignore_ascii_case("+json"))
}

/// The media type without parameters, trimmed (compare it case-insensitively).
fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

/// Attributes collected from either mode before they become an [`Event`].
#[derive(Default)]
struct Attributes {
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    ty: Option<String>,
    subject: Option<String>,
    time: Option<String>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    extensions: BTreeMap<String, String>,
}

impl Attributes {
    /// Store one attribute by name; anything that is not a context attribute is an extension.
    fn set(&mut self, name: &str, value: String) -> Result<(), DecodeError> {
        let slot = match name {
            "specversion" => &mut self.specversion,
            "id" => &mut self.id,
            "source" => &mut self.source,
            "type" => &mut self.ty,
            "subject" => &mut self.subject,
            "time" => &mut self.time,
            "datacontenttype" => &mut self.datacontenttype,
            "dataschema" => &mut self.dataschema,
            _ => {
                check_extension_name(name)?;
                self.extensions.insert(name.to_owned(), value);
                return Ok(());
            }
        };
        *slot = Some(value);
        Ok(())
    }

    /// Whether an attribute (lowercase name) was set already: the first header of a name wins.
    fn has(&self, name: &str) -> bool {
        match name {
            "specversion" => self.specversion.is_some(),
            "id" => self.id.is_some(),
            "source" => self.source.is_some(),
            "type" => self.ty.is_some(),
            "subject" => self.subject.is_some(),
            "time" => self.time.is_some(),
            "datacontenttype" => self.datacontenttype.is_some(),
            "dataschema" => self.dataschema.is_some(),
            _ => self.extensions.contains_key(name),
        }
    }

    fn into_event(self, data: Option<Vec<u8>>) -> Result<Event, DecodeError> {
        let specversion = self.specversion.ok_or(DecodeError::MissingAttribute {
            attribute: "specversion",
        })?;
        // Checked before the other attributes: a 0.3 event fails for its version, not for
        // attribute names that 0.3 spelled differently.
        if specversion != SPECVERSION {
            return Err(DecodeError::SpecVersion { found: specversion });
        }
        let required = |value: Option<String>, attribute| {
            value.ok_or(DecodeError::MissingAttribute { attribute })
        };
        let event = Event {
            id: required(self.id, "id")?,
            source: required(self.source, "source")?,
            ty: required(self.ty, "type")?,
            specversion,
            subject: self.subject,
            time: self.time,
            datacontenttype: self.datacontenttype,
            dataschema: self.dataschema,
            data,
            extensions: self.extensions,
        };
        event.validate()?;
        Ok(event)
    }
}

/// Decode a binary-mode event. `body` `None` (a Kafka null value) or empty means no data.
/// When a name appears twice, the first header wins.
pub fn decode_binary<H: HeaderPair>(
    headers: &[H],
    body: Option<&[u8]>,
) -> Result<Event, DecodeError> {
    let mut attributes = Attributes::default();
    let mut content_type = None;
    for pair in headers {
        let (name, value) = (pair.name(), pair.value());
        if name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER) {
            content_type.get_or_insert(value);
            continue;
        }
        let (Some(prefix), Some(attribute)) = (name.get(..3), name.get(3..)) else {
            continue;
        };
        let percent_encoded = if prefix.eq_ignore_ascii_case("ce-") {
            true
        } else if prefix.eq_ignore_ascii_case("ce_") {
            false
        } else {
            continue;
        };
        // Names are case-insensitive; they are nearly always written in lowercase already.
        let attribute = if attribute.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(attribute.to_ascii_lowercase())
        } else {
            Cow::Borrowed(attribute)
        };
        if attributes.has(&attribute) {
            continue;
        }
        let value = if percent_encoded {
            percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| {
                    DecodeError::invalid(
                        attribute.as_ref(),
                        "percent-decoded header value is not UTF-8",
                    )
                })?
                .into_owned()
        } else {
            value.to_owned()
        };
        attributes.set(&attribute, value)?;
    }
    if let Some(content_type) = content_type {
        attributes.datacontenttype = Some(content_type.to_owned());
    }
    let data = body.filter(|bytes| !bytes.is_empty()).map(<[u8]>::to_vec);
    attributes.into_event(data)
}

/// Binary-mode headers as [`encode_binary`] writes them: names are `'static` for every context
/// attribute and Weir's own extensions (no allocation for them), owned for other extensions.
pub type BinaryHeaders = Vec<(Cow<'static, str>, String)>;

/// The header name of an attribute or extension in a style, static where it is one of the
/// names every event carries.
fn header_name(style: HeaderStyle, name: &str) -> Cow<'static, str> {
    macro_rules! known {
        ($($name:literal),* $(,)?) => {
            match (style, name) {
                $(
                    (HeaderStyle::Dash, $name) => return Cow::Borrowed(concat!("ce-", $name)),
                    (HeaderStyle::Underscore, $name) => return Cow::Borrowed(concat!("ce_", $name)),
                )*
                _ => {}
            }
        };
    }
    known!(
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "dataschema",
        "traceparent",
        "partitionkey",
        "weirhops",
        "weircausation",
        "weirdlqreason",
        "weirdlqerror",
        "weirdlqattempts",
        "weirdlqfunction",
        "weirdlqmodule",
        "weirdlqorigin",
        "weirdlqfirstfailure",
        "weirdlqlastfailure",
    );
    let prefix = match style {
        HeaderStyle::Dash => "ce-",
        HeaderStyle::Underscore => "ce_",
    };
    Cow::Owned(format!("{prefix}{name}"))
}

/// Encode an event in binary mode: headers in a fixed order (`specversion`, `id`, `source`,
/// `type`, `subject`, `time`, `dataschema`, `content-type`, then extensions by name) and the
/// body (`data`, empty when there is none). Assumes a valid event ([`Event::validate`]).
pub fn encode_binary(event: &Event, style: HeaderStyle) -> (BinaryHeaders, Vec<u8>) {
    let encode_value = |value: &str| match style {
        HeaderStyle::Dash => {
            Cow::from(utf8_percent_encode(value, HEADER_VALUE_ESCAPES)).into_owned()
        }
        HeaderStyle::Underscore => value.to_owned(),
    };
    let mut headers = Vec::with_capacity(8 + event.extensions.len());
    let mut push = |name: &str, value: &str| {
        headers.push((header_name(style, name), encode_value(value)));
    };
    push("specversion", &event.specversion);
    push("id", &event.id);
    push("source", &event.source);
    push("type", &event.ty);
    for (name, value) in [
        ("subject", &event.subject),
        ("time", &event.time),
        ("dataschema", &event.dataschema),
    ] {
        if let Some(value) = value {
            push(name, value);
        }
    }
    if let Some(content_type) = &event.datacontenttype {
        headers.push((Cow::Borrowed(CONTENT_TYPE_HEADER), content_type.clone()));
    }
    for (name, value) in &event.extensions {
        headers.push((header_name(style, name), encode_value(value)));
    }
    (headers, event.data.clone().unwrap_or_default())
}

/// Decode a structured-mode JSON event.
pub fn decode_structured(body: &[u8]) -> Result<Event, DecodeError> {
    const WHAT: &str = "structured CloudEvent";
    let members: BTreeMap<String, &RawValue> =
        serde_json::from_slice(body).map_err(|err| DecodeError::json(WHAT, &err))?;
    let mut attributes = Attributes::default();
    let mut data_json = None;
    let mut data_base64 = None;
    for (name, raw) in members {
        let value: serde_json::Value =
            serde_json::from_str(raw.get()).map_err(|err| DecodeError::json(WHAT, &err))?;
        if value.is_null() {
            // The JSON format treats a null member as an absent one.
            continue;
        }
        match name.as_str() {
            "data" => data_json = Some((raw, value)),
            "data_base64" => match value {
                serde_json::Value::String(text) => data_base64 = Some(text),
                _ => return Err(DecodeError::invalid("data_base64", "must be a JSON string")),
            },
            "specversion" | "id" | "source" | "type" | "subject" | "time" | "datacontenttype"
            | "dataschema" => match value {
                serde_json::Value::String(text) => attributes.set(&name, text)?,
                _ => return Err(DecodeError::invalid(name, "must be a JSON string")),
            },
            _ => {
                let text = match value {
                    serde_json::Value::String(text) => text,
                    serde_json::Value::Bool(flag) => flag.to_string(),
                    serde_json::Value::Number(number) => number.to_string(),
                    _ => {
                        check_extension_name(&name)?;
                        return Err(DecodeError::invalid(
                            name,
                            "an extension value must be a string, number or boolean",
                        ));
                    }
                };
                attributes.set(&name, text)?;
            }
        }
    }
    let data = match (data_json, data_base64) {
        (Some(_), Some(_)) => {
            return Err(DecodeError::invalid(
                "data",
                "both data and data_base64 are present",
            ))
        }
        (None, Some(text)) => Some(decode_base64(&text)?),
        (Some((raw, value)), None) => {
            let is_json = attributes
                .datacontenttype
                .as_deref()
                .is_none_or(is_json_content_type);
            match value {
                // Non-JSON content carried as a JSON string is the string's text (e.g.
                // text/plain); JSON content keeps its exact JSON text.
                serde_json::Value::String(text) if !is_json => Some(text.into_bytes()),
                _ => Some(raw.get().as_bytes().to_vec()),
            }
        }
        (None, None) => None,
    };
    attributes.into_event(data)
}

fn decode_base64(text: &str) -> Result<Vec<u8>, DecodeError> {
    use base64::engine::{general_purpose::GeneralPurpose, DecodePaddingMode};
    // Producers differ on padding; both forms are unambiguous.
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT
        .decode(text)
        .map_err(|err| DecodeError::InvalidBase64 {
            reason: err.to_string(),
        })
}

/// Encode an event as structured-mode JSON (deterministic member order: `specversion`, `id`,
/// `source`, `type`, `subject`, `time`, `datacontenttype`, `dataschema`, extensions by name,
/// then `data` or `data_base64`). Assumes a valid event ([`Event::validate`]).
pub fn encode_structured(event: &Event) -> Vec<u8> {
    let data = event.data.as_deref().map(|bytes| {
        let is_json = event
            .datacontenttype
            .as_deref()
            .is_none_or(is_json_content_type);
        match std::str::from_utf8(bytes)
            .ok()
            .filter(|_| is_json)
            .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
            // Embedding is exact only when the bytes are the value and nothing else (no
            // surrounding whitespace); otherwise base64 keeps them byte for byte.
            .filter(|raw| raw.get().len() == bytes.len())
        {
            Some(raw) => StructuredData::Json(raw),
            None => StructuredData::Base64(base64::engine::general_purpose::STANDARD.encode(bytes)),
        }
    });
    // Serialising strings and maps into a Vec cannot fail, and a raw value is only embedded
    // after it parsed; an empty output would fail loudly at the reader.
    serde_json::to_vec(&Structured { event, data }).unwrap_or_default()
}

enum StructuredData<'a> {
    Json(&'a RawValue),
    Base64(String),
}

struct Structured<'a> {
    event: &'a Event,
    data: Option<StructuredData<'a>>,
}

impl Serialize for Structured<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let event = self.event;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("specversion", &event.specversion)?;
        map.serialize_entry("id", &event.id)?;
        map.serialize_entry("source", &event.source)?;
        map.serialize_entry("type", &event.ty)?;
        for (name, value) in [
            ("subject", &event.subject),
            ("time", &event.time),
            ("datacontenttype", &event.datacontenttype),
            ("dataschema", &event.dataschema),
        ] {
            if let Some(value) = value {
                map.serialize_entry(name, value)?;
            }
        }
        for (name, value) in &event.extensions {
            map.serialize_entry(name, value)?;
        }
        match &self.data {
            Some(StructuredData::Json(raw)) => map.serialize_entry("data", raw)?,
            Some(StructuredData::Base64(text)) => map.serialize_entry("data_base64", text)?,
            None => {}
        }
        map.end()
    }
}
