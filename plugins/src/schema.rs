//! A small JSON-schema checker that answers with the messages APISIX users know.
//!
//! APISIX validates Admin API input with the `jsonschema` Lua library, and its
//! error strings (`property "retries" validation failed: expected -1 to be at
//! least 0`) are part of the Admin API contract: tooling greps for them. This
//! module implements the subset of JSON schema that routes, upstreams and
//! plugins use, producing the same wording, and can print itself as JSON
//! schema for `GET /apisix/admin/schema/...`.
//!
//! Checks run in a fixed order for objects: `required`, then each declared
//! property in declaration order, then `additionalProperties`, then
//! `oneOf`/`anyOf`, then `if`/`then`/`else`. The first failure is reported.

use serde_json::{json, Map, Value};

/// A custom check: returns `Err(message)` when the value is not acceptable.
pub type CustomCheck = fn(&Value) -> Result<(), String>;

/// A pattern: the regex text reported in errors and the check that implements it.
pub type Pattern = (&'static str, fn(&str) -> bool);

/// One node of a schema.
#[derive(Clone)]
pub enum Schema {
    /// Anything at all.
    Any,
    Boolean,
    String(StringRule),
    /// An integer (a JSON number without fraction).
    Integer(NumberRule),
    Number(NumberRule),
    Array(Box<ArrayRule>),
    Object(Box<ObjectRule>),
    /// Valid when at least one alternative is; else "object matches none of the required".
    AnyOf(Vec<Schema>),
    /// Valid when exactly one alternative is.
    OneOf(Vec<Schema>),
    /// A hand-written check, with the JSON schema text it stands for.
    Custom(CustomCheck, fn() -> Value),
    /// Valid when the inner schema is not.
    Not(Box<Schema>),
}

#[derive(Clone, Default)]
pub struct StringRule {
    pub min_len: Option<usize>,
    pub max_len: Option<usize>,
    pub one_of: Option<&'static [&'static str]>,
    /// A pattern check with the pattern text it reports.
    pub pattern: Option<Pattern>,
}

#[derive(Clone, Default)]
pub struct NumberRule {
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
    pub exclusive_minimum: Option<f64>,
    pub one_of: Option<&'static [i64]>,
}

#[derive(Clone)]
pub struct ArrayRule {
    pub items: Schema,
    pub min_items: Option<usize>,
    pub max_items: Option<usize>,
    pub unique: bool,
}

