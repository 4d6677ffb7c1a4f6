use std::convert::Infallible;

use super::*;
use crate::chain::{Chain, GlobalRules, PluginSet};
use crate::consumer::ConsumerIndex;
use crate::registry::PluginError;
use crate::testing::{self, send, Answer};
use crate::{BoxError, ResponseBody};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

fn check_err(conf: Value) -> String {
    match testing::compile(&json!({ NAME: conf })) {
        Err(PluginError::Invalid { reason, .. }) => reason,
        other => panic!("expected an invalid configuration, got {other:?}"),
    }
}

#[test]
fn schema_errors_use_apisix_wording() {
    assert_eq!(
        check_err(json!({"status_code": 599})),
        "property \"status_code\" validation failed: expected 599 to be at most 598"
    );
    assert_eq!(
        check_err(json!({"body": 1})),
        "property \"body\" validation failed: wrong type: expected string, got number"
    );
    assert_eq!(
        check_err(json!({"body": "test", "filters": [{"regex": "l", "replace": "m"}]})),
        "failed to validate dependent schema for \"body\": value wasn't supposed to match schema"
    );
    assert_eq!(
        check_err(json!({"filters": []})),
        "property \"filters\" validation failed: expect array to have at least 1 items"
    );
    assert_eq!(
        check_err(json!({"filters": [{"regex": "l"}]})),
        "property \"filters\" validation failed: failed to validate item 1: property \"replace\" is required"
    );
    assert_eq!(
        check_err(json!({"filters": [{"regex": "", "replace": "m"}]})),
        "property \"filters\" validation failed: failed to validate item 1: property \"regex\" validation failed: string too short, expected at least 1, got 0"
    );
    assert_eq!(
        check_err(json!({"filters": [{"regex": "l", "replace": "m", "scope": ""}]})),
        "property \"filters\" validation failed: failed to validate item 1: property \"scope\" validation failed: matches none of the enum values"
    );
    assert_eq!(
        check_err(json!({"filters": [{"regex": "hello", "replace": "m", "options": "h"}]})),
        "regex \"hello\" validation failed: unknown flag \"h\" (flags \"h\")"
    );
    assert!(
        check_err(json!({"filters": [{"regex": "(a", "replace": "m"}]}))
            .starts_with("regex \"(a\" validation failed: pcre_compile() failed")
    );
    assert_eq!(
        check_err(json!({"body": "!!!", "body_base64": true})),
        "invalid base64 content"
    );
    assert_eq!(
        check_err(json!({"body_base64": true})),
        "invalid base64 content"
    );
    assert!(check_err(json!({"vars": [["status", "=="]]}))
        .starts_with("failed to validate the 'vars' expression: rule too short"));
    for headers in [
        json!({"add": [["headers:"]]}),
        json!({"remove": [["headers:"]]}),
        json!({"set": [["headers"]]}),
        json!({"set": [{"": 1}]}),
        json!({"set": [{"a": true}]}),
        json!({"add": ["X-A: b/"]}),
    ] {
        assert_eq!(
            check_err(json!({ "headers": headers })),
            "property \"headers\" validation failed: object matches none of the required",
            "{headers}"
        );
    }
    assert_eq!(
        check_err(json!({"headers": {"X-A": true}})),
        "invalid type as header value"
    );
    assert_eq!(
        check_err(json!({"headers": {"": "x"}})),
        "invalid field length in header"
    );
    assert_eq!(
        check_err(json!({"max_resp_body_size": 0})),
        "property \"max_resp_body_size\" validation failed: expected 0 to be at least 1"
    );
    for ok in [
        json!({"body": "x", "status_code": 200, "headers": {"X-A": 1}}),
        json!({"filters": [{"regex": "l", "replace": "m", "scope": "global", "options": "ijo"}]}),
        json!({"headers": {"add": ["Set-Cookie: a=b; Max-Age=1"], "set": {"X": "y"}, "remove": ["Server"]}}),
        json!({"vars": [["status", "==", 500]], "body": "aGVsbG8=", "body_base64": true}),
    ] {
        assert!(check(&ok).is_ok(), "{ok}");
    }
}

