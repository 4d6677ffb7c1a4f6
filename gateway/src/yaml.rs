//! YAML text read into JSON values, with a bound on what aliases expand to.
//!
//! An alias (`*a`) stands for a copy of its anchor (`&a`), so a short file
//! can stand for an enormous document: a list of a hundred thousand aliases
//! to a list of a hundred thousand items is 600 KB of text and 10^10 values,
//! enough to exhaust any machine's memory. The YAML parser bounds how many
//! aliases are followed, not what they expand to; this reader counts every
//! value it builds and gives up past [`extra_nodes`] more than the text
//! itself could hold.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Values the aliases of a document may add to what its text holds (a
/// value takes at least one byte of text when written out): about 100 MiB
/// of values at the most, far more than repeated upstreams or plugin
/// configurations need.
pub const EXTRA_NODES: usize = 1_000_000;

/// How many values a document of `text_len` bytes may expand to.
fn extra_nodes(text_len: usize) -> usize {
    text_len.saturating_add(EXTRA_NODES)
}

/// Parses `text` into a value; fails as the YAML parser does, or when its
/// aliases expand beyond the bound.
pub fn parse(text: &str) -> Result<Value, serde_norway::Error> {
    let budget = Cell::new(extra_nodes(text.len()));
    Budgeted(&budget).deserialize(serde_norway::Deserializer::from_str(text))
}

/// Builds one value, counting it and everything in it against the budget.
struct Budgeted<'a>(&'a Cell<usize>);

impl Budgeted<'_> {
    fn take<E: de::Error>(&self) -> Result<(), E> {
        match self.0.get().checked_sub(1) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(E::custom(format!(
                "the document's aliases expand to more than {EXTRA_NODES} values beyond its text"
            ))),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Budgeted<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Budgeted<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.take()?;
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Budgeted(self.0))? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            self.take()?;
            let value = map.next_value_seed(Budgeted(self.0))?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_yaml_parser_reads() {
        let text =
            "a: 1\nb: [true, 2.5, null, x]\nc: {d: -3}\n1: one\nanchor: &u {n: 1}\nuse: *u\n";
        let ours = parse(text).unwrap();
        let theirs: Value = serde_norway::from_str(text).unwrap();
        assert_eq!(ours, theirs);
        assert_eq!(ours["use"]["n"], 1);
    }

    #[test]
    fn aliases_expanding_beyond_the_bound_are_refused() {
        // 2,000 aliases to a list of 1,000 items: 2M values from 12 KB.
        let items = vec!["0"; 1_000].join(",");
        let aliases = vec!["*a"; 2_000].join(",");
        let text = format!("a: &a [{items}]\nb: [{aliases}]\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("aliases expand"), "{err}");
        // Half of that fits.
        let aliases = vec!["*a"; 500].join(",");
        let text = format!("a: &a [{items}]\nb: [{aliases}]\n");
        assert_eq!(parse(&text).unwrap()["b"][499][999], 0);
    }
}