#[derive(Clone, Default)]
pub struct ObjectRule {
    pub properties: Vec<(&'static str, Schema)>,
    pub required: Vec<&'static str>,
    /// `None`: any extra property is allowed; `Some(None)`: forbidden;
    /// `Some(Some(schema))`: extra properties must match `schema`.
    pub additional: Option<Option<Schema>>,
    /// Exactly one of these `required` sets must be satisfied.
    pub one_of_required: Vec<Vec<&'static str>>,
    /// `(property, value)`: an object whose `property` is the string
    /// `value` is exempt from `one_of_required` (a ferrogate extension that
    /// needs neither set, such as an `original_dst` upstream).
    pub one_of_waived_by: Option<(&'static str, &'static str)>,
    /// At least one of these `required` sets must be satisfied.
    pub any_of_required: Vec<Vec<&'static str>>,
    /// Whether the `any_of_required` failure lists the sets, as APISIX's
    /// library does for schemas written with them (`...: ["a"] or ["a","b"]`).
    pub list_any_of_sets: bool,
    /// `dependencies`: when the named property is present, the whole object
    /// must also match the schema.
    pub dependencies: Vec<(&'static str, Schema)>,
    pub min_properties: Option<usize>,
    pub max_properties: Option<usize>,
    /// `if`/`then`/`else`, checked after everything else.
    pub conditional: Option<Box<Conditional>>,
}

/// JSON schema's `if`/`then`/`else` on an object: when the object matches
/// `condition` it must match `then`, otherwise `otherwise`. As in JSON
/// schema, `properties` in `condition` holds for an object that lacks the
/// property, so `{"properties": {"type": {"enum": ["server"]}}}` matches an
/// object without `type`.
#[derive(Clone)]
pub struct Conditional {
    pub condition: Schema,
    pub then: Option<Schema>,
    pub otherwise: Option<Schema>,
}

impl Schema {
    pub fn string() -> StringRule {
        StringRule::default()
    }

    pub fn object() -> ObjectRule {
        ObjectRule::default()
    }

    pub fn integer() -> NumberRule {
        NumberRule::default()
    }

    pub fn array(items: Schema) -> ArrayRule {
        ArrayRule {
            items,
            min_items: None,
            max_items: None,
            unique: false,
        }
    }

    /// Checks `value`; the error is the message APISIX would give, without
    /// any "invalid configuration: " prefix.
    pub fn validate(&self, value: &Value) -> Result<(), String> {
        match self {
            Schema::Any => Ok(()),
            Schema::Boolean => expect_type(value, "boolean", value.is_boolean()),
            Schema::String(rule) => rule.validate(value),
            Schema::Integer(rule) => {
                let is_int = value.as_i64().is_some()
                    || value.as_u64().is_some()
                    || value.as_f64().is_some_and(|f| f.fract() == 0.0);
                expect_type(value, "integer", is_int)?;
                rule.validate(value)
            }
            Schema::Number(rule) => {
                expect_type(value, "number", value.is_number())?;
                rule.validate(value)
            }
            Schema::Array(rule) => rule.validate(value),
            Schema::Object(rule) => rule.validate(value),
            Schema::AnyOf(alts) => {
                if alts.iter().any(|s| s.validate(value).is_ok()) {
                    Ok(())
                } else {
                    Err("object matches none of the required".to_string())
                }
            }
            Schema::OneOf(alts) => {
                let matched: Vec<usize> = alts
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.validate(value).is_ok())
                    .map(|(i, _)| i + 1)
                    .collect();
                one_of_outcome(&matched)
            }
            Schema::Custom(check, _) => check(value),
            Schema::Not(inner) => match inner.validate(value) {
                Ok(()) => Err("value wasn't supposed to match schema".to_string()),
                Err(_) => Ok(()),
            },
        }
    }

    /// The JSON schema this node stands for.
    pub fn to_json(&self) -> Value {
        match self {
            Schema::Any => json!({}),
            Schema::Boolean => json!({"type": "boolean"}),
            Schema::String(r) => {
                let mut m = type_map("string");
                put_opt(&mut m, "minLength", r.min_len.map(Value::from));
                put_opt(&mut m, "maxLength", r.max_len.map(Value::from));
                put_opt(&mut m, "enum", r.one_of.map(|e| json!(e)));
                put_opt(&mut m, "pattern", r.pattern.map(|(p, _)| json!(p)));
                Value::Object(m)
            }
            Schema::Integer(r) => r.to_json("integer"),
            Schema::Number(r) => r.to_json("number"),
            Schema::Array(r) => {
                let mut m = type_map("array");
                m.insert("items".into(), r.items.to_json());
                put_opt(&mut m, "minItems", r.min_items.map(Value::from));
                put_opt(&mut m, "maxItems", r.max_items.map(Value::from));
                if r.unique {
                    m.insert("uniqueItems".into(), Value::Bool(true));
                }
                Value::Object(m)
            }
            Schema::Object(r) => r.to_json(),
            Schema::AnyOf(alts) => {
                json!({"anyOf": alts.iter().map(Schema::to_json).collect::<Vec<_>>()})
            }
            Schema::OneOf(alts) => {
                json!({"oneOf": alts.iter().map(Schema::to_json).collect::<Vec<_>>()})
            }
            Schema::Custom(_, doc) => doc(),
            Schema::Not(inner) => json!({"not": inner.to_json()}),
        }
    }
}

fn type_map(ty: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("type".into(), json!(ty));
    m
}

fn put_opt(m: &mut Map<String, Value>, key: &str, v: Option<Value>) {
    if let Some(v) = v {
        m.insert(key.into(), v);
    }
}

fn one_of_outcome(matched: &[usize]) -> Result<(), String> {
    match matched {
        [_] => Ok(()),
        [] => Err("value should match only one schema, but matches none".to_string()),
        [a, b, ..] => Err(format!(
            "value should match only one schema, but matches both schemas {a} and {b}"
        )),
    }
}

/// The JSON type name of a value, as the Lua jsonschema library reports it.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn expect_type(value: &Value, expected: &str, ok: bool) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!(
            "wrong type: expected {expected}, got {}",
            type_name(value)
        ))
    }
}