#[test]
fn base64_as_nginx_decodes_it() {
    assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
    assert_eq!(decode_base64("aGVsbG8").unwrap(), b"hello");
    assert_eq!(decode_base64("aGVsbA==").unwrap(), b"hell");
    assert_eq!(decode_base64("aGVsbA==junk").unwrap(), b"hell");
    assert_eq!(decode_base64("").unwrap(), b"");
    assert!(decode_base64("aGVsb").is_none());
    assert!(decode_base64("a*==").is_none());
}

#[test]
fn add_lines_split_like_apisix() {
    assert_eq!(split_add_line("X-A: b"), Some(("X-A", "b")));
    assert_eq!(split_add_line("X-A :  b c"), Some(("X-A", "b c")));
    assert_eq!(split_add_line("X-A: "), Some(("X-A", " ")));
    assert_eq!(split_add_line("X A: b"), None);
    assert_eq!(split_add_line("X-A: b:c"), None);
}

/// A chain of `set` around an upstream answering `status`, `headers` and
/// the body in `chunks`.
fn chain_with(
    set: PluginSet,
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    chunks: &'static [&'static str],
) -> Chain<
    impl tower::Service<
            Request<()>,
            Response = Response<ResponseBody>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
> {
    let inner = tower::service_fn(move |_req: Request<()>| async move {
        let frames = chunks
            .iter()
            .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from_static(c.as_bytes()))));
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
        let mut resp = Response::new(body);
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        for (k, v) in headers {
            resp.headers_mut().append(*k, HeaderValue::from_static(v));
        }
        Ok::<_, Infallible>(resp)
    });
    Chain {
        globals: Arc::new(GlobalRules::new(Vec::new())),
        route: Arc::new(set),
        consumers: Arc::new(ConsumerIndex::default()),
        inner,
    }
}

async fn answer(
    conf: Value,
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    chunks: &'static [&'static str],
    uri: &str,
) -> Answer {
    let set = testing::compile(&json!({ NAME: conf })).unwrap();
    let chain = chain_with(set, status, headers, chunks);
    send(chain, testing::request("10.0.0.1", uri, &[("x-req", "r1")])).await
}

const PLAIN: &[(&str, &str)] = &[
    ("content-length", "11"),
    ("etag", "\"abc\""),
    ("last-modified", "Wed, 21 Oct 2015 07:28:00 GMT"),
    ("x-up", "1"),
];

#[tokio::test]
async fn status_and_body_replace_the_answer() {
    let a = answer(
        json!({"status_code": 403, "body": "{\"code\":\"ok\"}\n"}),
        200,
        PLAIN,
        &["hello", " world"],
        "/",
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.body, "{\"code\":\"ok\"}\n");
    assert!(a.headers.get("content-length").is_none());
    assert!(a.headers.get("etag").is_none());
    assert!(a.headers.get("last-modified").is_none());
    assert_eq!(a.headers["x-up"], "1");

    // An empty upstream body still gets the new one.
    let a = answer(json!({"body": "new"}), 200, &[], &[], "/").await;
    assert_eq!(a.body, "new");

    let a = answer(
        json!({"body": "aGVsbG8gYmFzZTY0", "body_base64": true}),
        200,
        &[],
        &["x"],
        "/",
    )
    .await;
    assert_eq!(a.body, "hello base64");

    // Status alone leaves body and length alone.
    let a = answer(json!({"status_code": 201}), 200, &[], &["hello world"], "/").await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::CREATED, "hello world")
    );
}

#[tokio::test]
async fn vars_decide_on_the_response() {
    let conf = json!({"vars": [["status", "==", 500]], "status_code": 200, "body": "fine",
                      "headers": {"set": {"X-Was": "$status"}}});
    let a = answer(conf.clone(), 500, &[], &["boom"], "/").await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "fine"));
    assert_eq!(a.headers["x-was"], "200");
    let a = answer(conf, 502, PLAIN, &["bad gateway"], "/").await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::BAD_GATEWAY, "bad gateway")
    );
    assert!(a.headers.get("x-was").is_none());
    assert_eq!(a.headers["etag"], "\"abc\"");

    // Request variables work too: the request head is kept for them.
    let conf = json!({"vars": [["arg_debug", "==", "1"], ["http_x_req", "==", "r1"]],
                      "body": "debug"});
    let a = answer(conf.clone(), 200, &[], &["normal"], "/?debug=1").await;
    assert_eq!(a.body, "debug");
    let a = answer(conf, 200, &[], &["normal"], "/?debug=0").await;
    assert_eq!(a.body, "normal");
}

