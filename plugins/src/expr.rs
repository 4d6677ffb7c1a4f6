//! Route `vars`: APISIX's lua-resty-expr expressions.
//!
//! ```json
//! [["arg_env", "==", "prod"], ["http_x_tier", "in", ["gold", "silver"]]]
//! ```
//!
//! The top-level list is an AND of rules. A rule is `[var, op, value]` or
//! `[var, "!", op, value]` (negated), or a logical group
//! `["AND" | "OR" | "!AND" | "!OR", rule, rule, ...]`. Operators: `==`, `~=`,
//! `>`, `<`, `>=`, `<=`, `~~` (regex), `~*` (case-insensitive regex), `in`,
//! `has`, `ipmatch`. Regexes and CIDR lists are compiled once, when the
//! route is compiled; evaluation does no parsing.
//!
//! A variable the request does not have is "absent": only `~=` (and negated
//! rules) hold for it.

use std::borrow::Cow;

use regex::{Regex, RegexBuilder};
use serde_json::Value;

use crate::cidr::IpSet;

/// Request variables by APISIX name (`arg_env`, `http_x_tier`, `uri`, ...).
pub trait Vars {
    fn var(&self, name: &str) -> Option<Cow<'_, str>>;
}

/// A compiled expression.
#[derive(Debug, Clone)]
pub enum Expr {
    All(Vec<Expr>),
    Any(Vec<Expr>),
    Not(Box<Expr>),
    Rule { var: String, op: Box<Op> },
}

#[derive(Debug, Clone)]
pub enum Op {
    Eq(Operand),
    Ne(Operand),
    Gt(f64),
    Lt(f64),
    Ge(f64),
    Le(f64),
    Regex(Box<Regex>),
    In(Vec<String>),
    Has(String),
    IpMatch(Box<IpSet>),
}

/// The right-hand side of `==` / `~=`: numbers compare as numbers.
#[derive(Debug, Clone)]
pub enum Operand {
    Str(String),
    Num(f64),
}

/// Why an expression is not valid, in lua-resty-expr's words.
pub type ExprError = String;

/// Compiles a route's `vars` value. The error is the text after APISIX's
/// `failed to validate the 'vars' expression: `.
pub fn compile(vars: &Value) -> Result<Expr, ExprError> {
    let list = vars
        .as_array()
        .ok_or_else(|| "rule should be wrapped inside brackets".to_string())?;
    list.iter()
        .map(compile_rule)
        .collect::<Result<_, _>>()
        .map(Expr::All)
}

fn compile_rule(rule: &Value) -> Result<Expr, ExprError> {
    let items = rule
        .as_array()
        .ok_or_else(|| "rule should be wrapped inside brackets".to_string())?;
    let head = items.first().and_then(Value::as_str).unwrap_or_default();
    match head {
        "AND" | "OR" | "!AND" | "!OR" => {
            let inner = items[1..]
                .iter()
                .map(compile_rule)
                .collect::<Result<Vec<_>, _>>()?;
            let group = if head.ends_with("AND") {
                Expr::All(inner)
            } else {
                Expr::Any(inner)
            };
            Ok(if head.starts_with('!') {
                Expr::Not(Box::new(group))
            } else {
                group
            })
        }
        _ => compile_leaf(items),
    }
}

fn compile_leaf(items: &[Value]) -> Result<Expr, ExprError> {
    let (negated, op_at) = match items.get(1).and_then(Value::as_str) {
        Some("!") => (true, 2),
        _ => (false, 1),
    };
    if items.len() != op_at + 2 {
        return Err(format!(
            "rule too short or too long: {}",
            Value::Array(items.to_vec())
        ));
    }
    let var = items[0]
        .as_str()
        .ok_or_else(|| "invalid var name: expected string".to_string())?
        .to_string();
    // lua-resty-expr names the operator as Lua's tostring prints it.
    let op_name = match &items[op_at] {
        Value::String(s) => s.as_str(),
        other => return Err(format!("invalid operator '{other}'")),
    };
    let value = &items[op_at + 1];
    let number = || {
        value
            .as_f64()
            .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
            .ok_or_else(|| format!("invalid value for operator '{op_name}': expected number"))
    };
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let operand = || match value {
        Value::Number(n) => Operand::Num(n.as_f64().unwrap_or(0.0)),
        other => Operand::Str(text(other)),
    };
    let regex = |ci: bool| {
        let pattern = value
            .as_str()
            .ok_or_else(|| format!("invalid value for operator '{op_name}': expected string"))?;
        RegexBuilder::new(pattern)
            .case_insensitive(ci)
            .build()
            .map_err(|e| format!("invalid regex '{pattern}': {e}"))
    };
    let op = match op_name {
        "==" => Op::Eq(operand()),
        "~=" => Op::Ne(operand()),
        ">" => Op::Gt(number()?),
        "<" => Op::Lt(number()?),
        ">=" => Op::Ge(number()?),
        "<=" => Op::Le(number()?),
        "~~" => Op::Regex(Box::new(regex(false)?)),
        "~*" => Op::Regex(Box::new(regex(true)?)),
        "in" => Op::In(
            value
                .as_array()
                .ok_or_else(|| "invalid value for operator 'in': expected array".to_string())?
                .iter()
                .map(text)
                .collect(),
        ),
        "has" => Op::Has(text(value)),
        "ipmatch" => {
            let entries: Vec<String> = match value {
                Value::String(s) => vec![s.clone()],
                Value::Array(a) => a.iter().map(text).collect(),
                _ => return Err("invalid value for operator 'ipmatch'".to_string()),
            };
            Op::IpMatch(Box::new(
                IpSet::from_entries(&entries).map_err(|e| e.to_string())?,
            ))
        }
        other => return Err(format!("invalid operator '{other}'")),
    };
    let leaf = Expr::Rule {
        var,
        op: Box::new(op),
    };
    Ok(if negated {
        Expr::Not(Box::new(leaf))
    } else {
        leaf
    })
}

