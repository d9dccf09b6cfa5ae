//! Hostile input (SPEC §4, §5.7): deeply nested JSON, out-of-range numbers, bad request ids and
//! requests so malformed that actix-http refuses them before the app sees them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{
    spawn_app, TestApp, ACCESS_TOKEN, ADMIN_TOKEN, APP_SECRET, SAMPLE_ACCOUNT_ID, SAMPLE_WABA_ID,
    VERIFY_TOKEN,
};
use crate::server::{RunningServer, EXIT_TIMEOUT};

/// `depth` objects inside one another: `{"a":{"a":…1…}}`.
fn nested_objects(depth: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

/// `body` (an object) with `"unknownField": <raw>` added in front of its fields.
fn with_unknown_field(body: &Value, raw: &str) -> String {
    let text = serde_json::to_string(body).unwrap();
    format!(r#"{{"unknownField":{raw},{}"#, &text[1..])
}

/// Every `/v1` route that reads a JSON body, with a body it would otherwise accept.
fn json_routes() -> Vec<(Method, String, Value)> {
    vec![
        (
            Method::POST,
            "/v1/admin/accounts".into(),
            json!({"id": "acc_deep", "phoneNumberId": "301234567890123", "wabaId": SAMPLE_WABA_ID, "accessToken": ACCESS_TOKEN}),
        ),
        (
            Method::PATCH,
            format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
            json!({"name": "Renamed"}),
        ),
        (
            Method::POST,
            "/v1/admin/api-keys".into(),
            json!({"name": "k", "accountIds": [SAMPLE_ACCOUNT_ID]}),
        ),
        (
            Method::POST,
            "/v1/whatsapp/conversions".into(),
            json!({"accountId": SAMPLE_ACCOUNT_ID, "eventName": "LeadSubmitted", "eventId": "e-1", "conversationId": "conv_missing", "dryRun": true}),
        ),
        (
            Method::POST,
            "/v1/whatsapp/dataset".into(),
            json!({"accountId": SAMPLE_ACCOUNT_ID}),
        ),
    ]
}

async fn send_raw(app: &TestApp, method: Method, path: &str, body: String) -> (u16, Value) {
    let response = app
        .client
        .request(method, app.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the server answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    (status, body)
}

#[tokio::test]
async fn every_v1_json_route_refuses_a_body_nested_too_deep_even_in_unknown_fields() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let too_deep = [
        nested_objects(10_000),
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
        // With the body's own object, 65 levels: one over the limit.
        nested_objects(64),
    ];
    for (method, path, body) in json_routes() {
        for raw in &too_deep {
            let (status, answer) =
                send_raw(&app, method.clone(), &path, with_unknown_field(&body, raw)).await;
            assert_eq!(status, 400, "{method} {path}: {answer}");
            assert_eq!(
                answer["code"], "too_deeply_nested",
                "{method} {path}: {answer}"
            );
            assert!(
                answer["error"].as_str().unwrap().contains("64 levels"),
                "{answer}"
            );
        }
        // At the limit (64 levels with the body's own object), the body is read as usual,
        // whatever the route then answers.
        let (_, answer) = send_raw(
            &app,
            method.clone(),
            &path,
            with_unknown_field(&body, &nested_objects(63)),
        )
        .await;
        assert_ne!(
            answer["code"], "too_deeply_nested",
            "{method} {path}: {answer}"
        );
    }
}

#[tokio::test]
async fn brackets_inside_strings_are_not_nesting() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let body = json!({"name": "k", "accountIds": [SAMPLE_ACCOUNT_ID]});
    let brackets = serde_json::to_string(&"[{\\\"".repeat(5_000)).unwrap();
    let (status, answer) = send_raw(
        &app,
        Method::POST,
        "/v1/admin/api-keys",
        with_unknown_field(&body, &brackets),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let (status, answer) = send_raw(
        &app,
        Method::POST,
        "/v1/admin/api-keys",
        with_unknown_field(&body, &nested_objects(63)),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
}

#[tokio::test]
async fn the_other_json_errors_keep_their_codes() {
    let app = spawn_app().await;
    let path = "/v1/admin/api-keys";
    for (body, code) in [
        ("{\"name\": \"k\", ", "malformed_json"),
        ("", "malformed_json"),
        ("{\"name\": 5, \"accountIds\": []}", "invalid_field"),
        ("{\"accountIds\": []}", "missing_field"),
    ] {
        let (status, answer) = send_raw(&app, Method::POST, path, body.to_string()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["code"], code, "{body}: {answer}");
    }
    let response = app
        .client
        .post(app.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
}

#[tokio::test]
async fn an_event_time_near_i64_min_is_too_old_not_in_the_future() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    for event_time in [i64::MIN, i64::MIN + 1, -1] {
        let response = app
            .send_json(
                Method::POST,
                "/v1/whatsapp/conversions",
                Some(ADMIN_TOKEN),
                &json!({
                    "accountId": SAMPLE_ACCOUNT_ID,
                    "eventName": "LeadSubmitted",
                    "eventId": "e-old",
                    "eventTime": event_time,
                    "conversationId": "conv_missing"
                }),
            )
            .await;
        assert_eq!(response.status(), 400, "{event_time}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "event_time_too_old", "{event_time}: {body}");
    }
}

fn is_generated_request_id(value: &str) -> bool {
    value.len() == 24 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn an_invalid_request_id_on_v1_is_replaced_by_a_fresh_one() {
    let app = spawn_app().await;
    let too_long = "a".repeat(129);
    let invalid: Vec<reqwest::header::HeaderValue> = vec![
        too_long.parse().unwrap(),
        "has space".parse().unwrap(),
        "quote\"and<angle>".parse().unwrap(),
        "semi;colon".parse().unwrap(),
        "tab\tinside".parse().unwrap(),
        reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        reqwest::header::HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        "".parse().unwrap(),
    ];
    for token in [Some(ADMIN_TOKEN), None] {
        for value in &invalid {
            let mut request = app
                .client
                .get(app.url("/v1/admin/accounts"))
                .header("x-request-id", value.clone());
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            let answered = response.headers()["x-request-id"].to_str().unwrap();
            assert!(
                is_generated_request_id(answered),
                "{value:?} was answered with {answered:?}"
            );
        }
    }
    let longest = "a".repeat(128);
    let response = app
        .client
        .get(app.url("/v1/admin/accounts"))
        .header("x-request-id", &longest)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["x-request-id"], longest.as_str());
}

/// Sends `bytes` on a fresh connection and reads until the server closes it.
fn raw_exchange(address: &str, bytes: &[u8]) -> String {
    let host = address.trim_start_matches("http://");
    let mut stream = TcpStream::connect(host).expect("the server accepts a connection");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .expect("the server answers and closes the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

/// actix-http answers these itself, before any of the app runs: the status is right, but the
/// body is empty and there is no request id (actix-http offers no hook for them; see
/// `QuietClientStreamErrors` in src/telemetry.rs). What the app controls: none of it is logged at
/// ERROR, and the server keeps serving.
#[tokio::test]
async fn malformed_http_heads_are_refused_quietly_and_the_server_keeps_serving() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut server = RunningServer::launch(
        data_dir.path(),
        &[
            ("CTWA_APP_SECRETS", APP_SECRET.to_string()),
            ("CTWA_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
            ("CTWA_VERIFY_TOKEN", VERIFY_TOKEN.to_string()),
            ("CTWA_GRAPH_URL", "http://127.0.0.1:9".to_string()),
        ],
    )
    .await;
    let address = server.address.clone();

    // Exactly actix-http's 128 KiB head buffer, with no end of head: all of it is read, then
    // refused, so the connection closes cleanly instead of being reset.
    let mut oversized = b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Padding: ".to_vec();
    oversized.resize(131_072, b'a');
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a NUL byte in a header",
            b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Note: a\0b\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            "a CR inside X-Request-Id",
            b"GET /v1/admin/accounts HTTP/1.1\r\nHost: relay\r\nX-Request-Id: abc\rdef\r\n\r\n"
                .to_vec(),
            "HTTP/1.1 400",
        ),
        ("a 128 KiB head", oversized, "HTTP/1.1 431"),
    ];
    for (what, bytes, expected) in cases {
        let address = address.clone();
        let answer = tokio::task::spawn_blocking(move || raw_exchange(&address, &bytes))
            .await
            .unwrap();
        assert!(answer.starts_with(expected), "{what}: {answer:?}");
        let healthz = server
            .client
            .get(server.url("/healthz"))
            .send()
            .await
            .expect("the server still answers");
        assert_eq!(healthz.status(), 200, "after {what}");
    }

    server.terminate();
    assert!(server.wait_for_exit(EXIT_TIMEOUT).await.success());
    // The pipes drain on other threads: wait for the last line before reading the log.
    for _ in 0..200 {
        if server.log().contains("stopped") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = server.log();
    assert!(log.contains("stopped"), "{log}");
    assert!(
        !log.contains("ERROR"),
        "client garbage was logged at ERROR:\n{log}"
    );
    assert!(!log.contains("stream error"), "{log}");
}