#[tokio::test]
async fn headers_add_set_remove() {
    let a = answer(
        json!({"headers": {
            "add": ["Set-Cookie: a=1", "Set-Cookie :b=2", "X-Addr: $remote_addr"],
            "set": {"X-Up": "changed", "X-Num": 7, "X-Req": "$http_x_req"},
            "remove": ["ETag", "X-Nothing"]
        }}),
        200,
        PLAIN,
        &["body"],
        "/",
    )
    .await;
    let cookies: Vec<&str> = a
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(a.headers["x-addr"], "10.0.0.1");
    assert_eq!(a.headers["x-up"], "changed");
    assert_eq!(a.headers["x-num"], "7");
    assert_eq!(a.headers["x-req"], "r1");
    assert!(a.headers.get("etag").is_none());
    assert_eq!(a.body, "body");

    // The plain form sets.
    let a = answer(
        json!({"headers": {"X-Up": "flat", "X-New": "n"}}),
        200,
        PLAIN,
        &["b"],
        "/",
    )
    .await;
    assert_eq!(a.headers["x-up"], "flat");
    assert_eq!(a.headers["x-new"], "n");
}

#[tokio::test]
async fn filters_rewrite_the_buffered_body() {
    let chunks: &[&str] = &["hello wo", "rld, hello ", "World"];
    let once = answer(
        json!({"filters": [{"regex": "hello", "replace": "bye"}]}),
        200,
        PLAIN,
        chunks,
        "/",
    )
    .await;
    assert_eq!(once.body, "bye world, hello World");
    assert!(once.headers.get("content-length").is_none());

    let global = answer(
        json!({"filters": [
            {"regex": "world", "replace": "[$0]", "scope": "global", "options": "ijo"},
            {"regex": "(h)ello", "replace": "${1}i", "scope": "global"}
        ]}),
        200,
        &[],
        chunks,
        "/",
    )
    .await;
    assert_eq!(global.body, "hi [world], hi [World]");

    let none = answer(
        json!({"filters": [{"regex": "absent", "replace": "x"}]}),
        200,
        &[],
        chunks,
        "/",
    )
    .await;
    assert_eq!(none.body, "hello world, hello World");

    // A body over max_resp_body_size is cut there.
    let cut = answer(
        json!({"max_resp_body_size": 10, "filters": [{"regex": "o", "replace": "0", "scope": "global"}]}),
        200,
        &[],
        chunks,
        "/",
    )
    .await;
    assert_eq!(cut.body, "hell0 w0rl");
}

#[tokio::test]
async fn encoded_bodies_are_not_filtered() {
    let a = answer(
        json!({"filters": [{"regex": "a", "replace": "b"}]}),
        200,
        &[("content-encoding", "gzip")],
        &["aaa"],
        "/",
    )
    .await;
    assert_eq!(a.body, "aaa");
    assert_eq!(a.headers["content-encoding"], "gzip");
}

#[tokio::test]
async fn rewrites_early_answers_of_other_plugins() {
    let set = testing::compile(&json!({
        "ip-restriction": {"blacklist": ["10.0.0.0/8"]},
        NAME: {"status_code": 451, "headers": {"X-Blocked": "yes"}}
    }))
    .unwrap();
    let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
    let a = send(chain, testing::request("10.1.1.1", "/", &[])).await;
    assert_eq!(a.status.as_u16(), 451);
    assert_eq!(a.headers["x-blocked"], "yes");
}

#[test]
fn phases_follow_the_configuration() {
    let p = compile(&json!({"headers": {"X": "$status"}})).unwrap();
    assert_eq!(p.phases(), Phases::HEADER_FILTER);
    let p = compile(&json!({"body": "x", "vars": [["status", "==", 200]]})).unwrap();
    assert_eq!(p.phases(), Phases::HEADER_FILTER | Phases::BODY_FILTER);
    let p = compile(&json!({"headers": {"X": "$uri"}})).unwrap();
    assert!(p.phases().has(Phases::REWRITE));
}

#[test]
fn registered() {
    let spec = crate::find(NAME).expect("registered");
    assert_eq!(spec.priority(), PRIORITY);
    let doc = spec.schema().to_json();
    assert_eq!(doc["properties"]["status_code"]["maximum"], 598.0);
    assert!(doc["dependencies"]["body"].is_object());
}
