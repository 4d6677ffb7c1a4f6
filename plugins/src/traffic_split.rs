//! `traffic-split`: sends matching requests to other upstreams, by weight
//! (canary releases, blue-green, A/B).
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 966, access
//! phase):
//!
//! ```json
//! {"rules": [{
//!    "match": [{"vars": [["http_release", "==", "canary"]]}],
//!    "weighted_upstreams": [
//!      {"upstream_id": "canary", "weight": 1},
//!      {"upstream": {"type": "roundrobin", "nodes": {"10.0.0.2:80": 1}}, "weight": 1},
//!      {"weight": 2}
//!    ]}]}
//! ```
//!
//! - Rules are tried in order; a rule without `match` takes every request,
//!   otherwise one of its `match` entries (OR) must hold, each a route-style
//!   `vars` expression (AND within). The first rule taken decides; none: the
//!   route's own upstream.
//! - The rule's `weighted_upstreams` are picked by interleaved weighted
//!   round robin (as APISIX's `resty.roundrobin`, exact over each cycle; a
//!   weight 0 entry is never picked unless it is alone). An entry with
//!   neither `upstream` nor `upstream_id` means the route's own upstream;
//!   entries naming the same `upstream_id`, and all such "own upstream"
//!   entries, count as one with the last weight, as in APISIX.
//! - The gateway compiles every upstream a configuration names along with
//!   the route (inline ones keep `name`, `type`, `hash_on`, `pass_host`,
//!   `upstream_host`, `key`, `nodes`, `timeout` and `scheme`, as APISIX
//!   keeps); the plugin puts the pick in the request as an
//!   [`UpstreamPick`] index into [`upstream_refs`].
//! - An `upstream_id` that does not exist (the Admin API does not check
//!   it): 500 `failed to fetch upstream info by upstream id: {id}`, for
//!   every rule up to the one taken, as APISIX.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use http::{request, Response, StatusCode};
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::expr::{self, Expr};
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::roundrobin::RoundRobin;
use crate::schema::Schema;

pub const NAME: &str = "traffic-split";
pub const PRIORITY: i32 = 966;

/// The fields of an inline upstream APISIX keeps.
pub const INLINE_FIELDS: [&str; 9] = [
    "name",
    "type",
    "hash_on",
    "pass_host",
    "upstream_host",
    "key",
    "nodes",
    "timeout",
    "scheme",
];

fn id_schema() -> Schema {
    Schema::AnyOf(vec![
        Schema::string()
            .min(1)
            .max(64)
            .pattern(r"^[a-zA-Z0-9-_.]+$", |s| {
                s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            })
            .done(),
        Schema::integer().min(1.0).int(),
    ])
}

fn build_schema() -> Schema {
    let weighted = Schema::object()
        .prop("upstream_id", id_schema())
        .prop("upstream", Schema::object().done())
        .prop("weight", Schema::integer().min(0.0).int())
        .done();
    let matcher = Schema::object()
        .prop("vars", Schema::array(Schema::Any).done())
        .done();
    let rule = Schema::object()
        .prop("match", Schema::array(matcher).done())
        .prop(
            "weighted_upstreams",
            Schema::array(weighted).min(1).max(20).done(),
        )
        .done();
    Schema::object()
        .prop("rules", Schema::array(rule).done())
        .done()
}

/// The configuration schema. Inline upstreams are checked against the
/// upstream schema by the Admin API ([`upstreams_to_check`]).
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

