//! Text templates plugins fill in per request, parsed once at compile time.
//!
//! [`Template`] is APISIX's `core.utils.resolve_var`: `$name` (`name` of
//! ASCII word characters and dots) or `${name}` / `${ name ?? default }` is
//! replaced by the request variable, a variable the request does not have
//! by the default or the empty string; a `$` preceded by `\` is left as it
//! is (backslash included). With [`Template::with_captures`], `$N`, `${N}`
//! (and `${N`, `$N}`: braces are optional on both sides, as in APISIX's
//! pattern) name regex captures first, as `resolve_var_with_captures` does
//! for proxy-rewrite's header values.
//!
//! [`Replacement`] is the replacement template of `ngx.re.sub`: `$0`, `$N`,
//! `${N}` and `$$`. Rust's own replacement syntax reads `$1a` as the group
//! named `1a`; this one reads it as group 1 followed by `a`, as nginx does.

use std::borrow::Cow;

use crate::expr::Vars;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Var {
        name: String,
        default: Option<String>,
    },
    Capture(usize),
}

/// How variable values are escaped when they are put in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    None,
    /// The first `?` of each value becomes `%3F` (proxy-rewrite's `uri`).
    QuestionMark,
}

/// A parsed `$var` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segs: Vec<Seg>,
    /// Bytes a rendering usually needs: the literal text and a typical
    /// value per variable, so a short template renders without growing its
    /// buffer.
    room: usize,
}

/// A rendered template and how many variables it resolved (APISIX's
/// `n_resolved`: found, or given a default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub resolved: usize,
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'.'
}

impl Template {
    /// `$var` only.
    pub fn new(text: &str) -> Template {
        Template::parse(text, false)
    }

    /// `$N` regex captures first, then `$var`.
    pub fn with_captures(text: &str) -> Template {
        Template::parse(text, true)
    }

    fn parse(text: &str, captures: bool) -> Template {
        let bytes = text.as_bytes();
        let mut segs = Vec::new();
        let mut lit = String::new();
        let mut i = 0;
        let mut last = 0;
        while i < bytes.len() {
            if bytes[i] != b'$' || (i > 0 && bytes[i - 1] == b'\\') {
                i += 1;
                continue;
            }
            let parsed = if captures {
                parse_capture(bytes, i + 1)
            } else {
                None
            }
            .or_else(|| parse_var(text, i + 1));
            let Some((seg, end)) = parsed else {
                i += 1;
                continue;
            };
            lit.push_str(&text[last..i]);
            if !lit.is_empty() {
                segs.push(Seg::Lit(std::mem::take(&mut lit)));
            }
            segs.push(seg);
            i = end;
            last = end;
        }
        lit.push_str(&text[last..]);
        if !lit.is_empty() {
            segs.push(Seg::Lit(lit));
        }
        let room = segs
            .iter()
            .map(|s| match s {
                Seg::Lit(l) => l.len(),
                Seg::Capture(_) | Seg::Var { .. } => 24,
            })
            .sum();
        Template { segs, room }
    }

    /// The text, when the template has no variables.
    pub fn literal(&self) -> Option<&str> {
        match self.segs.as_slice() {
            [] => Some(""),
            [Seg::Lit(s)] => Some(s),
            _ => None,
        }
    }

    /// Whether any `$N` capture is used.
    pub fn uses_captures(&self) -> bool {
        self.segs.iter().any(|s| matches!(s, Seg::Capture(_)))
    }

    /// The variable names used.
    pub fn var_names(&self) -> impl Iterator<Item = &str> {
        self.segs.iter().filter_map(|s| match s {
            Seg::Var { name, .. } => Some(name.as_str()),
            _ => None,
        })
    }

    /// Fills the template in. `captures[n]` is capture `n` (missing ones
    /// are empty).
    pub fn render(&self, vars: &dyn Vars, captures: &[Option<String>], escape: Escape) -> Rendered {
        let mut text = String::with_capacity(self.room);
        let mut resolved = 0;
        for seg in &self.segs {
            match seg {
                Seg::Lit(s) => text.push_str(s),
                Seg::Capture(n) => {
                    if let Some(Some(c)) = captures.get(*n) {
                        text.push_str(c);
                    }
                }
                Seg::Var { name, default } => {
                    let value = vars.var(name);
                    let value: Cow<'_, str> = match (value, default) {
                        (Some(v), _) => v,
                        (None, Some(d)) => Cow::Borrowed(d.as_str()),
                        (None, None) => continue,
                    };
                    resolved += 1;
                    match (escape, value.find('?')) {
                        (Escape::QuestionMark, Some(at)) => {
                            text.push_str(&value[..at]);
                            text.push_str("%3F");
                            text.push_str(&value[at + 1..]);
                        }
                        _ => text.push_str(&value),
                    }
                }
            }
        }
        Rendered { text, resolved }
    }
}

