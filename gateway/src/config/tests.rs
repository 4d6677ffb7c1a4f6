use super::*;

fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
    GatewayConfig::from_yaml(
        text,
        Path::new("conf/config.yaml"),
        PathBuf::from("/srv/gw"),
    )
}

#[test]
fn defaults_are_safe() {
    let c = parse("").unwrap();
    assert_eq!(c.node_listen, vec!["0.0.0.0:9080".parse().unwrap()]);
    assert_eq!(c.admin_listen, "127.0.0.1:9180".parse().unwrap());
    assert!(c.admin_key_required);
    assert_eq!(c.admin_keys.len(), 1);
    assert!(c.admin_keys[0].key.is_empty());
    assert!(c
        .allow_admin
        .as_ref()
        .unwrap()
        .contains("127.0.0.9".parse().unwrap()));
    assert!(!c
        .allow_admin
        .as_ref()
        .unwrap()
        .contains("127.0.1.9".parse().unwrap()));
    assert!(c.real_ip.is_none(), "no trusted proxy unless configured");
    assert_eq!(c.data_dir, PathBuf::from("/srv/gw/data"));
    assert_eq!(c.provider, Provider::Embedded);
    assert_eq!(c.worker_threads, None);
    assert_eq!(c.client_max_body_size, None);
    assert_eq!(
        parse("nginx_config:\n  http:\n    client_max_body_size: 1m\n")
            .unwrap()
            .client_max_body_size,
        Some(1 << 20)
    );
    assert!(parse("nginx_config:\n  http:\n    client_max_body_size: huge\n").is_err());
    assert_eq!(
        parse("nginx_config:\n  worker_processes: 1\n")
            .unwrap()
            .worker_threads,
        Some(1)
    );
    assert!(parse("nginx_config:\n  worker_processes: lots\n").is_err());
}

#[test]
fn apisix_key_paths() {
    let c = parse(
        "apisix:\n  node_listen:\n    - 9081\n    - ip: 127.0.0.1\n      port: 9082\n\
         deployment:\n  admin:\n    admin_key:\n      - name: a\n        key: abc\n        role: viewer\n    \
         admin_listen:\n      ip: 127.0.0.1\n      port: 9999\n    allow_admin: ~\n\
         nginx_config:\n  http:\n    real_ip_from: [\"10.0.0.0/8\", \"unix:\"]\n    real_ip_header: X-Forwarded-For\n    real_ip_recursive: \"on\"\n",
    )
    .unwrap();
    assert_eq!(
        c.node_listen,
        vec![
            "0.0.0.0:9081".parse().unwrap(),
            "127.0.0.1:9082".parse().unwrap()
        ]
    );
    assert_eq!(c.admin_listen.port(), 9999);
    assert_eq!(c.admin_keys[0].role, admin_api::Role::Viewer);
    assert!(c.allow_admin.is_none());
    let rip = c.real_ip.unwrap();
    assert_eq!(rip.header, "x-forwarded-for");
    assert!(rip.recursive);
}

#[test]
fn transparent_listeners() {
    let c = parse(
        "apisix:\n  node_listen:\n    - 9080\n    - {ip: \"::\", port: 15001, transparent: true}\n",
    )
    .unwrap();
    assert_eq!(c.node_listen.len(), 2);
    assert_eq!(c.transparent_listen, vec!["[::]:15001".parse().unwrap()]);
    let err = parse("apisix:\n  node_listen:\n    - {port: 1, transparent: yes please}\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("transparent"), "{err}");
}

#[test]
fn wrong_types_name_the_key() {
    for (text, key) in [
        ("apisix:\n  node_listen: abc\n", "apisix.node_listen"),
        ("apisix:\n  node_listen: 70000\n", "apisix.node_listen"),
        (
            "deployment:\n  admin:\n    admin_key: 5\n",
            "deployment.admin.admin_key",
        ),
        (
            "deployment:\n  admin:\n    admin_key_required: maybe\n",
            "deployment.admin.admin_key_required",
        ),
        (
            "deployment:\n  admin:\n    allow_admin: [\"300.1.1.1\"]\n",
            "deployment.admin.allow_admin",
        ),
        ("deployment:\n  role: chef\n", "deployment.role"),
    ] {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(key), "{err} should name {key}");
    }
}

#[test]
fn refuses_public_default_key() {
    let err = parse("deployment:\n  admin:\n    admin_key:\n      - name: admin\n        key: edd1c9f034335f136f87ad84b625c8f1\n        role: admin\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("public default key"));
}

#[test]
fn env_substitution() {
    let env = |name: &str| (name == "FERROGATE_TEST_PORT").then(|| "9555".to_string());
    let parse = |text: &str| {
        GatewayConfig::from_yaml_with_env(text, Path::new("c.yaml"), PathBuf::from("/srv"), &env)
    };
    let c = parse("apisix:\n  node_listen: \"${{FERROGATE_TEST_PORT}}\"\ndeployment:\n  admin:\n    admin_listen:\n      port: \"${{NOPE_NOT_SET:=9444}}\"\n").unwrap();
    assert_eq!(c.node_listen[0].port(), 9555);
    assert_eq!(c.admin_listen.port(), 9444);
    assert!(parse("apisix:\n  node_listen: \"${{NOPE_NOT_SET_EITHER}}\"\n").is_err());
}

#[test]
fn reads_apisix_shipped_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/apisix-examples");
    let c = GatewayConfig::load(&dir.join("config.yaml")).unwrap();
    // APISIX ships `config_provider: etcd` with etcd's defaults.
    let Provider::Etcd(etcd) = &c.provider else {
        panic!("{:?}", c.provider)
    };
    assert_eq!(etcd.hosts, ["http://127.0.0.1:2379"]);
    let example = GatewayConfig::load(&dir.join("config.yaml.example")).unwrap();
    let Provider::Etcd(etcd) = &example.provider else {
        panic!("{:?}", example.provider)
    };
    assert_eq!(etcd.prefix, "/apisix");
    assert_eq!(etcd.startup_retry, 2);
    assert!(example
        .unused_keys
        .iter()
        .all(|k| !k.starts_with("deployment.etcd")));
    assert!(!example.unused_keys.is_empty());
    assert!(example
        .unused_keys
        .iter()
        .all(|k| !k.starts_with("deployment.admin.admin_key")));
}

