//! Reading whole Kubernetes objects from `kubectl get -o json|yaml` output, for `convert`: files
//! and folders in (found as `leak-scan` finds them), every object of every `List` out, in input
//! order.
//!
//! Unlike [`super::dump`], which streams a cluster-sized dump into the few fields the GC needs,
//! this keeps each object whole: `convert` reads policies, namespaces, service accounts and pods
//! a few thousand at a time, and its converters look at any field.
//!
//! Owns: cutting a file into objects (concatenated JSON values, YAML documents, nested `List`s,
//! a typed List's kind given to the items the API server wrote without one).
//! Must not: panic on any input, touch the network.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::dump::{self, DumpError, Format};

/// One object read, with where it came from (for messages).
#[derive(Debug, Clone, PartialEq)]
pub struct SourcedObject {
    pub file: String,
    pub object: Value,
}

/// What a set of files held: the objects, and the items that were not objects at all.
#[derive(Debug, Default)]
pub struct Objects {
    pub objects: Vec<SourcedObject>,
    /// Items that were not a JSON object (a number, a string, a list item of the wrong type), as
    /// (file, what).
    pub unreadable: Vec<(String, String)>,
}

/// Reads every object in `paths` (files, or folders searched recursively for `.json`, `.yaml`
/// and `.yml`), in sorted path order and, within a file, in the order written.
pub fn read_objects(paths: &[PathBuf]) -> Result<Objects, DumpError> {
    let mut out = Objects::default();
    for path in dump::collect_files(paths)? {
        let bytes = fs::read(&path).map_err(|e| dump::io_error(&path, e))?;
        read_bytes_into(&path, &bytes, &mut out)?;
    }
    Ok(out)
}

/// As [`read_objects`] for one in-memory file; `path` names it and, by its extension (else the
/// first byte), gives its format.
pub fn read_bytes_into(path: &Path, bytes: &[u8], out: &mut Objects) -> Result<(), DumpError> {
    let label = path.display().to_string();
    let bytes = bytes.strip_prefix(dump::UTF8_BOM).unwrap_or(bytes);
    let values: Vec<Value> = match dump::extension_format(path).unwrap_or_else(|| dump::sniff(bytes)) {
        Format::Json => {
            let mut values = Vec::new();
            for value in serde_json::Deserializer::from_slice(bytes).into_iter::<Value>() {
                match value {
                    Ok(v) => values.push(v),
                    Err(e) => {
                        return Err(DumpError::Json { path: path.to_path_buf(), line: e.line() as u64, column: e.column() as u64, problem: e.to_string() });
                    }
                }
            }
            values
        }
        Format::Yaml => {
            let text = std::str::from_utf8(bytes).map_err(|e| DumpError::Yaml { path: path.to_path_buf(), problem: format!("not UTF-8: {e}") })?;
            serde_saphyr::from_multiple_with_options::<Option<Value>>(text, dump::yaml_options())
                .map_err(|e| DumpError::Yaml { path: path.to_path_buf(), problem: e.to_string() })?
                .into_iter()
                .flatten()
                .collect()
        }
    };
    for value in values {
        flatten(value, None, &label, 0, out);
    }
    Ok(())
}

/// Sends `value` to `out`: a List's items one by one (nested Lists followed a bounded depth), an
/// object as itself, with `item_kind` (from a typed List such as `NetworkPolicyList`) filled in
/// when the object has no kind.
fn flatten(value: Value, item_kind: Option<&str>, file: &str, depth: usize, out: &mut Objects) {
    let Value::Object(mut map) = value else {
        out.unreadable.push((file.to_string(), format!("not an object: {}", short(&value))));
        return;
    };
    let kind = map.get("kind").and_then(Value::as_str).map(str::to_string);
    let is_list = kind.as_deref().is_some_and(|k| k == "List" || k.ends_with("List")) && map.get("items").is_some_and(Value::is_array);
    if is_list {
        if depth >= dump::MAX_LIST_NESTING {
            out.unreadable.push((file.to_string(), format!("a List nested deeper than {} levels", dump::MAX_LIST_NESTING)));
            return;
        }
        let list_kind = kind.unwrap_or_default();
        let items_kind = list_kind.strip_suffix("List").filter(|k| !k.is_empty()).map(str::to_string);
        if let Some(Value::Array(items)) = map.remove("items") {
            for item in items {
                flatten(item, items_kind.as_deref(), file, depth + 1, out);
            }
        }
        return;
    }
    if kind.is_none()
        && let Some(k) = item_kind
    {
        map.insert("kind".into(), Value::String(k.to_string()));
    }
    out.objects.push(SourcedObject { file: file.to_string(), object: Value::Object(map) });
}

fn short(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(name: &str, text: &str) -> Objects {
        let mut out = Objects::default();
        read_bytes_into(Path::new(name), text.as_bytes(), &mut out).unwrap();
        out
    }

    fn kinds(o: &Objects) -> Vec<(String, String)> {
        o.objects.iter().map(|s| (s.object["kind"].as_str().unwrap_or("").to_string(), s.object["metadata"]["name"].as_str().unwrap_or("").to_string())).collect()
    }

    #[test]
    fn lists_typed_lists_documents_and_concatenated_values_all_give_their_objects_in_order() {
        let np = |n: &str| json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": n}});
        let list = json!({"apiVersion": "v1", "kind": "List", "items": [np("a"), {"kind": "List", "items": [np("b")]}]});
        let typed = json!({"apiVersion": "v1", "kind": "NamespaceList", "items": [{"metadata": {"name": "ns"}}]});
        let expected = [("NetworkPolicy", "a"), ("NetworkPolicy", "b"), ("Namespace", "ns")].map(|(k, n)| (k.to_string(), n.to_string()));
        let json_text = format!("{list}\n{typed}");
        assert_eq!(kinds(&read("x.json", &json_text)), expected);
        let yaml_text = format!("{}---\n{}", serde_saphyr::to_string(&list).unwrap(), serde_saphyr::to_string(&typed).unwrap());
        assert_eq!(kinds(&read("x.yaml", &yaml_text)), expected);
        // No extension: the first byte decides.
        assert_eq!(kinds(&read("dump", &json_text)), expected);
        assert_eq!(kinds(&read("dump", &yaml_text)), expected);
    }

    #[test]
    fn items_that_are_not_objects_are_reported_and_bad_syntax_is_an_error() {
        let o = read("x.json", r#"{"kind": "List", "items": [3, {"kind": "Pod", "metadata": {"name": "p"}}]} "text""#);
        assert_eq!(kinds(&o), [("Pod".to_string(), "p".to_string())]);
        assert_eq!(o.unreadable.len(), 2, "{:?}", o.unreadable);
        let mut out = Objects::default();
        let e = read_bytes_into(Path::new("x.json"), b"{\"kind\": ", &mut out).unwrap_err();
        assert_eq!(e.category(), "json");
        let e = read_bytes_into(Path::new("x.yaml"), b"a: [", &mut out).unwrap_err();
        assert_eq!(e.category(), "yaml");
        // Empty YAML documents are nothing, not an error.
        assert!(read("x.yaml", "---\n---\n").objects.is_empty());
    }

    #[test]
    fn hostile_nesting_is_bounded() {
        let mut v = json!({"kind": "Pod", "metadata": {"name": "deep"}});
        for _ in 0..20 {
            v = json!({"kind": "List", "items": [v]});
        }
        let o = read("x.json", &v.to_string());
        assert!(o.objects.is_empty());
        assert_eq!(o.unreadable.len(), 1);
    }
}