/// `$N`, `${N`, `$N}`, `${N}` at `from` (just after the `$`).
fn parse_capture(bytes: &[u8], from: usize) -> Option<(Seg, usize)> {
    let mut i = from;
    if bytes.get(i) == Some(&b'{') {
        i += 1;
    }
    let start = i;
    while bytes.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    if i == start {
        return None;
    }
    // Digits only, so this is valid UTF-8; an absurd number is no capture.
    let n = std::str::from_utf8(&bytes[start..i]).ok()?.parse().ok()?;
    if bytes.get(i) == Some(&b'}') {
        i += 1;
    }
    Some((Seg::Capture(n), i))
}

/// `${ name ?? default }` or `$name` at `from` (just after the `$`).
fn parse_var(text: &str, from: usize) -> Option<(Seg, usize)> {
    let bytes = text.as_bytes();
    if bytes.get(from) == Some(&b'{') {
        let close = text[from + 1..].find('}').map(|at| from + 1 + at)?;
        let inner = &text[from + 1..close];
        if inner.is_empty() {
            return None;
        }
        let inner = inner.trim();
        let (name, default) = match inner.split_once("??") {
            Some((name, rest)) => {
                // Only the first default counts: `a ?? b ?? c` is `b`.
                let rest = rest.trim_start();
                let default = rest.split("??").next().unwrap_or_default().trim_end();
                (name.trim_end(), Some(default.to_string()))
            }
            None => (inner, None),
        };
        return Some((
            Seg::Var {
                name: name.to_string(),
                default,
            },
            close + 1,
        ));
    }
    let mut end = from;
    while bytes.get(end).copied().is_some_and(is_word) {
        end += 1;
    }
    (end > from).then(|| {
        (
            Seg::Var {
                name: text[from..end].to_string(),
                default: None,
            },
            end,
        )
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RSeg {
    Lit(Vec<u8>),
    Group(usize),
}

/// An `ngx.re.sub` replacement template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacement {
    segs: Vec<RSeg>,
}

impl Replacement {
    /// Parses `$0`, `$N`, `${N}`, `$$`; any other `$` is an error, as in
    /// ngx_lua.
    pub fn parse(text: &str) -> Result<Replacement, String> {
        let bytes = text.as_bytes();
        let mut segs = Vec::new();
        let mut lit = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] != b'$' {
                lit.push(bytes[i]);
                i += 1;
                continue;
            }
            let braced = bytes.get(i + 1) == Some(&b'{');
            let start = if braced { i + 2 } else { i + 1 };
            if !braced && bytes.get(i + 1) == Some(&b'$') {
                lit.push(b'$');
                i += 2;
                continue;
            }
            let mut end = start;
            while bytes.get(end).is_some_and(u8::is_ascii_digit) {
                end += 1;
            }
            let n = std::str::from_utf8(&bytes[start..end])
                .ok()
                .and_then(|d| d.parse::<usize>().ok());
            let Some(n) = n else {
                return Err(format!(
                    "invalid capturing variable name in replacement template \"{text}\""
                ));
            };
            if braced {
                if bytes.get(end) != Some(&b'}') {
                    return Err(format!(
                        "the closing bracket in \"{text}\" variable is missing"
                    ));
                }
                end += 1;
            }
            if !lit.is_empty() {
                segs.push(RSeg::Lit(std::mem::take(&mut lit)));
            }
            segs.push(RSeg::Group(n));
            i = end;
        }
        if !lit.is_empty() {
            segs.push(RSeg::Lit(lit));
        }
        Ok(Replacement { segs })
    }

    /// Appends the expansion; `group(n)` is the text of group `n`, if it
    /// took part in the match.
    pub fn expand<'h>(&self, group: impl Fn(usize) -> Option<&'h [u8]>, out: &mut Vec<u8>) {
        for seg in &self.segs {
            match seg {
                RSeg::Lit(b) => out.extend_from_slice(b),
                RSeg::Group(n) => {
                    if let Some(g) = group(*n) {
                        out.extend_from_slice(g);
                    }
                }
            }
        }
    }

    /// The expansion for a match of a text regex.
    pub fn expand_str(&self, caps: &regex::Captures<'_>, out: &mut String) {
        for seg in &self.segs {
            match seg {
                RSeg::Lit(b) => out.push_str(&String::from_utf8_lossy(b)),
                RSeg::Group(n) => {
                    if let Some(g) = caps.get(*n) {
                        out.push_str(g.as_str());
                    }
                }
            }
        }
    }
}