fn rules(conf: &Value) -> &[Value] {
    conf.get("rules")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn weighted(rule: &Value) -> &[Value] {
    rule.get("weighted_upstreams")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The text of an `upstream_id` (a string or an integer).
fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Schema check, then every `match` expression compiled.
pub fn check(conf: &Value) -> Result<(), String> {
    schema().validate(conf)?;
    for rule in rules(conf) {
        for m in rule
            .get("match")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let vars = m.get("vars").unwrap_or(&Value::Null);
            if vars.is_null() {
                return Err(
                    "failed to validate the 'vars' expression: missing argument rule".into(),
                );
            }
            expr::compile(vars)
                .map_err(|e| format!("failed to validate the 'vars' expression: {e}"))?;
        }
    }
    Ok(())
}

/// The inline upstreams of a configuration, for the Admin API to check
/// against the upstream schema (with the path of each in the message).
pub fn upstreams_to_check(conf: &Value) -> Vec<&Value> {
    rules(conf)
        .iter()
        .flat_map(weighted)
        .filter_map(|w| w.get("upstream"))
        .collect()
}

/// An upstream a configuration can send requests to.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamRef {
    /// An `upstreams/{id}` object.
    Id(String),
    /// An inline upstream, reduced to the fields APISIX keeps.
    Inline(Value),
}

/// Which of [`upstream_refs`] a request goes to; put in the request's
/// extensions by the plugin, read by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamPick(pub usize);

/// Every upstream `conf` names, in order (rules, then entries), each once
/// per entry; the indexes of [`UpstreamPick`].
pub fn upstream_refs(conf: &Value) -> Vec<UpstreamRef> {
    let mut refs = Vec::new();
    for entry in rules(conf).iter().flat_map(weighted) {
        if let Some(up) = entry.get("upstream").and_then(Value::as_object) {
            let kept = up
                .iter()
                .filter(|(k, _)| INLINE_FIELDS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            refs.push(UpstreamRef::Inline(Value::Object(kept)));
        } else if let Some(id) = entry.get("upstream_id").and_then(id_of) {
            refs.push(UpstreamRef::Id(id));
        }
    }
    refs
}

/// Where a picked entry sends the request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    /// The route's own upstream.
    Route,
    /// An index of [`upstream_refs`].
    Ref(usize),
}

struct Rule {
    /// `None`: takes every request. Otherwise any one holding.
    matchers: Option<Vec<Expr>>,
    /// The first `upstream_id` of the rule that does not exist, found when
    /// compiled: requests reaching the rule get APISIX's 500 for it.
    missing_id: Option<String>,
    targets: Vec<Target>,
    picker: RoundRobin,
}

/// The compiled plugin.
pub struct TrafficSplit {
    rules: Vec<Rule>,
}

/// Compiles a checked configuration. `missing` lists the
/// [`upstream_refs`] indexes whose `upstream_id` does not exist.
pub fn compile_with(conf: &Value, missing: HashSet<usize>) -> Result<TrafficSplit, String> {
    let mut next_ref = 0;
    let mut compiled = Vec::new();
    for rule in rules(conf) {
        let matchers = match rule.get("match").and_then(Value::as_array) {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|m| expr::compile(m.get("vars").unwrap_or(&Value::Null)))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        // Entries collapse as APISIX's table keys do: one per upstream_id,
        // one for "the route's own", each inline upstream its own; the
        // last weight wins, in the place of the first.
        let mut targets: Vec<Target> = Vec::new();
        let mut weights: Vec<u64> = Vec::new();
        let mut ids: Vec<(String, usize)> = Vec::new();
        let mut seen_ids: Vec<(String, usize)> = Vec::new();
        let entries = weighted(rule);
        let default_entry = [json!({"weight": 1})];
        let entries = if rule.get("weighted_upstreams").is_none() {
            &default_entry[..]
        } else {
            entries
        };
        for entry in entries {
            let weight = entry.get("weight").and_then(Value::as_u64).unwrap_or(1);
            let slot = if entry.get("upstream").is_some_and(Value::is_object) {
                let t = Target::Ref(next_ref);
                next_ref += 1;
                targets.push(t);
                weights.push(weight);
                continue;
            } else if let Some(id) = entry.get("upstream_id").and_then(id_of) {
                let index = next_ref;
                next_ref += 1;
                ids.push((id.clone(), index));
                match seen_ids.iter().find(|(s, _)| *s == id) {
                    Some((_, first)) => targets.iter().position(|t| *t == Target::Ref(*first)),
                    None => {
                        seen_ids.push((id, index));
                        targets.push(Target::Ref(index));
                        weights.push(weight);
                        continue;
                    }
                }
            } else {
                match targets.iter().position(|t| *t == Target::Route) {
                    Some(at) => Some(at),
                    None => {
                        targets.push(Target::Route);
                        weights.push(weight);
                        continue;
                    }
                }
            };
            if let Some(at) = slot {
                weights[at] = weight;
            }
        }
        // A lone entry is picked whatever its weight.
        if weights.len() == 1 {
            weights[0] = weights[0].max(1);
        }
        compiled.push(Rule {
            matchers,
            missing_id: ids
                .into_iter()
                .find(|(_, i)| missing.contains(i))
                .map(|(id, _)| id),
            targets,
            picker: RoundRobin::new(weights),
        });
    }
    Ok(TrafficSplit { rules: compiled })
}

