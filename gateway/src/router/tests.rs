use super::*;
use proptest::prelude::*;

struct NoVars;
impl Vars for NoVars {
    fn var(&self, _: &str) -> Option<Cow<'_, str>> {
        None
    }
}

fn matcher(methods: &[&str], hosts: &[&str]) -> Arc<Matcher> {
    Arc::new(Matcher {
        methods: MethodSet::from_names(methods),
        hosts: HostSet::new(hosts),
        remote_addrs: None,
        vars: None,
    })
}

fn cand(id: &'static str, priority: i64, order: u64, m: Arc<Matcher>) -> Candidate<&'static str> {
    Candidate {
        priority,
        order,
        matcher: m,
        target: id,
    }
}

fn find<'a>(
    r: &'a Router<&'static str>,
    method: Method,
    path: &str,
    host: Option<&str>,
) -> Option<&'a str> {
    let view = RequestView {
        method: &method,
        path,
        host,
        client_ip: None,
        vars: &NoVars,
    };
    r.find(&view).copied()
}

#[test]
fn exact_beats_prefix_and_longest_prefix_wins() {
    let mut b = RouterBuilder::default();
    b.add(&["/blog/*"], cand("blog", 0, 1, matcher(&[], &[])));
    b.add(&["/blog/foo"], cand("exact", 0, 2, matcher(&[], &[])));
    b.add(&["/blog/foo/a/*"], cand("deep", 0, 3, matcher(&[], &[])));
    b.add(&["/bar*"], cand("bar", 0, 4, matcher(&[], &[])));
    let r = b.build();
    assert_eq!(find(&r, Method::GET, "/blog/foo", None), Some("exact"));
    assert_eq!(find(&r, Method::GET, "/blog/foo/a/b/c", None), Some("deep"));
    assert_eq!(find(&r, Method::GET, "/blog/x", None), Some("blog"));
    assert_eq!(find(&r, Method::GET, "/blog", None), None);
    assert_eq!(find(&r, Method::GET, "/barn", None), Some("bar"));
    assert_eq!(find(&r, Method::GET, "/nothing", None), None);
}

#[test]
fn priority_then_age_and_fallthrough() {
    let mut b = RouterBuilder::default();
    b.add(&["/p"], cand("low", 1, 1, matcher(&[], &[])));
    b.add(&["/p"], cand("high", 10, 2, matcher(&[], &[])));
    b.add(&["/q"], cand("older", 0, 1, matcher(&[], &[])));
    b.add(&["/q"], cand("newer", 0, 2, matcher(&[], &[])));
    b.add(&["/m"], cand("get-only", 5, 1, matcher(&["GET"], &[])));
    b.add(&["/*"], cand("catch-all", 0, 9, matcher(&[], &[])));
    let r = b.build();
    assert_eq!(find(&r, Method::GET, "/p", None), Some("high"));
    assert_eq!(find(&r, Method::GET, "/q", None), Some("older"));
    assert_eq!(find(&r, Method::GET, "/m", None), Some("get-only"));
    assert_eq!(
        find(&r, Method::POST, "/m", None),
        Some("catch-all"),
        "falls through to the prefix"
    );
}

#[test]
fn hosts_and_methods() {
    let mut b = RouterBuilder::default();
    b.add(&["/h"], cand("foo", 0, 1, matcher(&[], &["foo.test"])));
    b.add(
        &["/h"],
        cand("wild", 0, 2, matcher(&["GET", "PURGE"], &["*.bar.test"])),
    );
    let r = b.build();
    assert_eq!(find(&r, Method::GET, "/h", Some("foo.test")), Some("foo"));
    assert_eq!(
        find(&r, Method::GET, "/h", Some("a.b.bar.test")),
        Some("wild")
    );
    assert_eq!(find(&r, Method::GET, "/h", Some(".bar.test")), Some("wild"));
    assert_eq!(find(&r, Method::GET, "/h", Some("bar.test")), None);
    assert_eq!(find(&r, Method::POST, "/h", Some("x.bar.test")), None);
    assert_eq!(
        find(
            &r,
            Method::from_bytes(b"PURGE").unwrap(),
            "/h",
            Some("x.bar.test")
        ),
        Some("wild")
    );
    assert_eq!(find(&r, Method::GET, "/h", None), None);
}

#[test]
fn path_normalization_like_nginx() {
    let n = |p| normalize_path(p).map(|c| c.into_owned());
    assert_eq!(n("/plain/path").as_deref(), Some("/plain/path"));
    assert_eq!(n("/%61dmin").as_deref(), Some("/admin"));
    assert_eq!(n("/public/../admin").as_deref(), Some("/admin"));
    assert_eq!(n("/public/%2e%2e/admin").as_deref(), Some("/admin"));
    assert_eq!(n("//a///b/").as_deref(), Some("/a/b/"));
    assert_eq!(n("/a/./b/.").as_deref(), Some("/a/b/"));
    assert_eq!(n("/a/b/..").as_deref(), Some("/a/"));
    assert_eq!(n("/.."), None);
    assert_eq!(n("/a/%zz"), None);
    assert_eq!(n("/a/%0"), None);
    assert_eq!(n("/a%00b"), None);
}