impl Expr {
    /// Evaluates against one request's variables.
    pub fn eval(&self, vars: &dyn Vars) -> bool {
        match self {
            Expr::All(list) => list.iter().all(|e| e.eval(vars)),
            Expr::Any(list) => list.iter().any(|e| e.eval(vars)),
            Expr::Not(inner) => !inner.eval(vars),
            Expr::Rule { var, op } => op.holds(vars.var(var).as_deref()),
        }
    }
}

impl Op {
    fn holds(&self, left: Option<&str>) -> bool {
        let Some(left) = left else {
            return matches!(self, Op::Ne(_));
        };
        let num = || left.trim().parse::<f64>().ok();
        match self {
            Op::Eq(r) => r.equals(left),
            Op::Ne(r) => !r.equals(left),
            Op::Gt(r) => num().is_some_and(|l| l > *r),
            Op::Lt(r) => num().is_some_and(|l| l < *r),
            Op::Ge(r) => num().is_some_and(|l| l >= *r),
            Op::Le(r) => num().is_some_and(|l| l <= *r),
            Op::Regex(re) => re.is_match(left),
            Op::In(list) => list.iter().any(|v| v == left),
            Op::Has(v) => left.split(',').any(|part| part.trim() == v),
            Op::IpMatch(set) => left.parse().is_ok_and(|ip| set.contains(ip)),
        }
    }
}

impl Operand {
    fn equals(&self, left: &str) -> bool {
        match self {
            Operand::Str(s) => s == left,
            Operand::Num(n) => left.trim().parse::<f64>().is_ok_and(|l| l == *n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    struct Map(HashMap<&'static str, &'static str>);
    impl Vars for Map {
        fn var(&self, name: &str) -> Option<Cow<'_, str>> {
            self.0.get(name).map(|v| Cow::Borrowed(*v))
        }
    }

    fn eval(expr: Value, vars: &[(&'static str, &'static str)]) -> bool {
        compile(&expr)
            .unwrap()
            .eval(&Map(vars.iter().copied().collect()))
    }

    #[test]
    fn operators() {
        assert!(eval(
            json!([["arg_env", "==", "prod"]]),
            &[("arg_env", "prod")]
        ));
        assert!(!eval(
            json!([["arg_env", "==", "prod"]]),
            &[("arg_env", "dev")]
        ));
        assert!(!eval(json!([["arg_env", "==", "prod"]]), &[]));
        assert!(eval(json!([["arg_env", "~=", "prod"]]), &[]));
        assert!(eval(json!([["arg_age", ">", 18]]), &[("arg_age", "20")]));
        assert!(!eval(json!([["arg_age", "<=", 18]]), &[("arg_age", "20")]));
        assert!(eval(json!([["arg_n", "==", 5]]), &[("arg_n", "5.0")]));
        assert!(eval(
            json!([["uri", "~~", "^/a/[0-9]+$"]]),
            &[("uri", "/a/12")]
        ));
        assert!(eval(
            json!([["http_x", "~*", "^abc$"]]),
            &[("http_x", "ABC")]
        ));
        assert!(eval(
            json!([["http_x", "in", ["a", "b"]]]),
            &[("http_x", "b")]
        ));
        assert!(eval(
            json!([["remote_addr", "ipmatch", ["10.0.0.0/8"]]]),
            &[("remote_addr", "10.2.3.4")]
        ));
        assert!(eval(
            json!([["arg_env", "!", "==", "prod"]]),
            &[("arg_env", "dev")]
        ));
        assert!(eval(
            json!([["OR", ["arg_a", "==", "1"], ["arg_b", "==", "2"]]]),
            &[("arg_b", "2")]
        ));
        assert!(!eval(
            json!([["!OR", ["arg_a", "==", "1"], ["arg_b", "==", "2"]]]),
            &[("arg_b", "2")]
        ));
    }

    #[test]
    fn invalid_operator_message() {
        assert_eq!(
            compile(&json!([["arg_name", "=", "json"]])).unwrap_err(),
            "invalid operator '='"
        );
        assert!(compile(&json!([["arg_name", "~~", "("]])).is_err());
        assert!(compile(&json!("x")).is_err());
    }
}
