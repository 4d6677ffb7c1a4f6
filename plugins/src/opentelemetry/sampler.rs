//! APISIX's samplers: `always_on`, `always_off`, `trace_id_ratio`
//! (`options.fraction`) and `parent_base` (the client's `sampled` flag when
//! it sent a `traceparent`, else `options.root`).
//!
//! `trace_id_ratio` decides from the trace id alone (its low 63 bits against
//! `fraction` of their range), so every service that samples the same
//! fraction keeps the same traces.

use serde_json::Value;

use super::context::{Parent, TraceId};

/// A compiled sampler.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// Sampled when the trace id's low 63 bits are below this bound.
    Ratio(u64),
    /// The parent's decision, else the root sampler's.
    ParentBased(Box<Sampler>),
}

impl Sampler {
    /// The sampler of a `sampler` object (default `always_off`, as APISIX).
    pub fn from_conf(conf: Option<&Value>) -> Sampler {
        let name = conf
            .and_then(|c| c.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("always_off");
        let options = conf.and_then(|c| c.get("options"));
        match name {
            "parent_base" => {
                let root = options.and_then(|o| o.get("root"));
                let root = match Sampler::simple(root) {
                    // A root may not itself be parent based.
                    Sampler::ParentBased(_) => Sampler::AlwaysOff,
                    other => other,
                };
                Sampler::ParentBased(Box::new(root))
            }
            _ => Sampler::simple(conf),
        }
    }

    fn simple(conf: Option<&Value>) -> Sampler {
        let name = conf
            .and_then(|c| c.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("always_off");
        let fraction = conf
            .and_then(|c| c.get("options"))
            .and_then(|o| o.get("fraction"))
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        match name {
            "always_on" => Sampler::AlwaysOn,
            "trace_id_ratio" => Sampler::ratio(fraction),
            _ => Sampler::AlwaysOff,
        }
    }

    /// `trace_id_ratio` with `fraction` (0 keeps nothing, 1 everything).
    pub fn ratio(fraction: f64) -> Sampler {
        if fraction.is_nan() || fraction <= 0.0 {
            Sampler::AlwaysOff
        } else if fraction >= 1.0 {
            Sampler::AlwaysOn
        } else {
            // Below 2^63, so the cast cannot saturate.
            Sampler::Ratio((fraction * (1u64 << 63) as f64) as u64)
        }
    }

    /// Whether to record the request's trace.
    pub fn sampled(&self, parent: Option<&Parent>, trace_id: &TraceId) -> bool {
        match self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::Ratio(bound) => {
                let mut low = [0u8; 8];
                low.copy_from_slice(&trace_id[8..]);
                (u64::from_be_bytes(low) >> 1) < *bound
            }
            Sampler::ParentBased(root) => match parent {
                Some(p) => p.sampled(),
                None => root.sampled(None, trace_id),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opentelemetry::context::new_trace_id;
    use serde_json::json;

    fn parent(flags: u8) -> Parent {
        Parent {
            trace_id: [1; 16],
            span_id: [2; 8],
            flags,
        }
    }

    #[test]
    fn from_conf_follows_apisix_defaults() {
        assert_eq!(Sampler::from_conf(None), Sampler::AlwaysOff);
        assert_eq!(
            Sampler::from_conf(Some(&json!({"name": "always_on"}))),
            Sampler::AlwaysOn
        );
        assert_eq!(
            Sampler::from_conf(Some(&json!({"name": "trace_id_ratio"}))),
            Sampler::AlwaysOff
        );
        assert_eq!(
            Sampler::from_conf(Some(
                &json!({"name": "trace_id_ratio", "options": {"fraction": 1}})
            )),
            Sampler::AlwaysOn
        );
        assert_eq!(
            Sampler::from_conf(Some(&json!({"name": "parent_base"}))),
            Sampler::ParentBased(Box::new(Sampler::AlwaysOff))
        );
        assert_eq!(
            Sampler::from_conf(Some(
                &json!({"name": "parent_base", "options": {"root": {"name": "always_on"}}})
            )),
            Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
        );
    }

    #[test]
    fn parent_based_follows_the_parent() {
        let s = Sampler::ParentBased(Box::new(Sampler::AlwaysOn));
        let id = [7; 16];
        assert!(s.sampled(Some(&parent(1)), &id));
        assert!(!s.sampled(Some(&parent(0)), &id));
        assert!(s.sampled(None, &id));
        let s = Sampler::ParentBased(Box::new(Sampler::AlwaysOff));
        assert!(!s.sampled(None, &id));
        // Other samplers ignore the parent's decision.
        assert!(Sampler::AlwaysOn.sampled(Some(&parent(0)), &id));
        assert!(!Sampler::AlwaysOff.sampled(Some(&parent(1)), &id));
    }

    #[test]
    fn ratio_keeps_about_its_fraction_and_is_deterministic() {
        let s = Sampler::ratio(0.25);
        let ids: Vec<TraceId> = (0..20_000).map(|_| new_trace_id()).collect();
        let kept = ids.iter().filter(|id| s.sampled(None, id)).count();
        assert!((4_400..5_600).contains(&kept), "{kept}");
        for id in &ids[..100] {
            assert_eq!(s.sampled(None, id), s.sampled(None, id));
        }
        let mut low = [0u8; 16];
        low[15] = 2;
        assert!(s.sampled(None, &low));
        assert!(!s.sampled(None, &[0xff; 16]));
    }
}