#[test]
fn only_paths_with_escapes_or_dot_and_slash_segments_are_rewritten() {
    for path in ["/", "/hello", "/a.b/c.d", "/a/b.", "/x-y_z/~", "a/b"] {
        assert!(!super::needs_normalizing(path.as_bytes()), "{path}");
        assert!(matches!(normalize_path(path), Some(Cow::Borrowed(p)) if p == path));
    }
    for path in ["/%61", "//", "/a//b", "/.", "/a/./b", "/a/..", "/a%", "%"] {
        assert!(super::needs_normalizing(path.as_bytes()), "{path}");
    }
}

#[test]
fn incremental_table_equals_fresh_build() {
    let mut t: RouteTable<&'static str> = RouteTable::default();
    t.add(&["/a", "/b/*"], cand("one", 0, 1, matcher(&[], &[])));
    t.add(&["/a"], cand("two", 5, 2, matcher(&[], &[])));
    let before = t.router();
    t.remove_where(&["/a"], |c| c.target == "two");
    t.remove_where(&["/a", "/b/*"], |c| c.target == "one");
    t.add(&["/c/*"], cand("three", 0, 3, matcher(&[], &[])));
    let after = t.router();
    assert_eq!(
        find(&before, Method::GET, "/a", None),
        Some("two"),
        "old snapshots are unaffected"
    );
    assert_eq!(find(&before, Method::GET, "/b/x", None), Some("one"));
    assert_eq!(find(&after, Method::GET, "/a", None), None);
    assert_eq!(find(&after, Method::GET, "/b/x", None), None);
    assert_eq!(find(&after, Method::GET, "/c/x", None), Some("three"));
    assert_eq!(after.len(), 1);
}

#[test]
fn a_path_list_shared_with_a_snapshot_is_copied_not_changed() {
    let mut t: RouteTable<&'static str> = RouteTable::default();
    t.add(&["/*"], cand("x", 0, 1, matcher(&[], &["x.test"])));
    let before = t.router();
    t.add(&["/*"], cand("y", 0, 2, matcher(&[], &["y.test"])));
    t.add(&["/*"], cand("z", 0, 3, matcher(&[], &["z.test"])));
    let middle = t.router();
    t.remove_where(&["/*"], |c| c.target == "x");
    let after = t.router();
    fn at<'a>(r: &'a Router<&'static str>, host: &str) -> Option<&'a str> {
        find(r, Method::GET, "/p", Some(host))
    }
    assert_eq!(
        (at(&before, "x.test"), at(&before, "y.test")),
        (Some("x"), None)
    );
    assert_eq!(
        (
            at(&middle, "x.test"),
            at(&middle, "y.test"),
            at(&middle, "z.test")
        ),
        (Some("x"), Some("y"), Some("z"))
    );
    assert_eq!(
        (at(&after, "x.test"), at(&after, "z.test")),
        (None, Some("z"))
    );
    assert_eq!((before.len(), middle.len(), after.len()), (1, 3, 2));
}

#[test]
fn host_normalization() {
    assert_eq!(normalize_host("FOO.test:8080"), "foo.test");
    assert_eq!(normalize_host("[::1]:80"), "[::1]");
    assert_eq!(normalize_host("foo.test"), "foo.test");
}

/// The naive reading of the rules: exact, then longest prefix, then
/// priority, then age.
fn oracle(routes: &[(String, i64, u64, &'static str)], path: &str) -> Option<&'static str> {
    let mut best: Option<(usize, bool, i64, u64, &'static str)> = None;
    for (uri, prio, order, id) in routes {
        let (hit, exact, len) = match uri.strip_suffix('*') {
            Some(p) => (path.starts_with(p), false, p.len()),
            None => (path == uri, true, uri.len()),
        };
        if !hit {
            continue;
        }
        let key = (
            if exact { usize::MAX } else { len },
            exact,
            *prio,
            u64::MAX - order,
            *id,
        );
        if best.is_none_or(|b| (key.0, key.2, key.3) > (b.0, b.2, b.3)) {
            best = Some(key);
        }
    }
    best.map(|b| b.4)
}

const IDS: [&str; 8] = ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"];

proptest! {
    #[test]
    fn router_equals_naive_scan(
        routes in proptest::collection::vec(("/[ab]{0,3}\\*?", -2i64..3), 1..8),
        paths in proptest::collection::vec("/[ab]{0,4}", 1..10),
    ) {
        let routes: Vec<(String, i64, u64, &'static str)> = routes
            .into_iter()
            .enumerate()
            .map(|(i, (uri, prio))| (uri, prio, i as u64, IDS[i]))
            .collect();
        let mut b = RouterBuilder::default();
        for (uri, prio, order, id) in &routes {
            b.add(&[uri.as_str()], cand(id, *prio, *order, matcher(&[], &[])));
        }
        let r = b.build();
        for p in &paths {
            prop_assert_eq!(find(&r, Method::GET, p, None), oracle(&routes, p), "path {}", p);
        }
    }
}