/// Compiles a checked configuration, asking `cx` which `upstream_id`s
/// exist (all of them, when it cannot tell).
pub fn compile(conf: &Value, cx: &CompileCx<'_>) -> Result<TrafficSplit, String> {
    let missing = upstream_refs(conf)
        .iter()
        .enumerate()
        .filter(|(_, r)| match (r, cx.upstream_exists) {
            (UpstreamRef::Id(id), Some(exists)) => !exists(id),
            _ => false,
        })
        .map(|(i, _)| i)
        .collect();
    compile_with(conf, missing)
}

fn failed_lookup(id: &str) -> Flow {
    tracing::error!(plugin = NAME, "failed to find upstream by id: {id}");
    let mut resp = Response::new(crate::full_body(format!(
        "failed to fetch upstream info by upstream id: {id}"
    )));
    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    Flow::Respond(resp)
}

impl Plugin for TrafficSplit {
    fn phases(&self) -> Phases {
        Phases::ACCESS
    }

    fn access(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let mut taken = None;
        for rule in &self.rules {
            if let Some(id) = &rule.missing_id {
                return failed_lookup(id);
            }
            let holds = match &rule.matchers {
                None => true,
                Some(list) => {
                    let vars = ctx.vars(Some(req));
                    list.iter().any(|m| m.eval(&vars))
                }
            };
            if holds {
                taken = Some(rule);
                break;
            }
        }
        let Some(rule) = taken else {
            return Flow::Continue;
        };
        match rule.picker.pick().and_then(|i| rule.targets.get(i)) {
            Some(Target::Ref(index)) => {
                req.extensions.insert(UpstreamPick(*index));
            }
            Some(Target::Route) | None => {
                req.extensions.remove::<UpstreamPick>();
            }
        }
        Flow::Continue
    }
}

/// The registry entry.
pub struct TrafficSplitSpec;