/// Formats a number the way Lua prints it: integers without a fraction.
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

impl StringRule {
    pub fn min(mut self, n: usize) -> Self {
        self.min_len = Some(n);
        self
    }
    pub fn max(mut self, n: usize) -> Self {
        self.max_len = Some(n);
        self
    }
    pub fn enumerated(mut self, values: &'static [&'static str]) -> Self {
        self.one_of = Some(values);
        self
    }
    pub fn pattern(mut self, text: &'static str, check: fn(&str) -> bool) -> Self {
        self.pattern = Some((text, check));
        self
    }
    pub fn done(self) -> Schema {
        Schema::String(self)
    }

    fn validate(&self, value: &Value) -> Result<(), String> {
        let Some(s) = value.as_str() else {
            return expect_type(value, "string", false);
        };
        // Lua counts bytes; utf8 code points are what users mean, and for
        // the ASCII names this guards it is the same number.
        let len = s.chars().count();
        if let Some(min) = self.min_len {
            if len < min {
                return Err(format!(
                    "string too short, expected at least {min}, got {len}"
                ));
            }
        }
        if let Some(max) = self.max_len {
            if len > max {
                return Err(format!(
                    "string too long, expected at most {max}, got {len}"
                ));
            }
        }
        if let Some((text, check)) = self.pattern {
            if !check(s) {
                return Err(format!("failed to match pattern {text:?} with {s:?}"));
            }
        }
        if let Some(values) = self.one_of {
            if !values.contains(&s) {
                return Err("matches none of the enum values".to_string());
            }
        }
        Ok(())
    }
}

impl NumberRule {
    pub fn min(mut self, v: f64) -> Self {
        self.minimum = Some(v);
        self
    }
    pub fn max(mut self, v: f64) -> Self {
        self.maximum = Some(v);
        self
    }
    pub fn greater_than(mut self, v: f64) -> Self {
        self.exclusive_minimum = Some(v);
        self
    }
    pub fn enumerated(mut self, values: &'static [i64]) -> Self {
        self.one_of = Some(values);
        self
    }
    pub fn int(self) -> Schema {
        Schema::Integer(self)
    }
    pub fn number(self) -> Schema {
        Schema::Number(self)
    }

    fn validate(&self, value: &Value) -> Result<(), String> {
        let v = value.as_f64().unwrap_or(0.0);
        if let Some(min) = self.minimum {
            if v < min {
                return Err(format!("expected {} to be at least {}", num(v), num(min)));
            }
        }
        if let Some(min) = self.exclusive_minimum {
            if v <= min {
                return Err(format!(
                    "expected {} to be greater than {}",
                    num(v),
                    num(min)
                ));
            }
        }
        if let Some(max) = self.maximum {
            if v > max {
                return Err(format!("expected {} to be at most {}", num(v), num(max)));
            }
        }
        if let Some(values) = self.one_of {
            if !values.iter().any(|&e| e as f64 == v) {
                return Err("matches none of the enum values".to_string());
            }
        }
        Ok(())
    }

    fn to_json(&self, ty: &str) -> Value {
        let mut m = type_map(ty);
        put_opt(&mut m, "minimum", self.minimum.map(|v| json!(v)));
        put_opt(&mut m, "maximum", self.maximum.map(|v| json!(v)));
        put_opt(
            &mut m,
            "exclusiveMinimum",
            self.exclusive_minimum.map(|v| json!(v)),
        );
        put_opt(&mut m, "enum", self.one_of.map(|e| json!(e)));
        Value::Object(m)
    }
}

impl ArrayRule {
    pub fn min(mut self, n: usize) -> Self {
        self.min_items = Some(n);
        self
    }
    pub fn max(mut self, n: usize) -> Self {
        self.max_items = Some(n);
        self
    }
    pub fn unique(mut self) -> Self {
        self.unique = true;
        self
    }
    pub fn done(self) -> Schema {
        Schema::Array(Box::new(self))
    }

