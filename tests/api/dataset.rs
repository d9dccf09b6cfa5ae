//! `GET|POST /v1/whatsapp/dataset`: read from the account, provisioned GET-first from Meta.

use serde_json::{json, Value};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{spawn_app, TestApp, ACCESS_TOKEN, ADMIN_TOKEN, SAMPLE_WABA_ID};

async fn app_with_account_without_dataset() -> TestApp {
    let app = spawn_app().await;
    let response = app
        .admin_post(
            "/v1/admin/accounts",
            &json!({"id": "acc_ds", "phoneNumberId": "106540352242922", "wabaId": SAMPLE_WABA_ID, "accessToken": ACCESS_TOKEN}),
        )
        .await;
    assert_eq!(response.status(), 201);
    app
}

fn dataset_path() -> String {
    format!("/v25.0/{SAMPLE_WABA_ID}/dataset")
}

async fn stored_dataset(app: &TestApp) -> Value {
    app.get("/v1/whatsapp/dataset?accountId=acc_ds", Some(ADMIN_TOKEN))
        .await
        .json::<Value>()
        .await
        .unwrap()["datasetId"]
        .clone()
}

#[tokio::test]
async fn get_reads_the_account_and_never_calls_meta() {
    let app = app_with_account_without_dataset().await;
    Mock::given(wiremock::matchers::any())
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&app.graph)
        .await;
    assert_eq!(stored_dataset(&app).await, Value::Null);
    let missing = app.get("/v1/whatsapp/dataset", Some(ADMIN_TOKEN)).await;
    assert_eq!(missing.status(), 400);
}

#[tokio::test]
async fn post_creates_a_dataset_when_meta_has_none_and_is_idempotent() {
    let app = app_with_account_without_dataset().await;
    Mock::given(method("GET"))
        .and(path(dataset_path()))
        .and(header(
            "authorization",
            format!("Bearer {ACCESS_TOKEN}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"data": []})))
        .up_to_n_times(1)
        .expect(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("POST"))
        .and(path(dataset_path()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "555000111"})))
        .expect(1)
        .mount(&app.graph)
        .await;
    let created = app
        .admin_post("/v1/whatsapp/dataset", &json!({"accountId": "acc_ds"}))
        .await;
    assert_eq!(created.status(), 200);
    assert_eq!(
        created.json::<Value>().await.unwrap(),
        json!({"datasetId": "555000111", "created": true})
    );
    assert_eq!(stored_dataset(&app).await, "555000111");

    // Meta now reports the dataset: the second call reads it and creates nothing.
    Mock::given(method("GET"))
        .and(path(dataset_path()))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"data": [{"id": "555000111"}]})),
        )
        .expect(1)
        .mount(&app.graph)
        .await;
    let again = app
        .admin_post("/v1/whatsapp/dataset", &json!({"accountId": "acc_ds"}))
        .await;
    assert_eq!(
        again.json::<Value>().await.unwrap(),
        json!({"datasetId": "555000111", "created": false})
    );
}

#[tokio::test]
async fn post_adopts_an_existing_dataset() {
    let app = app_with_account_without_dataset().await;
    Mock::given(method("GET"))
        .and(path(dataset_path()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "777"})))
        .expect(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("POST"))
        .and(path(dataset_path()))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&app.graph)
        .await;
    let response = app
        .admin_post("/v1/whatsapp/dataset", &json!({"accountId": "acc_ds"}))
        .await;
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"datasetId": "777", "created": false})
    );
    assert_eq!(stored_dataset(&app).await, "777");
}

#[tokio::test]
async fn meta_errors_answer_502_with_the_code_and_a_hint() {
    let app = app_with_account_without_dataset().await;
    Mock::given(method("GET"))
        .and(path(dataset_path()))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {"message": "Invalid OAuth access token", "type": "OAuthException", "code": 190, "fbtrace_id": "DS-TRACE"}})))
        .mount(&app.graph)
        .await;
    let response = app
        .admin_post("/v1/whatsapp/dataset", &json!({"accountId": "acc_ds"}))
        .await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "meta_error");
    assert_eq!(body["metaCode"], 190);
    assert_eq!(body["traceId"], "DS-TRACE");
    assert!(body["error"].as_str().unwrap().contains("accessToken"));
    assert!(!body.to_string().contains(ACCESS_TOKEN));
    assert_eq!(stored_dataset(&app).await, Value::Null);
}