impl PluginSpec for TrafficSplitSpec {
    fn name(&self) -> &'static str {
        NAME
    }

    fn priority(&self) -> i32 {
        PRIORITY
    }

    fn schema(&self) -> &'static Schema {
        schema()
    }

    fn check(&self, conf: &Value, _target: SchemaType) -> Result<(), String> {
        check(conf)
    }

    fn compile(&self, conf: &Value, cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(compile(conf, cx)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    fn reason(conf: Value) -> String {
        testing::refusal(NAME, &conf)
    }

    #[test]
    fn schema_and_vars_errors() {
        assert_eq!(crate::registry::find(NAME).unwrap().priority(), 966);
        assert!(check(&json!({})).is_ok());
        assert_eq!(
            reason(json!({"rules": [{"match": [{"vars": [["arg_name", 123, "jack"]]}]}]})),
            "failed to validate the 'vars' expression: invalid operator '123'"
        );
        assert_eq!(
            reason(json!({"rules": [{"match": [{}]}]})),
            "failed to validate the 'vars' expression: missing argument rule"
        );
        assert!(
            reason(json!({"rules": [{"weighted_upstreams": []}]})).contains("weighted_upstreams")
        );
        assert!(
            reason(json!({"rules": [{"weighted_upstreams": [{"weight": -1}]}]})).contains("weight")
        );
        assert!(
            reason(json!({"rules": [{"weighted_upstreams": [{"upstream_id": "a b"}]}]}))
                .contains("upstream_id")
        );
    }

    #[test]
    fn refs_keep_apisix_inline_fields() {
        let conf = json!({"rules": [
            {"weighted_upstreams": [
                {"upstream_id": 1, "weight": 1},
                {"upstream": {"nodes": {"a:1": 1}, "retries": 3, "pass_host": "node"}},
                {"weight": 2}
            ]},
            {"weighted_upstreams": [{"upstream_id": "x"}]}
        ]});
        assert_eq!(
            upstream_refs(&conf),
            vec![
                UpstreamRef::Id("1".into()),
                UpstreamRef::Inline(json!({"nodes": {"a:1": 1}, "pass_host": "node"})),
                UpstreamRef::Id("x".into()),
            ]
        );
    }

    fn picks(split: &TrafficSplit, n: usize, headers: &[(&str, &str)]) -> Vec<Option<usize>> {
        (0..n)
            .map(|_| {
                let mut ctx = testing::ctx("127.0.0.1");
                let (mut parts, _) = testing::request("127.0.0.1", "/", headers).into_parts();
                assert!(matches!(split.access(&mut ctx, &mut parts), Flow::Continue));
                parts.extensions.get::<UpstreamPick>().map(|p| p.0)
            })
            .collect()
    }

    #[test]
    fn weights_are_exact_over_a_cycle_and_entries_collapse() {
        let conf = json!({"rules": [{"weighted_upstreams": [
            {"upstream_id": 1, "weight": 2},
            {"upstream": {"nodes": {"a:1": 1}}, "weight": 1},
            {"weight": 1},
            {"upstream_id": 1, "weight": 1},
            {"weight": 2}
        ]}]});
        let split = compile_with(&conf, HashSet::new()).unwrap();
        let got = picks(&split, 40, &[]);
        // id 1 (weight 1, the last), inline (1), own upstream (2).
        assert_eq!(got.iter().filter(|p| **p == Some(0)).count(), 10);
        assert_eq!(got.iter().filter(|p| **p == Some(1)).count(), 10);
        assert_eq!(got.iter().filter(|p| p.is_none()).count(), 20);
    }

    #[test]
    fn rules_match_in_order_and_missing_ids_answer_500() {
        let conf = json!({"rules": [
            {"match": [{"vars": [["http_release", "==", "blue"]]}, {"vars": [["arg_v", "==", "2"]]}],
             "weighted_upstreams": [{"upstream_id": "blue"}]},
            {"match": [{"vars": [["http_release", "==", "red"]]}],
             "weighted_upstreams": [{"upstream_id": "gone"}]}
        ]});
        let split = compile_with(&conf, HashSet::from([1])).unwrap();
        assert_eq!(picks(&split, 1, &[("release", "blue")]), [Some(0)]);
        // Ids are looked up rule by rule before each is tried: a request
        // that reaches the second rule meets its missing id.
        for release in ["red", "green"] {
            let mut ctx = testing::ctx("127.0.0.1");
            let (mut parts, _) =
                testing::request("127.0.0.1", "/", &[("release", release)]).into_parts();
            match split.access(&mut ctx, &mut parts) {
                Flow::Respond(r) => assert_eq!(r.status(), 500),
                _ => panic!("expected 500"),
            }
        }
        let split = compile_with(&conf, HashSet::new()).unwrap();
        assert_eq!(picks(&split, 1, &[("release", "green")]), [None]);
    }
}
