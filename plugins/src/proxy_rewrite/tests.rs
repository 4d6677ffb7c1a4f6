use super::*;
use crate::consumer::ConsumerIndex;
use crate::registry::PluginError;
use crate::testing::{self, send};
use crate::vars::ConnInfo;
use http::Request;

fn check_err(conf: Value) -> String {
    match testing::compile(&json!({ NAME: conf })) {
        Err(PluginError::Invalid { reason, .. }) => reason,
        other => panic!("expected an invalid configuration, got {other:?}"),
    }
}

#[test]
fn schema_errors_use_apisix_wording() {
    assert_eq!(
        check_err(json!({})),
        "expect object to have at least 1 properties"
    );
    assert_eq!(
        check_err(json!({"uri": "home"})),
        "property \"uri\" validation failed: failed to match pattern \"^\\\\/.*\" with \"home\""
    );
    assert_eq!(
        check_err(json!({"method": "GETT"})),
        "property \"method\" validation failed: matches none of the enum values"
    );
    assert_eq!(
        check_err(json!({"regex_uri": ["^/test/(.*)"]})),
        "property \"regex_uri\" validation failed: expect array to have at least 2 items"
    );
    assert_eq!(
        check_err(json!({"regex_uri": ["^/a", "/b", "^/c"]})),
        "The length of regex_uri should be an even number"
    );
    let err = check_err(json!({"regex_uri": ["[^/test/(.*)", "/$1"]}));
    assert!(
        err.starts_with("invalid regex_uri([^/test/(.*), /$1): pcre_compile() failed"),
        "{err}"
    );
    assert!(check_err(json!({"host": "a b"}))
        .starts_with("property \"host\" validation failed: failed to match pattern"));
    assert_eq!(
        check_err(json!({"headers": {"X-Api:Version": "v2"}})),
        "invalid field character in header"
    );
    assert_eq!(
        check_err(json!({"headers": {"X-Api-Version": "v2\r\n"}})),
        "invalid value character in header"
    );
    assert_eq!(
        check_err(json!({"headers": {"add": {"X-A": true}}})),
        "property \"headers\" validation failed: value should match only one schema, but matches none"
    );
    assert_eq!(
        check_err(json!({"headers": {"add": {"X-A": "1"}, "other": 1}})),
        "property \"headers\" validation failed: value should match only one schema, but matches none"
    );
    assert_eq!(
        check_err(json!({"use_real_request_uri_unsafe": "yes"})),
        "property \"use_real_request_uri_unsafe\" validation failed: wrong type: expected boolean, got string"
    );
    for ok in [
        json!({"uri": "/x", "host": "test.com:8080", "method": "PROPFIND"}),
        json!({"headers": {"X-A": 1, "X-B": "b"}}),
        json!({"headers": {"add": {"X-A": ["1", 2]}, "set": {"X-B": "$uri"}, "remove": ["X-C"]}}),
        json!({"regex_uri": ["^/a/(.*)", "/b/$1", "^/c", "/d"]}),
    ] {
        assert!(check(&ok).is_ok(), "{ok}");
    }
}

fn parts(uri: &str, headers: &[(&str, &str)]) -> request::Parts {
    let mut req = Request::builder().uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(()).unwrap().into_parts().0
}

fn ctx() -> Ctx {
    Ctx::new(
        "10.0.0.1".parse().unwrap(),
        ConnInfo::unknown(),
        Arc::new(ConsumerIndex::default()),
    )
}

/// Runs the rewrite phase; the request target and `$uri` afterwards.
fn run(conf: Value, uri: &str, decoded_path: Option<&str>) -> (request::Parts, String) {
    check(&conf).unwrap();
    let plugin = compile(&conf).unwrap();
    let mut req = parts(uri, &[("x-old", "1"), ("x-keep", "k")]);
    let mut ctx = ctx();
    ctx.path = decoded_path.map(Into::into);
    assert!(matches!(plugin.rewrite(&mut ctx, &mut req), Flow::Continue));
    let var_uri = ctx.var(Some(&req), "uri").unwrap().into_owned();
    (req, var_uri)
}

fn target(conf: Value, uri: &str) -> String {
    run(conf, uri, None).0.uri.to_string()
}

#[test]
fn uri_keeps_the_query_string() {
    assert_eq!(
        target(json!({"uri": "/new"}), "/old?a=1&b=2"),
        "/new?a=1&b=2"
    );
    assert_eq!(
        target(json!({"uri": "/new?x=1"}), "/old?a=1"),
        "/new?x=1&a=1"
    );
    assert_eq!(target(json!({"uri": "/new"}), "/old"), "/new");
    assert_eq!(target(json!({"uri": "/new"}), "/old?"), "/new?");
    let (req, var_uri) = run(json!({"uri": "/new"}), "/old?a=1", Some("/old"));
    assert_eq!(var_uri, "/new");
    assert_eq!(req.uri.path(), "/new");
}

