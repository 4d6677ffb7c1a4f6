use super::*;
use serde_json::json;

fn sample() -> Schema {
    Schema::object()
        .prop("name", Schema::string().min(1).max(3).done())
        .prop("retries", Schema::integer().min(0.0).int())
        .prop("timeout", Schema::integer().greater_than(0.0).number())
        .prop(
            "methods",
            Schema::array(Schema::string().enumerated(&["GET", "POST"]).done())
                .min(1)
                .unique()
                .done(),
        )
        .prop("a", Schema::Any)
        .prop("b", Schema::Any)
        .no_additional()
        .one_of_required(&[&["a"], &["b"]])
        .done()
}

#[test]
fn messages_match_apisix_wording() {
    let s = sample();
    let cases = [
        (json!({"a": 1, "retries": -1}), "property \"retries\" validation failed: expected -1 to be at least 0"),
        (json!({"a": 1, "timeout": 0}), "property \"timeout\" validation failed: expected 0 to be greater than 0"),
        (json!({"a": 1, "name": ""}), "property \"name\" validation failed: string too short, expected at least 1, got 0"),
        (json!({"a": 1, "name": "abcd"}), "property \"name\" validation failed: string too long, expected at most 3, got 4"),
        (json!({"a": 1, "name": 5}), "property \"name\" validation failed: wrong type: expected string, got number"),
        (json!({"a": 1, "methods": ["FETCH"]}), "property \"methods\" validation failed: failed to validate item 1: matches none of the enum values"),
        (json!({"a": 1, "methods": []}), "property \"methods\" validation failed: expect array to have at least 1 items"),
        (json!({"a": 1, "methods": ["GET", "GET"]}), "property \"methods\" validation failed: expected unique items but items 1 and 2 are equal"),
        (json!({"a": 1, "zzz": 1}), "additional properties forbidden, found zzz"),
        (json!({}), "value should match only one schema, but matches none"),
        (json!({"a": 1, "b": 2}), "value should match only one schema, but matches both schemas 1 and 2"),
        (json!("x"), "wrong type: expected object, got string"),
    ];
    for (value, want) in cases {
        assert_eq!(s.validate(&value).unwrap_err(), want, "for {value}");
    }
    assert!(s
        .validate(&json!({"a": 1, "retries": 0, "methods": ["GET"]}))
        .is_ok());
}

#[test]
fn any_of_reports_none_of_the_required() {
    let s = Schema::AnyOf(vec![
        Schema::string().min(2).done(),
        Schema::integer().int(),
    ]);
    assert!(s.validate(&json!(3)).is_ok());
    assert!(s.validate(&json!("ab")).is_ok());
    assert_eq!(
        s.validate(&json!("a")).unwrap_err(),
        "object matches none of the required"
    );
}

#[test]
fn integer_rejects_fractions_and_strings() {
    let s = Schema::integer().int();
    assert!(s.validate(&json!(1.5)).is_err());
    assert!(s.validate(&json!("1")).is_err());
    assert!(s.validate(&json!(7)).is_ok());
}

#[test]
fn prints_as_json_schema() {
    let doc = sample().to_json();
    assert_eq!(doc["type"], "object");
    assert_eq!(doc["additionalProperties"], false);
    assert_eq!(doc["properties"]["retries"]["minimum"], 0.0);
    assert_eq!(doc["oneOf"][0]["required"][0], "a");
}

#[test]
fn dependencies_and_not() {
    let s = Schema::object()
        .prop("a", Schema::string().done())
        .dependency("a", Schema::object().required(&["b"]).done())
        .dependency(
            "c",
            Schema::Not(Box::new(Schema::object().required(&["a", "b"]).done())),
        )
        .done();
    assert_eq!(s.validate(&json!({"b": 1})), Ok(()));
    assert_eq!(
        s.validate(&json!({"a": "x"})),
        Err("failed to validate dependent schema for \"a\": property \"b\" is required".into())
    );
    assert_eq!(
        s.validate(&json!({"a": 1})),
        Err("property \"a\" validation failed: wrong type: expected string, got number".into()),
        "the property itself is checked first"
    );
    assert_eq!(s.validate(&json!({"c": 1, "b": 1})), Ok(()));
    assert_eq!(
        s.validate(&json!({"c": 1, "a": "x", "b": 1})),
        Err(
            "failed to validate dependent schema for \"c\": value wasn't supposed to match schema"
                .into()
        )
    );
    let doc = s.to_json();
    assert_eq!(
        doc["dependencies"]["c"]["not"]["required"],
        json!(["a", "b"])
    );
}

#[test]
fn listed_any_of_names_the_sets() {
    let s = Schema::object()
        .any_of_required_listed(&[&["x"], &["x", "y"]])
        .done();
    assert_eq!(s.validate(&json!({"x": 1})), Ok(()));
    assert_eq!(
        s.validate(&json!({"y": 1})),
        Err("object matches none of the required: [\"x\"] or [\"x\",\"y\"]".into())
    );
}

#[test]
fn if_then_else_reports_the_clause() {
    let server = Schema::object()
        .prop("type", Schema::string().enumerated(&["server"]).done())
        .done();
    let s = Schema::object()
        .prop("type", Schema::string().done())
        .if_then_else(
            server,
            Some(
                Schema::object()
                    .one_of_required(&[&["sni", "cert"], &["snis", "cert"]])
                    .done(),
            ),
            Some(Schema::object().required(&["cert"]).done()),
        )
        .done();
    assert_eq!(s.validate(&json!({"sni": "a", "cert": "c"})), Ok(()));
    assert_eq!(
        s.validate(&json!({"type": "server", "snis": ["a"], "cert": "c"})),
        Ok(())
    );
    // `properties` on an absent property holds, so `then` applies.
    assert_eq!(
        s.validate(&json!({"cert": "c"})),
        Err("then clause did not match".into())
    );
    assert_eq!(
        s.validate(&json!({"sni": "a", "snis": ["a"], "cert": "c"})),
        Err("then clause did not match".into())
    );
    assert_eq!(s.validate(&json!({"type": "client", "cert": "c"})), Ok(()));
    assert_eq!(
        s.validate(&json!({"type": "client"})),
        Err("else clause did not match".into())
    );
    assert_eq!(
        s.validate(&json!({"type": 1})),
        Err("property \"type\" validation failed: wrong type: expected string, got number".into()),
        "the properties are checked first"
    );
    let doc = s.to_json();
    assert_eq!(doc["if"]["properties"]["type"]["enum"], json!(["server"]));
    assert_eq!(doc["then"]["oneOf"][1]["required"], json!(["snis", "cert"]));
    assert_eq!(doc["else"]["required"], json!(["cert"]));
}
