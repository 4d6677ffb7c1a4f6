#![allow(clippy::unwrap_used)]
//! Route matching through the real data plane.

use harness::serde_json::json;
use harness::{send, upstream, Gateway, Upstream};

#[tokio::test]
async fn radixtree_rules() {
    let gw = Gateway::start().await;
    let (u1, u2, u3) = (
        Upstream::start("u1").await,
        Upstream::start("u2").await,
        Upstream::start("u3").await,
    );
    let up = |u: &Upstream| upstream(&[(&u.node(), 1)]);
    gw.put("routes/prefix", json!({"uri": "/x/*", "upstream": up(&u1)}))
        .await;
    gw.put("routes/exact", json!({"uri": "/x/y", "upstream": up(&u2)}))
        .await;
    gw.put("routes/deep", json!({"uri": "/x/a/*", "upstream": up(&u3)}))
        .await;
    assert_eq!(gw.get("/x/y").await.upstream(), "u2");
    assert_eq!(gw.get("/x/z").await.upstream(), "u1");
    assert_eq!(gw.get("/x/a/b/c").await.upstream(), "u3");
    // Routing sees the path as nginx's $uri: decoded and resolved.
    assert_eq!(gw.get("/x/%79").await.upstream(), "u2");
    assert_eq!(gw.get("/x/z/../y").await.upstream(), "u2");
    assert_eq!(gw.get("//x//y").await.upstream(), "u2");
    assert_eq!(gw.get("/../x/y").await.status, 400);
    let miss = gw.get("/nothing").await;
    assert_eq!(miss.status, 404);
    assert_eq!(miss.text(), "{\"error_msg\":\"404 Route Not Found\"}\n");

    gw.put(
        "routes/lo",
        json!({"uri": "/p", "priority": 1, "upstream": up(&u1)}),
    )
    .await;
    gw.put(
        "routes/hi",
        json!({"uri": "/p", "priority": 10, "upstream": up(&u2)}),
    )
    .await;
    assert_eq!(gw.get("/p").await.upstream(), "u2");

    gw.put(
        "routes/uris",
        json!({"uris": ["/one", "/two"], "methods": ["GET", "PUT"], "upstream": up(&u1)}),
    )
    .await;
    assert_eq!(gw.get("/two").await.status, 200);
    assert_eq!(
        send(gw.data, "POST", "/one", &[], "b".into(), None)
            .await
            .status,
        404
    );
    assert_eq!(
        send(gw.data, "PUT", "/one", &[], "b".into(), None)
            .await
            .status,
        200
    );

    gw.put(
        "routes/host",
        json!({"uri": "/h", "hosts": ["foo.test", "*.wild.test"], "upstream": up(&u3)}),
    )
    .await;
    for host in ["foo.test", "FOO.test:8080", "a.b.wild.test"] {
        let r = send(
            gw.data,
            "GET",
            "/h",
            &[("host", host.into())],
            String::new(),
            None,
        )
        .await;
        assert_eq!(r.upstream(), "u3", "host {host}");
    }
    assert_eq!(
        send(
            gw.data,
            "GET",
            "/h",
            &[("host", "bar.test".into())],
            String::new(),
            None
        )
        .await
        .status,
        404
    );

    gw.put("routes/vars", json!({"uri": "/v", "vars": [["arg_env", "==", "prod"], ["http_x_tier", "~~", "^gold"]], "upstream": up(&u1)})).await;
    assert_eq!(
        send(
            gw.data,
            "GET",
            "/v?env=prod",
            &[("x-tier", "golden".into())],
            String::new(),
            None
        )
        .await
        .status,
        200
    );
    assert_eq!(
        send(
            gw.data,
            "GET",
            "/v?env=dev",
            &[("x-tier", "golden".into())],
            String::new(),
            None
        )
        .await
        .status,
        404
    );

    gw.put(
        "routes/off",
        json!({"uri": "/off", "status": 0, "upstream": up(&u1)}),
    )
    .await;
    assert_eq!(gw.get("/off").await.status, 404);
    gw.admin("PATCH", "routes/off", Some(json!({"status": 1})))
        .await;
    assert_eq!(gw.get("/off").await.status, 200);

    gw.put(
        "routes/addr",
        json!({"uri": "/ra", "remote_addrs": ["127.0.0.0/8", "::1"], "upstream": up(&u1)}),
    )
    .await;
    assert_eq!(gw.get("/ra").await.status, 200);
    gw.put(
        "routes/addr",
        json!({"uri": "/ra", "remote_addr": "10.0.0.0/8", "upstream": up(&u1)}),
    )
    .await;
    assert_eq!(gw.get("/ra").await.status, 404);
    gw.stop().await;
}