#[test]
fn uri_variables_are_filled_in_and_escaped() {
    assert_eq!(
        target(json!({"uri": "/p/$arg_name/$remote_addr"}), "/old?name=jo"),
        "/p/jo/10.0.0.1?name=jo"
    );
    // A `?` in a value is escaped once to %3F; the path is then encoded
    // like nginx does (APISIX sends %253F).
    assert_eq!(
        target(json!({"uri": "/p/$arg_q"}), "/old?q=a%3Fb"),
        "/p/a%253Fb?q=a%3Fb"
    );
    assert_eq!(
        target(json!({"uri": "/a b/$arg_q"}), "/old?q=x"),
        "/a%20b/x?q=x"
    );
}

#[test]
fn the_decoded_uri_is_reencoded_like_nginx() {
    // APISIX's proxy-rewrite3.t TEST 22 / 24.
    let raw = "/hello%3f0z=700%26a=c%20HTTP/1.1%0D%0AHost:google.com%0d%0a%0d%0a";
    let decoded = "/hello?0z=700&a=c HTTP/1.1\r\nHost:google.com\r\n\r\n";
    let (req, _) = run(json!({"host": "test.xxxx.com"}), raw, Some(decoded));
    assert_eq!(
        req.uri.to_string(),
        "/hello%3F0z=700&a=c%20HTTP/1.1%0D%0AHost:google.com%0D%0A%0D%0A"
    );
    let (req, _) = run(json!({"uri": "/$uri/remain"}), raw, Some(decoded));
    assert_eq!(
        req.uri.to_string(),
        "//hello%253F0z=700&a=c%20HTTP/1.1%0D%0AHost:google.com%0D%0A%0D%0A/remain"
    );
    // Nothing to change: the request is left alone.
    let (req, _) = run(json!({"host": "a.com"}), "/plain?x=1", None);
    assert_eq!(req.uri.to_string(), "/plain?x=1");
}

#[test]
fn non_ascii_paths_are_percent_encoded_byte_by_byte() {
    // Each byte of a multi-byte character is escaped on its own, as nginx
    // does; the decoded path of an invalid sequence holds U+FFFD.
    let (req, _) = run(json!({"host": "a.com"}), "/api/%C3%A9", Some("/api/\u{e9}"));
    assert_eq!(req.uri.to_string(), "/api/%C3%A9");
    let (req, _) = run(json!({"uri": "/p$uri"}), "/x%ff?a=1", Some("/x\u{fffd}"));
    assert_eq!(req.uri.to_string(), "/p/x%EF%BF%BD?a=1");
    assert_eq!(target(json!({"uri": "/caf\u{e9}"}), "/old"), "/caf%C3%A9");
}

#[test]
fn regex_uri_rewrites_with_captures() {
    let conf = json!({"regex_uri": ["^/api/(.*)/(v\\d)", "/$2/$1"]});
    assert_eq!(target(conf.clone(), "/api/users/v2?x=1"), "/v2/users?x=1");
    assert_eq!(target(conf, "/other?x=1"), "/other?x=1");
    let pairs = json!({"regex_uri": ["^/nope/(.*)", "/n/$1", "^/test/(.*)", "/t/$1"]});
    assert_eq!(target(pairs, "/test/abc"), "/t/abc");
    // Only the first match is replaced.
    assert_eq!(
        target(json!({"regex_uri": ["o", "0"]}), "/foo/boo"),
        "/f0o/boo"
    );
    // A query in the replacement is kept as one, the client's is appended.
    assert_eq!(
        target(
            json!({"regex_uri": ["^/test/(.*)/(.*)/(.*)", "/$1_$2_$3?a=c"]}),
            "/test/plugin/proxy/rewrite?b=1"
        ),
        "/plugin_proxy_rewrite?a=c&b=1"
    );
    // `uri` wins over `regex_uri`.
    assert_eq!(
        target(json!({"uri": "/u", "regex_uri": ["^/(.*)", "/r/$1"]}), "/x"),
        "/u"
    );
}

#[test]
fn unsafe_uri_is_sent_raw() {
    let conf = json!({"uri": "/plugin_proxy_rewrite_args", "use_real_request_uri_unsafe": true});
    assert_eq!(
        target(conf.clone(), "/hello?q=apisix&a=iresty"),
        "/plugin_proxy_rewrite_args?q=apisix&a=iresty"
    );
    assert_eq!(target(conf, "/hello"), "/plugin_proxy_rewrite_args");
    assert_eq!(
        target(
            json!({"uri": "/args?x=1", "use_real_request_uri_unsafe": true}),
            "/hello?q=apisix"
        ),
        "/args?x=1&q=apisix"
    );
    assert_eq!(
        target(
            json!({"use_real_request_uri_unsafe": true}),
            "/a%20b?name=a%20b&x=%E4%B8%AD"
        ),
        "/a%20b?name=a%20b&x=%E4%B8%AD"
    );
    // regex_uri sees the raw target, query included; `$uri` is unchanged.
    let (req, var_uri) = run(
        json!({"regex_uri": ["^/a%20(.*)", "/b%20$1"], "use_real_request_uri_unsafe": true}),
        "/a%20b?x=1",
        Some("/a b"),
    );
    assert_eq!(req.uri.to_string(), "/b%20b?x=1");
    assert_eq!(var_uri, "/a b");
}

