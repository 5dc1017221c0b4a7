//! Reading `serde_json::Value` the way Go's decoder reads the Kubernetes types: `null` is the
//! same as absent, field names are case-sensitive (as in apimachinery's decoder), and a value of
//! the wrong JSON type is an error naming the field.
//!
//! Must not: panic on any input.

use serde_json::{Map, Value};

/// A field that Go's decoder would reject, with a path such as `spec.ingress[0].ports[1].port`.
pub(crate) type Undecodable = String;

/// `obj[key]`, with `null` read as absent.
pub(crate) fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// An optional object field.
pub(crate) fn object<'a>(obj: &'a Map<String, Value>, key: &str, path: &str) -> Result<Option<&'a Map<String, Value>>, Undecodable> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(format!("{path}.{key}: not an object")),
    }
}

/// An optional array field (absent, `null` and `[]` all read as empty).
pub(crate) fn array<'a>(obj: &'a Map<String, Value>, key: &str, path: &str) -> Result<&'a [Value], Undecodable> {
    match field(obj, key) {
        None => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(format!("{path}.{key}: not a list")),
    }
}

/// An optional string field (`None` when absent or `null`).
pub(crate) fn string<'a>(obj: &'a Map<String, Value>, key: &str, path: &str) -> Result<Option<&'a str>, Undecodable> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{path}.{key}: not a string")),
    }
}

/// An optional 32-bit integer field (Go's `int32`: no fraction, no exponent, in range).
pub(crate) fn int32(obj: &Map<String, Value>, key: &str, path: &str) -> Result<Option<i64>, Undecodable> {
    match field(obj, key) {
        None => Ok(None),
        Some(v) => v.as_i64().filter(|n| i32::try_from(*n).is_ok()).map(Some).ok_or_else(|| format!("{path}.{key}: not a 32-bit integer")),
    }
}

/// An optional bool field.
pub(crate) fn boolean(obj: &Map<String, Value>, key: &str, path: &str) -> Result<bool, Undecodable> {
    match field(obj, key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(format!("{path}.{key}: not a bool")),
    }
}

/// A list element that must be an object; `null` decodes to the zero value (an empty object).
pub(crate) fn element<'a>(v: &'a Value, path: &str) -> Result<Option<&'a Map<String, Value>>, Undecodable> {
    match v {
        Value::Null => Ok(None),
        Value::Object(m) => Ok(Some(m)),
        _ => Err(format!("{path}: not an object")),
    }
}

/// A list of strings; a `null` element decodes to the empty string.
pub(crate) fn strings<'a>(obj: &'a Map<String, Value>, key: &str, path: &str) -> Result<Vec<&'a str>, Undecodable> {
    array(obj, key, path)?
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Null => Ok(""),
            Value::String(s) => Ok(s.as_str()),
            _ => Err(format!("{path}.{key}[{i}]: not a string")),
        })
        .collect()
}

/// A `map[string]string` field (labels, matchLabels); a `null` value decodes to the empty string.
pub(crate) fn string_map<'a>(obj: &'a Map<String, Value>, key: &str, path: &str) -> Result<Vec<(&'a str, &'a str)>, Undecodable> {
    let Some(m) = object(obj, key, path)? else { return Ok(Vec::new()) };
    m.iter()
        .map(|(k, v)| match v {
            Value::Null => Ok((k.as_str(), "")),
            Value::String(s) => Ok((k.as_str(), s.as_str())),
            _ => Err(format!("{path}.{key}.{k}: not a string")),
        })
        .collect()
}

/// What every converter reads first: the object's fields and its `metadata`.
pub(crate) struct Envelope<'a> {
    pub top: &'a Map<String, Value>,
    pub meta: &'a Map<String, Value>,
    pub name: &'a str,
    /// `metadata.namespace`, with an empty one read as `default`.
    pub namespace: &'a str,
}

/// The envelope of a Kubernetes object of `kind`, or why it cannot be read (not an object, no
/// `metadata.name`).
pub(crate) fn envelope<'a>(obj: &'a Value, kind: &str) -> Result<Envelope<'a>, String> {
    let Value::Object(top) = obj else { return Err(format!("{kind}: not a JSON object")) };
    let meta = object(top, "metadata", kind)?.ok_or_else(|| format!("{kind}: no metadata"))?;
    let name = string(meta, "name", "metadata")?.filter(|n| !n.is_empty()).ok_or_else(|| format!("{kind}: no metadata.name"))?;
    let namespace = string(meta, "namespace", "metadata")?.filter(|n| !n.is_empty()).unwrap_or("default");
    Ok(Envelope { top, meta, name, namespace })
}
