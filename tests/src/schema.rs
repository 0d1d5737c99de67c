//! The published JSON Schema (`schema/`): every record a test reads from the daemon, and every
//! `why` document, is checked against it.
use std::sync::OnceLock;

use jsonschema::{Retrieve, Uri, Validator};
use serde_json::Value;

/// The other schema files, by the `$id` a `$ref` names them with.
struct Siblings(Vec<(String, Value)>);

impl Retrieve for Siblings {
    fn retrieve(
        &self,
        uri: &Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        self.0
            .iter()
            .find(|(id, _)| id == uri.as_str())
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("no schema {uri}").into())
    }
}

fn validator(file: &str, cell: &'static OnceLock<Validator>) -> &'static Validator {
    cell.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema");
        let read = |f: &str| -> Value {
            let text =
                std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("schema/{f}: {e}"));
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("schema/{f}: {e}"))
        };
        // why's schema refers to the records' definitions (marks, times, hooks).
        let records = read("trace-records.schema.json");
        let id = records["$id"].as_str().expect("$id").to_owned();
        jsonschema::options()
            .with_retriever(Siblings(vec![(id, records)]))
            .build(&read(file))
            .unwrap_or_else(|e| panic!("schema/{file} is not a JSON Schema: {e}"))
    })
}

fn check(v: &Value, what: &str, validator: &Validator) {
    let errors: Vec<String> = validator
        .iter_errors(v)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not follow the published schema: {errors:#?}\n{v}"
    );
}

/// A record of `trace --json` (`show --json`, `demo --json`).
pub fn check_record(v: &Value) {
    static V: OnceLock<Validator> = OnceLock::new();
    check(
        v,
        "a JSON record",
        validator("trace-records.schema.json", &V),
    );
}

/// A `why --json` document.
pub fn check_why(v: &Value) {
    static V: OnceLock<Validator> = OnceLock::new();
    check(v, "why's JSON document", validator("why.schema.json", &V));
}