    fn validate(&self, value: &Value) -> Result<(), String> {
        let Some(items) = value.as_array() else {
            return expect_type(value, "array", false);
        };
        if let Some(min) = self.min_items {
            if items.len() < min {
                return Err(format!("expect array to have at least {min} items"));
            }
        }
        if let Some(max) = self.max_items {
            if items.len() > max {
                return Err(format!("expect array to have at most {max} items"));
            }
        }
        for (i, item) in items.iter().enumerate() {
            self.items
                .validate(item)
                .map_err(|e| format!("failed to validate item {}: {e}", i + 1))?;
        }
        if self.unique {
            // Linear in the number of items: bodies can hold 100k of them.
            let mut seen: std::collections::HashMap<String, usize> =
                std::collections::HashMap::new();
            for (j, item) in items.iter().enumerate() {
                if let Some(i) = seen.insert(item.to_string(), j) {
                    return Err(format!(
                        "expected unique items but items {} and {} are equal",
                        i + 1,
                        j + 1
                    ));
                }
            }
        }
        Ok(())
    }
}

impl ObjectRule {
    pub fn prop(mut self, name: &'static str, schema: Schema) -> Self {
        self.properties.push((name, schema));
        self
    }
    pub fn required(mut self, names: &[&'static str]) -> Self {
        self.required.extend_from_slice(names);
        self
    }
    pub fn no_additional(mut self) -> Self {
        self.additional = Some(None);
        self
    }
    pub fn additional(mut self, schema: Schema) -> Self {
        self.additional = Some(Some(schema));
        self
    }
    pub fn one_of_required(mut self, sets: &[&[&'static str]]) -> Self {
        self.one_of_required = sets.iter().map(|s| s.to_vec()).collect();
        self
    }
    /// Waives `one_of_required` for objects whose `property` is `value`.
    pub fn one_of_waived_by(mut self, property: &'static str, value: &'static str) -> Self {
        self.one_of_waived_by = Some((property, value));
        self
    }
    pub fn any_of_required(mut self, sets: &[&[&'static str]]) -> Self {
        self.any_of_required = sets.iter().map(|s| s.to_vec()).collect();
        self
    }
    /// Like [`Self::any_of_required`], and the failure names the sets.
    pub fn any_of_required_listed(mut self, sets: &[&[&'static str]]) -> Self {
        self.list_any_of_sets = true;
        self.any_of_required(sets)
    }
    /// When `name` is present, the object must also match `schema`.
    pub fn dependency(mut self, name: &'static str, schema: Schema) -> Self {
        self.dependencies.push((name, schema));
        self
    }
    pub fn max_properties(mut self, n: usize) -> Self {
        self.max_properties = Some(n);
        self
    }

    pub fn min_properties(mut self, n: usize) -> Self {
        self.min_properties = Some(n);
        self
    }
    /// `if`/`then`/`else` (see [`Conditional`]); failures read `then clause
    /// did not match` / `else clause did not match`, as APISIX's library
    /// words them, without the inner reason.
    pub fn if_then_else(
        mut self,
        condition: Schema,
        then: Option<Schema>,
        otherwise: Option<Schema>,
    ) -> Self {
        self.conditional = Some(Box::new(Conditional {
            condition,
            then,
            otherwise,
        }));
        self
    }
    pub fn done(self) -> Schema {
        Schema::Object(Box::new(self))
    }

    /// The schema of a declared property.
    pub fn property(&self, name: &str) -> Option<&Schema> {
        self.properties
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s)
    }

    fn validate(&self, value: &Value) -> Result<(), String> {
        let Some(obj) = value.as_object() else {
            return expect_type(value, "object", false);
        };
        if let Some(min) = self.min_properties {
            if obj.len() < min {
                return Err(format!("expect object to have at least {min} properties"));
            }
        }
        if let Some(max) = self.max_properties {
            if obj.len() > max {
                return Err(format!("expect object to have at most {max} properties"));
            }
        }
        for name in &self.required {
            if !obj.contains_key(*name) {
                return Err(format!("property \"{name}\" is required"));
            }
        }
        // An object names a few of the many properties a schema declares:
        // each of its keys is looked for among them (short string compares),
        // where a lookup of each declared name would hash it. Only a failure
        // walks the declared order, which decides the error reported.
        let fine = obj.iter().all(|(key, v)| match self.property(key) {
            Some(schema) => schema.validate(v).is_ok(),
            None => true,
        });
        if !fine {
            for (name, schema) in &self.properties {
                if let Some(v) = obj.get(*name) {
                    schema
                        .validate(v)
                        .map_err(|e| format!("property \"{name}\" validation failed: {e}"))?;
                }
            }
        }
        for (name, schema) in &self.dependencies {
            if obj.contains_key(*name) {
                schema.validate(value).map_err(|e| {
                    format!("failed to validate dependent schema for \"{name}\": {e}")
                })?;
            }
        }
        match &self.additional {
            None => {}
            Some(extra) => {
                for (key, v) in obj {
                    if self.property(key).is_some() {
                        continue;
                    }
                    match extra {
                        None => {
                            return Err(format!("additional properties forbidden, found {key}"))
                        }
                        Some(schema) => schema.validate(v).map_err(|e| {
                            format!("failed to validate additional property {key}: {e}")
                        })?,
                    }
                }
            }
        }
        let waived = self
            .one_of_waived_by
            .is_some_and(|(k, v)| obj.get(k).and_then(Value::as_str) == Some(v));
        if !self.one_of_required.is_empty() && !waived {
            let matched: Vec<usize> = self
                .one_of_required
                .iter()
                .enumerate()
                .filter(|(_, set)| set.iter().all(|k| obj.contains_key(*k)))
                .map(|(i, _)| i + 1)
                .collect();
            one_of_outcome(&matched)?;
        }
        if !self.any_of_required.is_empty()
            && !self
                .any_of_required
                .iter()
                .any(|set| set.iter().all(|k| obj.contains_key(*k)))
        {
            if !self.list_any_of_sets {
                return Err("object matches none of the required".to_string());
            }
            let sets: Vec<String> = self
                .any_of_required
                .iter()
                .map(|set| json!(set).to_string())
                .collect();
            return Err(format!(
                "object matches none of the required: {}",
                sets.join(" or ")
            ));
        }
        if let Some(c) = &self.conditional {
            if c.condition.validate(value).is_ok() {
                if c.then.as_ref().is_some_and(|s| s.validate(value).is_err()) {
                    return Err("then clause did not match".to_string());
                }
            } else if c
                .otherwise
                .as_ref()
                .is_some_and(|s| s.validate(value).is_err())
            {
                return Err("else clause did not match".to_string());
            }
        }
        Ok(())
    }

    fn to_json(&self) -> Value {
        let mut m = type_map("object");
        let props: Map<String, Value> = self
            .properties
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_json()))
            .collect();
        m.insert("properties".into(), Value::Object(props));
        if !self.required.is_empty() {
            m.insert("required".into(), json!(self.required));
        }
        match &self.additional {
            None => {}
            Some(None) => {
                m.insert("additionalProperties".into(), Value::Bool(false));
            }
            Some(Some(s)) => {
                m.insert("additionalProperties".into(), s.to_json());
            }
        }
        let sets = |sets: &Vec<Vec<&str>>| -> Value {
            sets.iter().map(|s| json!({ "required": s })).collect()
        };
        if !self.one_of_required.is_empty() {
            m.insert("oneOf".into(), sets(&self.one_of_required));
        }
        if !self.any_of_required.is_empty() {
            m.insert("anyOf".into(), sets(&self.any_of_required));
        }
        if !self.dependencies.is_empty() {
            let deps: Map<String, Value> = self
                .dependencies
                .iter()
                .map(|(n, s)| (n.to_string(), s.to_json()))
                .collect();
            m.insert("dependencies".into(), Value::Object(deps));
        }
        if let Some(c) = &self.conditional {
            m.insert("if".into(), c.condition.to_json());
            put_opt(&mut m, "then", c.then.as_ref().map(Schema::to_json));
            put_opt(&mut m, "else", c.otherwise.as_ref().map(Schema::to_json));
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests;
