//! Unit tests of how a node reads its upstream's refusals, and of holding a server that said
//! when to come back.

use super::*;

fn answer(status: u16, retry_after: Option<&str>) -> reqwest::Response {
    let mut b = axum::http::Response::builder().status(status);
    if let Some(v) = retry_after {
        b = b.header("retry-after", v);
    }
    reqwest::Response::from(b.body("").unwrap())
}

fn busy_secs(e: UpstreamError) -> Option<u64> {
    match e {
        UpstreamError::Busy { retry_after_s, .. } => Some(retry_after_s),
        _ => None,
    }
}

#[test]
fn a_429_or_503_with_retry_after_is_busy_for_that_long_and_anything_else_is_a_status() {
    let s = || "http://127.0.0.1:1/".to_string();
    assert_eq!(
        busy_secs(status_error(s(), &answer(503, Some("7")))),
        Some(7)
    );
    assert_eq!(
        busy_secs(status_error(s(), &answer(429, Some(" 2 ")))),
        Some(2)
    );
    let later = std::time::SystemTime::now() + Duration::from_secs(30);
    let date = httpdate::fmt_http_date(later);
    let secs = busy_secs(status_error(s(), &answer(503, Some(&date)))).unwrap();
    assert!((29..=31).contains(&secs), "{secs}");
    assert_eq!(
        busy_secs(status_error(s(), &answer(503, Some("99999999")))),
        Some(MAX_RETRY_AFTER_S),
        "capped"
    );
    assert_eq!(
        busy_secs(status_error(s(), &answer(503, Some("0")))),
        Some(1)
    );
    for (status, header) in [
        (503, None),
        (503, Some("soon")),
        (500, Some("5")),
        (404, Some("5")),
    ] {
        let e = status_error(s(), &answer(status, header));
        assert!(
            matches!(e, UpstreamError::Status { .. }),
            "{status} {header:?}: {e}"
        );
    }
}

fn upstream(servers: usize) -> Upstream {
    let servers = (0..servers)
        .map(|i| Server {
            url: url::Url::parse(&format!("http://127.0.0.1:{}/", 1 + i)).unwrap(),
            token: None,
        })
        .collect();
    Upstream::new(
        UpstreamOptions {
            list: ListOptions {
                servers,
                proxy: ProxyChoice::Environment,
                ca_file: None,
            },
            idle_timeout: Duration::from_secs(1),
            probe_interval: Duration::from_secs(1),
            catalog_key: None,
        },
        std::sync::Arc::new(Metrics::new()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_held_server_is_not_asked_until_its_time_even_when_all_others_back_off() {
    let u = upstream(2);
    u.hold(&u.pick(0), 60);
    assert_eq!(
        Upstream::order(&u.current()),
        Ok(vec![1]),
        "the other server is asked"
    );
    u.mark(&u.pick(1), false);
    assert_eq!(
        Upstream::order(&u.current()),
        Ok(vec![1]),
        "backing off, but not held: still asked"
    );
    u.hold(&u.pick(1), 30);
    let Err(secs) = Upstream::order(&u.current()) else {
        panic!("every server is held");
    };
    assert!((29..=30).contains(&secs), "{secs}");
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let r: Result<(Picked, ()), _> = u
        .first_that_answers(|_| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async { Ok(()) }
        })
        .await;
    assert!(matches!(r, Err(UpstreamError::Held { .. })), "{r:?}");
    assert_eq!(calls.into_inner(), 0, "no server was called");
}

#[test]
fn a_configured_proxy_is_shown_without_its_credentials_and_a_bad_one_is_refused() {
    let builder = || reqwest::Client::builder();
    let (_, shown) = with_proxy(
        builder(),
        &ProxyChoice::Configured("http://branch:s3cret@127.0.0.1:3128".into()),
    )
    .unwrap();
    assert_eq!(shown.as_deref(), Some("http://***@127.0.0.1:3128"));
    let Err(e) = with_proxy(
        builder(),
        &ProxyChoice::Configured("http://branch:s3cret@[::1".into()),
    ) else {
        panic!("an unparsable proxy URL is refused");
    };
    assert!(matches!(e, UpstreamError::Proxy { .. }), "{e}");
    assert!(!e.to_string().contains("s3cret"), "{e}");
}

#[tokio::test]
async fn a_new_list_keeps_the_state_of_a_server_that_stays_and_forgets_one_that_goes() {
    let metrics = std::sync::Arc::new(Metrics::new());
    let server = |port: u16, token: Option<&str>| Server {
        url: url::Url::parse(&format!("http://127.0.0.1:{port}/")).unwrap(),
        token: token.map(Token::new),
    };
    let list = |servers| ListOptions {
        servers,
        proxy: ProxyChoice::Environment,
        ca_file: None,
    };
    let u = Upstream::new(
        UpstreamOptions {
            list: list(vec![server(1, Some("a")), server(2, None)]),
            idle_timeout: Duration::from_secs(1),
            probe_interval: Duration::from_secs(1),
            catalog_key: None,
        },
        metrics.clone(),
    )
    .unwrap();
    let (one, two) = (u.pick(0), u.pick(1));
    u.hold(&one, 60);
    u.mark(&two, true);
    // Server 1 stays with its token (held still), server 2 goes, server 3 comes; a call
    // that picked server 2 before the swap still names it.
    let prepared = u
        .prepare(list(vec![server(3, None), server(1, Some("a"))]))
        .unwrap();
    u.install(prepared);
    assert_eq!(two.name(), "http://127.0.0.1:2/");
    assert_eq!(
        u.last_calls()
            .into_iter()
            .map(|(url, _)| url.port().unwrap_or(0))
            .collect::<Vec<_>>(),
        vec![3, 1]
    );
    assert_eq!(
        Upstream::order(&u.current()),
        Ok(vec![0]),
        "server 1 is still held"
    );
    let text = metrics.render();
    assert!(
        !text.contains("127.0.0.1:2/"),
        "server 2 left the metrics:\n{text}"
    );
    assert!(
        text.contains("server=\"http://127.0.0.1:3/\",state=\"not_tried\"} 1"),
        "{text}"
    );
    // The same list again: nothing to put in force.
    let same = u
        .prepare(list(vec![server(3, None), server(1, Some("a"))]))
        .unwrap();
    assert!(!u.tokens_differ(&same));
    // A token changed (a token file rewritten): the same URL is another server as far as
    // its state goes.
    let prepared = u
        .prepare(list(vec![server(3, None), server(1, Some("b"))]))
        .unwrap();
    assert!(u.tokens_differ(&prepared));
    u.install(prepared);
    assert_eq!(Upstream::order(&u.current()), Ok(vec![0, 1]));
    // A CA file that is not one: nothing built, nothing changed.
    let bad = ListOptions {
        servers: vec![server(4, None)],
        proxy: ProxyChoice::Environment,
        ca_file: Some("/nonexistent/ca.pem".into()),
    };
    let Err(e) = u.prepare(bad) else {
        panic!("a missing CA file is refused");
    };
    assert!(e.to_string().starts_with("upstream.ca_file"), "{e}");
    assert_eq!(u.servers().len(), 2);
}
