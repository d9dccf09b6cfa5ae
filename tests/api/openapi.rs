//! `GET /openapi.json` (SPEC §4.7): served without auth, equal to the committed `openapi.json`,
//! and describing exactly the routes the server has.

use serde_json::Value;

use crate::helpers::{spawn_app, ADMIN_TOKEN};

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

async fn served_document() -> String {
    let app = spawn_app().await;
    let response = app.get("/openapi.json", None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    response.text().await.unwrap()
}

/// Fails when the code's API and the committed document drift apart. `UPDATE_OPENAPI=1`
/// rewrites the committed file from the served document instead.
#[tokio::test]
async fn the_served_document_is_the_committed_openapi_json() {
    let served = served_document().await;
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(COMMITTED, &served).expect("openapi.json is writable");
        return;
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    if served != committed {
        let line = served
            .lines()
            .zip(committed.lines())
            .position(|(served, committed)| served != committed)
            .map_or_else(
                || served.lines().count().min(committed.lines().count()) + 1,
                |index| index + 1,
            );
        panic!(
            "the served OpenAPI document differs from the committed openapi.json (first at line \
             {line}). If the API change is intended, regenerate the file with \
             `UPDATE_OPENAPI=1 cargo test --test api openapi` and commit it."
        );
    }
}

#[tokio::test]
async fn the_document_is_openapi_3_1_with_the_bearer_scheme_and_error_codes() {
    let document: Value = serde_json::from_str(&served_document().await).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let codes = document["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap();
    for code in [
        "unauthorized",
        "account_not_found",
        "no_ctwa_clid",
        "store_unavailable",
    ] {
        assert!(codes.contains(&Value::from(code)), "{code} is not listed");
    }
    // Every error answer of every operation is the error body.
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    assert!(
                        schema
                            .as_str()
                            .is_some_and(|schema| schema.ends_with("ErrorBody")),
                        "{method} {path} {status} has no error body: {response}"
                    );
                }
            }
        }
    }
}

/// Each documented operation is routed (no `not_found` or `method_not_allowed`), and each
/// secured one refuses a request without a token.
#[tokio::test]
async fn every_documented_operation_is_a_route() {
    let app = spawn_app().await;
    let response = app.get("/openapi.json", None).await;
    let document: Value = response.json().await.unwrap();
    let mut operations = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "no-such-id");
        for (method, operation) in item.as_object().unwrap() {
            operations += 1;
            let method: reqwest::Method = method.to_uppercase().parse().unwrap();
            let secured = operation["security"]
                .as_array()
                .is_some_and(|s| !s.is_empty());
            let answer = app
                .client
                .request(method.clone(), app.url(&concrete))
                .send()
                .await
                .unwrap();
            let status = answer.status().as_u16();
            let body = answer.text().await.unwrap();
            let code = serde_json::from_str::<Value>(&body)
                .ok()
                .map(|body| body["code"].clone());
            assert!(
                code != Some(Value::from("not_found")) && status != 405,
                "{method} {path} is documented but not routed: {status} {body}"
            );
            if secured {
                assert_eq!(status, 401, "{method} {path} without a token: {body}");
                let authorised = app
                    .client
                    .request(method.clone(), app.url(&concrete))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                    .unwrap();
                assert_ne!(
                    authorised.status(),
                    401,
                    "{method} {path} with the admin token"
                );
            }
        }
    }
    assert!(
        operations >= 20,
        "only {operations} operations are documented"
    );
}