#[test]
fn host_and_method() {
    let (req, _) = run(
        json!({"host": "test.com:8080", "method": "POST", "headers": {"Host": "other"}}),
        "/x",
        None,
    );
    assert_eq!(req.headers["host"], "test.com:8080");
    assert_eq!(req.method, Method::POST);
    let (req, _) = run(json!({"method": "PROPFIND"}), "/x", None);
    assert_eq!(req.method.as_str(), "PROPFIND");
}

fn values(req: &request::Parts, name: &str) -> Vec<String> {
    req.headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

#[test]
fn headers_add_then_set_then_remove() {
    let (req, _) = run(
        json!({"headers": {
            "add": {"X-Old": "2", "X-Multi": ["a", 1], "X-Gone": "g"},
            "set": {"X-Keep": "$remote_addr-$http_x_old", "X-Num": 5, "X-List": ["l1", "l2"]},
            "remove": ["X-Gone", "X-Nothing"]
        }}),
        "/x",
        None,
    );
    assert_eq!(values(&req, "x-old"), ["1", "2"]);
    assert_eq!(values(&req, "x-multi"), ["a", "1"]);
    // `set` sees what `add` did.
    assert_eq!(values(&req, "x-keep"), ["10.0.0.1-1, 2"]);
    assert_eq!(values(&req, "x-num"), ["5"]);
    assert_eq!(values(&req, "x-list"), ["l1", "l2"]);
    assert!(values(&req, "x-gone").is_empty());
}

#[test]
fn plain_header_object_is_set() {
    let (req, _) = run(
        json!({"headers": {"X-Old": "new", "X-Api": "$uri", "add": "x"}}),
        "/path?a=1",
        None,
    );
    assert_eq!(values(&req, "x-old"), ["new"]);
    assert_eq!(values(&req, "x-api"), ["/path"]);
    assert_eq!(values(&req, "add"), ["x"]);
    assert_eq!(values(&req, "x-keep"), ["k"]);
}

#[test]
fn header_values_use_regex_captures_and_the_new_uri() {
    let (req, _) = run(
        json!({
            "regex_uri": ["^/test/(.*)/(.*)/(.*)", "/echo"],
            "headers": {"add": {"X-Cap": "$1-$2-${3}"}, "set": {"X-Uri": "$uri", "X-Missing": "[$5]"}}
        }),
        "/test/plugin/proxy/rewrite",
        None,
    );
    assert_eq!(values(&req, "x-cap"), ["plugin-proxy-rewrite"]);
    assert_eq!(values(&req, "x-uri"), ["/echo"]);
    assert_eq!(values(&req, "x-missing"), ["[]"]);
    // No match: captures are empty.
    let (req, _) = run(
        json!({"regex_uri": ["^/nope/(.*)", "/n"], "headers": {"set": {"X-Cap": "<$1>"}}}),
        "/test/x",
        None,
    );
    assert_eq!(values(&req, "x-cap"), ["<>"]);
}

#[tokio::test]
async fn through_the_chain() {
    let set = testing::compile(&json!({NAME: {
        "uri": "/upstream/$arg_id",
        "host": "backend.local",
        "method": "PUT",
        "headers": {"set": {"X-Client": "$remote_addr"}}
    }}))
    .unwrap();
    let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
    let answer = send(chain, testing::request("192.0.2.7", "/in?id=42", &[])).await;
    let body = answer.json();
    assert_eq!(body["uri"], "/upstream/42?id=42");
    assert_eq!(body["method"], "PUT");
    assert_eq!(
        answer.upstream_header("host").as_deref(),
        Some("backend.local")
    );
    assert_eq!(
        answer.upstream_header("x-client").as_deref(),
        Some("192.0.2.7")
    );
}

#[test]
fn keeps_scheme_and_authority_of_absolute_targets() {
    let (req, _) = run(json!({"uri": "/new"}), "http://example.com/old?a=1", None);
    assert_eq!(req.uri.to_string(), "http://example.com/new?a=1");
}

#[test]
fn registered() {
    let spec = crate::find(NAME).expect("registered");
    assert_eq!(spec.priority(), PRIORITY);
    assert_eq!(
        spec.schema().to_json()["properties"]["uri"]["pattern"],
        "^\\/.*"
    );
}
