//! What every `--json` report of `migrate` and `migrate-dst` shares: one
//! object on stdout with a `version` field, the schema's version, so that
//! scripts can tell a report they understand from a later one. Errors are
//! reported the same way, as an object with `error`.

use serde::Serialize;
use serde_json::Value;

/// The version of the JSON reports' schema. Raised when a field changes
/// meaning or goes; new fields are added without raising it.
pub const JSON_VERSION: u64 = 1;

/// Why a report could not be printed as JSON.
#[derive(Debug, thiserror::Error)]
pub enum JsonReportError {
    #[error("serialising the report: {0}")]
    Serialise(#[from] serde_json::Error),
    #[error("a JSON report must be an object, not {0}")]
    NotAnObject(&'static str),
}

/// `report` (a struct or a map) as one line of JSON with `version` added.
pub fn versioned<T: Serialize>(report: &T) -> Result<String, JsonReportError> {
    let mut object = match serde_json::to_value(report)? {
        Value::Object(object) => object,
        other => return Err(JsonReportError::NotAnObject(kind(&other))),
    };
    object.insert("version".to_owned(), Value::from(JSON_VERSION));
    Ok(Value::Object(object).to_string())
}

/// The report of a command that failed before it had anything else to say.
pub fn error(message: &str) -> String {
    serde_json::json!({ "version": JSON_VERSION, "error": message }).to_string()
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_version_to_an_object() {
        let text = versioned(&serde_json::json!({"container": "c1", "exit_code": 0})).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["version"], JSON_VERSION);
        assert_eq!(value["container"], "c1");
        assert_eq!(value["exit_code"], 0);
    }

    #[test]
    fn refuses_what_is_not_an_object() {
        assert!(matches!(
            versioned(&vec![1, 2]),
            Err(JsonReportError::NotAnObject("an array"))
        ));
    }

    #[test]
    fn errors_carry_the_version() {
        let value: Value = serde_json::from_str(&error("no such container")).unwrap();
        assert_eq!(value["version"], JSON_VERSION);
        assert_eq!(value["error"], "no such container");
    }
}