#[test]
fn nginx_durations() {
    assert_eq!(parse_duration("60s"), Some(Duration::from_secs(60)));
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
    assert_eq!(parse_duration("soon"), None);
    assert_eq!(parse_duration("-5s"), None);
    // Times no timer can be set to are read as the longest one.
    assert_eq!(
        parse_duration("99999999999999999999999s"),
        Some(MAX_DURATION)
    );
    assert_eq!(parse_duration("10000000000000000000s"), Some(MAX_DURATION));
    assert_eq!(parse_duration("200000d"), Some(MAX_DURATION));
    assert_eq!(
        parse_duration("3650d"),
        Some(Duration::from_secs(3650 * 86_400))
    );
    let c = parse(
        "nginx_config:\n  http:\n    client_header_timeout: 1e19\n    keepalive_timeout: 10000000000000000000s\n    client_body_timeout: 1e300\n",
    )
    .unwrap();
    assert_eq!(c.client_header_timeout, MAX_DURATION);
    assert_eq!(c.keepalive_timeout, MAX_DURATION);
    assert_eq!(c.client_body_timeout, MAX_DURATION);
}

#[test]
fn config_provider_etcd_and_its_defaults() {
    let c = parse("deployment:\n  role_traditional:\n    config_provider: etcd\n").unwrap();
    let Provider::Etcd(etcd) = &c.provider else {
        panic!("{:?}", c.provider)
    };
    assert_eq!(etcd.hosts, ["http://127.0.0.1:2379"]);
    assert_eq!(etcd.prefix, "/apisix");
    assert_eq!(etcd.timeout, Duration::from_secs(30));
    assert_eq!(etcd.watch_timeout, Duration::from_secs(50));
    assert_eq!(etcd.startup_retry, 2);
    assert!(etcd.encrypt_fields);
    assert_eq!(etcd.keyring, ["qeddd145sfvddff3", "edd1c9f0985e76a2"]);
    assert!(c.enable_admin);

    let c = parse(
        "deployment:\n  role_traditional:\n    config_provider: etcd\n  etcd:\n    host: https://etcd.example:2379\n    prefix: /edge/\n    timeout: 3\n    user: root\n    password: pw\n    tls:\n      cert: conf/etcd.crt\n      key: conf/etcd.key\n      sni: etcd.internal\napisix:\n  data_encryption:\n    keyring: [0123456789abcdef0123456789abcdef]\n",
    )
    .unwrap();
    let Provider::Etcd(etcd) = &c.provider else {
        panic!()
    };
    assert_eq!(etcd.hosts, ["https://etcd.example:2379"]);
    assert!(etcd.tls());
    assert_eq!(etcd.prefix, "/edge");
    assert_eq!(etcd.timeout, Duration::from_secs(3));
    assert_eq!(
        etcd.tls_cert.as_deref(),
        Some(Path::new("/srv/gw/conf/etcd.crt"))
    );
    assert_eq!(etcd.tls_sni.as_deref(), Some("etcd.internal"));
    assert_eq!(etcd.user.as_deref(), Some("root"));
    assert!(c.unused_keys.is_empty(), "{:?}", c.unused_keys);

    // A data plane on etcd follows it and serves no Admin API.
    let c =
        parse("deployment:\n  role: data_plane\n  role_data_plane:\n    config_provider: etcd\n")
            .unwrap();
    assert!(matches!(c.provider, Provider::Etcd(_)));
    assert!(!c.enable_admin);
    // `embedded` says explicitly what no provider means.
    let c = parse("deployment:\n  role_traditional:\n    config_provider: embedded\n").unwrap();
    assert_eq!(c.provider, Provider::Embedded);
}

#[test]
fn bad_etcd_settings_name_their_key() {
    let err = |text: &str| parse(text).unwrap_err().to_string();
    let etcd = "deployment:\n  role_traditional:\n    config_provider: etcd\n";
    assert!(
        err("deployment:\n  role_traditional:\n    config_provider: consul\n")
            .contains("deployment.role_traditional.config_provider")
    );
    assert!(err(&format!("{etcd}  etcd:\n    host: [127.0.0.1:2379]\n")).contains("http://"));
    assert!(err(&format!(
        "{etcd}  etcd:\n    host: [http://a:1, https://b:1]\n"
    ))
    .contains("mixes"));
    assert!(
        err(&format!("{etcd}  etcd:\n    tls:\n      verify: false\n"))
            .contains("deployment.etcd.tls.verify")
    );
    assert!(
        err(&format!("{etcd}  etcd:\n    tls:\n      cert: a.pem\n"))
            .contains("deployment.etcd.tls")
    );
    assert!(err(&format!("{etcd}  etcd:\n    user: root\n")).contains("deployment.etcd.password"));
    assert!(err(&format!(
        "{etcd}apisix:\n  data_encryption:\n    keyring: [short]\n"
    ))
    .contains("apisix.data_encryption.keyring[0]"));
    assert!(err(&format!("{etcd}  etcd:\n    timeout: -1\n")).contains("deployment.etcd.timeout"));
}