impl regex::bytes::Replacer for &Replacement {
    fn replace_append(&mut self, caps: &regex::bytes::Captures<'_>, dst: &mut Vec<u8>) {
        self.expand(|n| caps.get(n).map(|m| m.as_bytes()), dst);
    }
}

/// A regex compile error worded like PCRE's through ngx_lua:
/// `pcre_compile() failed: unclosed group in "(a"`.
pub fn regex_error(pattern: &str, err: &regex::Error) -> String {
    let text = err.to_string();
    let reason = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().trim_start_matches("error: "))
        .unwrap_or("invalid pattern");
    format!("pcre_compile() failed: {reason} in \"{pattern}\"")
}

/// A JSON number as Lua's `tostring` prints it (`10`, not `10.0`).
pub fn lua_number(n: &serde_json::Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        Some(f) => format!("{f}"),
        None => n.to_string(),
    }
}

/// Header values in configurations are strings or numbers.
pub fn scalar_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(lua_number(n)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<&'static str, &'static str>);
    impl Vars for Map {
        fn var(&self, name: &str) -> Option<Cow<'_, str>> {
            self.0.get(name).map(|v| Cow::Borrowed(*v))
        }
    }

    fn vars() -> Map {
        Map(HashMap::from([
            ("uri", "/a/b"),
            ("remote_addr", "10.0.0.1"),
            ("arg_q", "x?y?z"),
        ]))
    }

    fn render(t: &Template) -> Rendered {
        t.render(&vars(), &[], Escape::None)
    }

    #[test]
    fn variables() {
        let t = Template::new("$uri-${ remote_addr }-$nope-${nope ?? dflt}-\\$uri-$");
        assert_eq!(
            render(&t),
            Rendered {
                text: "/a/b-10.0.0.1--dflt-\\$uri-$".into(),
                resolved: 3
            }
        );
        assert_eq!(Template::new("plain").literal(), Some("plain"));
        assert_eq!(Template::new("$uri").literal(), None);
        assert_eq!(render(&Template::new("${}x")).text, "${}x");
        assert_eq!(render(&Template::new("$nope")).resolved, 0);
        let t = Template::new("$a.b-${c}");
        let names: Vec<&str> = t.var_names().collect();
        assert_eq!(names, ["a.b", "c"]);
    }

    #[test]
    fn question_marks_in_values_are_escaped_once() {
        let t = Template::new("/p/$arg_q");
        assert_eq!(
            t.render(&vars(), &[], Escape::QuestionMark).text,
            "/p/x%3Fy?z"
        );
    }

    #[test]
    fn captures_come_first() {
        let t = Template::with_captures("$1-${2}-$3}-${1x-$uri");
        assert!(t.uses_captures());
        let caps = [None, Some("one".to_string()), Some("two".to_string())];
        assert_eq!(
            t.render(&vars(), &caps, Escape::None).text,
            "one-two--onex-/a/b"
        );
        // Without captures, `$1` is an (absent) variable.
        assert_eq!(render(&Template::new("$1")).text, "");
    }

    #[test]
    fn replacement_templates() {
        let re = regex::Regex::new("^/api/(.*)/(v[0-9])").unwrap();
        let caps = re.captures("/api/users/v2").unwrap();
        let mut out = String::new();
        Replacement::parse("/$2/$1a/${1}b/$$/$0/$9")
            .unwrap()
            .expand_str(&caps, &mut out);
        assert_eq!(out, "/v2/usersa/usersb/$//api/users/v2/");
        assert!(Replacement::parse("/$x").is_err());
        assert!(Replacement::parse("/${1").is_err());
        assert!(Replacement::parse("/$").is_err());
    }

    #[test]
    fn regex_errors_read_like_pcre() {
        let pattern = String::from("[^/test/(.*)");
        let err = regex::Regex::new(&pattern).unwrap_err();
        assert_eq!(
            regex_error("[^/test/(.*)", &err),
            "pcre_compile() failed: unclosed character class in \"[^/test/(.*)\""
        );
    }

    #[test]
    fn numbers_print_as_lua_does() {
        assert_eq!(scalar_text(&serde_json::json!(10)), Some("10".into()));
        assert_eq!(scalar_text(&serde_json::json!(1.5)), Some("1.5".into()));
        assert_eq!(scalar_text(&serde_json::json!(2.0)), Some("2".into()));
        assert_eq!(scalar_text(&serde_json::json!(true)), None);
    }
}
