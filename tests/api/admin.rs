//! The admin API and authentication (SPEC §4.1, §4.6).

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{
    for_phone_number_id, messages_webhook, referral, spawn_app, TestApp, ACCESS_TOKEN, ADMIN_TOKEN,
    SAMPLE_ACCOUNT_ID, SAMPLE_DATASET_ID, SAMPLE_PHONE_NUMBER_ID, SAMPLE_WABA_ID,
};

const OTHER_ACCOUNT_ID: &str = "acc_other";
const OTHER_PHONE_NUMBER_ID: &str = "209876543210987";

fn account_body(id: Option<&str>, phone_number_id: &str) -> Value {
    let mut body = json!({
        "name": "Corner shop",
        "phoneNumberId": phone_number_id,
        "wabaId": SAMPLE_WABA_ID,
        "displayPhoneNumber": "15550783881",
        "accessToken": ACCESS_TOKEN,
        "metadata": {"metaCapiDatasetId": SAMPLE_DATASET_ID, "connectedFacebookPageId": "1234567890"}
    });
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    body
}

/// Sends a request and returns its status and raw body text.
async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, String) {
    let mut request = app.client.request(method, app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("the server answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("not JSON ({error}): {text}"))
}

/// SPEC §4: a 401 body is exactly `{"error":"Unauthorized","code":"unauthorized"}`, no more.
fn assert_unauthorized(status: u16, text: &str, context: &str) {
    assert_eq!(status, 401, "{context}: {text}");
    assert_eq!(
        parse(text),
        json!({"error": "Unauthorized", "code": "unauthorized"}),
        "{context}: {text}"
    );
}

fn assert_error(status: u16, text: &str, expected_status: u16, expected_code: &str) {
    assert_eq!(status, expected_status, "{text}");
    let body = parse(text);
    assert_eq!(body["code"], expected_code, "{text}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|message| !message.is_empty()),
        "{text}"
    );
}

#[tokio::test]
async fn creating_an_account_answers_201_without_the_access_token() {
    let app = spawn_app().await;
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        Some(&account_body(Some("acc_shop"), SAMPLE_PHONE_NUMBER_ID)),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    assert!(
        !text.contains(ACCESS_TOKEN),
        "the access token leaked: {text}"
    );
    let account = parse(&text);
    assert_eq!(account["id"], "acc_shop");
    assert_eq!(account["name"], "Corner shop");
    assert_eq!(account["phoneNumberId"], SAMPLE_PHONE_NUMBER_ID);
    assert_eq!(account["wabaId"], SAMPLE_WABA_ID);
    assert_eq!(account["displayPhoneNumber"], "15550783881");
    assert_eq!(account["hasAccessToken"], true);
    assert!(account.get("accessToken").is_none(), "{text}");
    assert_eq!(account["metadata"]["metaCapiDatasetId"], SAMPLE_DATASET_ID);
    assert_eq!(account["metadata"]["connectedFacebookPageId"], "1234567890");

    // Nor in the list or a single read.
    for path in ["/v1/admin/accounts", "/v1/admin/accounts/acc_shop"] {
        let (status, text) = call(&app, Method::GET, path, Some(ADMIN_TOKEN), None).await;
        assert_eq!(status, 200, "{path}: {text}");
        assert!(
            !text.contains(ACCESS_TOKEN),
            "the access token leaked from {path}: {text}"
        );
    }
}

#[tokio::test]
async fn an_account_without_an_id_gets_a_generated_one() {
    let app = spawn_app().await;
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        Some(&account_body(None, SAMPLE_PHONE_NUMBER_ID)),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let id = parse(&text)["id"].as_str().unwrap().to_string();
    assert!(!id.is_empty());
    let (status, text) = call(
        &app,
        Method::GET,
        &format!("/v1/admin/accounts/{id}"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(parse(&text)["id"], id);

    // Two generated ids differ.
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        Some(&account_body(None, OTHER_PHONE_NUMBER_ID)),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    assert_ne!(parse(&text)["id"], id);
}

#[tokio::test]
async fn a_phone_number_id_can_belong_to_one_account_only() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        Some(&account_body(Some("acc_copy"), SAMPLE_PHONE_NUMBER_ID)),
    )
    .await;
    assert_error(status, &text, 409, "conflict");
    assert!(!text.contains(ACCESS_TOKEN));
    // Nothing was created.
    let (status, _) = call(
        &app,
        Method::GET,
        "/v1/admin/accounts/acc_copy",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Nor can an id be used twice.
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        Some(&account_body(Some(SAMPLE_ACCOUNT_ID), "300000000000003")),
    )
    .await;
    assert_error(status, &text, 409, "conflict");

    // Nor can an account take another one's number by PATCH.
    app.register_account(OTHER_ACCOUNT_ID, OTHER_PHONE_NUMBER_ID)
        .await;
    let (status, text) = call(
        &app,
        Method::PATCH,
        &format!("/v1/admin/accounts/{OTHER_ACCOUNT_ID}"),
        Some(ADMIN_TOKEN),
        Some(&json!({"phoneNumberId": SAMPLE_PHONE_NUMBER_ID})),
    )
    .await;
    assert_error(status, &text, 409, "conflict");
}

#[tokio::test]
async fn accounts_are_listed_read_updated_and_deleted() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    app.register_account(OTHER_ACCOUNT_ID, OTHER_PHONE_NUMBER_ID)
        .await;

    let (status, text) = call(
        &app,
        Method::GET,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let list = parse(&text);
    let mut ids: Vec<&str> = list["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|account| account["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, vec![OTHER_ACCOUNT_ID, SAMPLE_ACCOUNT_ID]);
    assert!(list["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|account| account["hasAccessToken"] == true));

    let path = format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}");
    let (status, text) = call(&app, Method::GET, &path, Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 200, "{text}");
    let account = parse(&text);
    assert_eq!(account["name"], "Sample shop");
    assert_eq!(account["metadata"]["metaCapiDatasetId"], SAMPLE_DATASET_ID);

    // Rename; the rest is untouched.
    let (status, text) = call(
        &app,
        Method::PATCH,
        &path,
        Some(ADMIN_TOKEN),
        Some(&json!({"name": "New name"})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let renamed = parse(&text);
    assert_eq!(renamed["name"], "New name");
    assert_eq!(renamed["phoneNumberId"], SAMPLE_PHONE_NUMBER_ID);
    assert_eq!(renamed["metadata"]["metaCapiDatasetId"], SAMPLE_DATASET_ID);
    assert_eq!(renamed["hasAccessToken"], true);

    // Set, then clear the dataset with null.
    let (status, text) = call(
        &app,
        Method::PATCH,
        &path,
        Some(ADMIN_TOKEN),
        Some(&json!({"metadata": {"metaCapiDatasetId": "111222333444555"}})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        parse(&text)["metadata"]["metaCapiDatasetId"],
        "111222333444555"
    );
    let (status, text) = call(
        &app,
        Method::PATCH,
        &path,
        Some(ADMIN_TOKEN),
        Some(&json!({"metadata": {"metaCapiDatasetId": null}})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(parse(&text)["metadata"]["metaCapiDatasetId"], Value::Null);
    let (_, text) = call(&app, Method::GET, &path, Some(ADMIN_TOKEN), None).await;
    let stored = parse(&text);
    assert_eq!(stored["metadata"]["metaCapiDatasetId"], Value::Null);
    assert_eq!(stored["name"], "New name");

    // A new access token is accepted and still never shown.
    let (status, text) = call(
        &app,
        Method::PATCH,
        &path,
        Some(ADMIN_TOKEN),
        Some(&json!({"accessToken": "EAAG-rotated-token"})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(!text.contains("EAAG-rotated-token"), "{text}");
    assert_eq!(parse(&text)["hasAccessToken"], true);

    // Delete, then it is gone.
    let (status, text) = call(&app, Method::DELETE, &path, Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 204, "{text}");
    assert!(text.is_empty(), "{text}");
    let (status, text) = call(&app, Method::GET, &path, Some(ADMIN_TOKEN), None).await;
    assert_error(status, &text, 404, "account_not_found");
    let (status, text) = call(&app, Method::DELETE, &path, Some(ADMIN_TOKEN), None).await;
    assert_error(status, &text, 404, "account_not_found");
    let (status, text) = call(
        &app,
        Method::PATCH,
        &path,
        Some(ADMIN_TOKEN),
        Some(&json!({"name": "x"})),
    )
    .await;
    assert_error(status, &text, 404, "account_not_found");
    let (_, text) = call(
        &app,
        Method::GET,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    let remaining = parse(&text);
    assert_eq!(remaining["accounts"].as_array().unwrap().len(), 1);
    assert_eq!(remaining["accounts"][0]["id"], OTHER_ACCOUNT_ID);
}

#[tokio::test]
async fn invalid_account_fields_are_400_with_a_field_code() {
    let app = spawn_app().await;
    for phone_number_id in ["10654035224292a", "+106540352242922", "", "1065 4035"] {
        let (status, text) = call(
            &app,
            Method::POST,
            "/v1/admin/accounts",
            Some(ADMIN_TOKEN),
            Some(&account_body(Some("acc_bad"), phone_number_id)),
        )
        .await;
        assert_error(status, &text, 400, "invalid_field");
        assert!(text.contains("phoneNumberId"), "{text}");
        assert!(!text.contains(ACCESS_TOKEN), "{text}");
    }

    let mut no_waba = account_body(Some("acc_bad"), SAMPLE_PHONE_NUMBER_ID);
    no_waba.as_object_mut().unwrap().remove("wabaId");
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        Some(&no_waba),
    )
    .await;
    assert_error(status, &text, 400, "missing_field");
    assert!(text.contains("wabaId"), "{text}");

    let mut no_phone_number_id = account_body(Some("acc_bad"), SAMPLE_PHONE_NUMBER_ID);
    no_phone_number_id
        .as_object_mut()
        .unwrap()
        .remove("phoneNumberId");
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        Some(&no_phone_number_id),
    )
    .await;
    assert_error(status, &text, 400, "missing_field");

    let mut no_token = account_body(Some("acc_bad"), SAMPLE_PHONE_NUMBER_ID);
    no_token.as_object_mut().unwrap().remove("accessToken");
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        Some(&no_token),
    )
    .await;
    assert_error(status, &text, 400, "missing_field");

    // Ids a caller chooses must be safe in URLs.
    for id in ["a/b", "", "with space"] {
        let (status, text) = call(
            &app,
            Method::POST,
            "/v1/admin/accounts",
            Some(ADMIN_TOKEN),
            Some(&account_body(Some(id), SAMPLE_PHONE_NUMBER_ID)),
        )
        .await;
        assert_error(status, &text, 400, "invalid_field");
    }

    // A bad dataset id is refused too, and nothing was created along the way.
    let mut bad_dataset = account_body(Some("acc_bad"), SAMPLE_PHONE_NUMBER_ID);
    bad_dataset["metadata"]["metaCapiDatasetId"] = json!("not-a-dataset");
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        Some(&bad_dataset),
    )
    .await;
    assert_error(status, &text, 400, "invalid_field");
    let (_, text) = call(
        &app,
        Method::GET,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(parse(&text)["accounts"], json!([]));

    // PATCH validates the same way.
    app.register_sample_account().await;
    let (status, text) = call(
        &app,
        Method::PATCH,
        &format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
        Some(ADMIN_TOKEN),
        Some(&json!({"phoneNumberId": "abc"})),
    )
    .await;
    assert_error(status, &text, 400, "invalid_field");
}

#[tokio::test]
async fn api_keys_are_shown_once_and_listed_without_secrets() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/api-keys",
        Some(ADMIN_TOKEN),
        Some(&json!({"name": "shop backend", "accountIds": [SAMPLE_ACCOUNT_ID]})),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let created = parse(&text);
    let secret = created["key"].as_str().unwrap().to_string();
    assert!(secret.starts_with("ctwa_"), "{secret}");
    assert!(secret.len() > 20, "{secret}");
    assert_eq!(created["name"], "shop backend");
    assert_eq!(created["accountIds"], json!([SAMPLE_ACCOUNT_ID]));
    let key_id = created["id"].as_str().unwrap().to_string();
    assert!(created["createdAt"].is_string());

    // The key works.
    let (status, text) = call(
        &app,
        Method::GET,
        "/v1/whatsapp/attribution?phone=16505551234",
        Some(&secret),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");

    let (status, text) = call(
        &app,
        Method::GET,
        "/v1/admin/api-keys",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(!text.contains(&secret), "the list shows the secret: {text}");
    assert!(
        !text.contains(&secret["ctwa_".len()..]),
        "the list shows the secret: {text}"
    );
    let keys = parse(&text)["keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["id"], key_id.as_str());
    assert_eq!(keys[0]["name"], "shop backend");
    assert_eq!(keys[0]["accountIds"], json!([SAMPLE_ACCOUNT_ID]));
    assert!(keys[0].get("key").is_none(), "{text}");

    // Revoked: the very next request with it is refused.
    let (status, text) = call(
        &app,
        Method::DELETE,
        &format!("/v1/admin/api-keys/{key_id}"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 204, "{text}");
    let (status, text) = call(
        &app,
        Method::GET,
        "/v1/whatsapp/attribution?phone=16505551234",
        Some(&secret),
        None,
    )
    .await;
    assert_unauthorized(status, &text, "a revoked key");
    let (_, text) = call(
        &app,
        Method::GET,
        "/v1/admin/api-keys",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(parse(&text)["keys"], json!([]));
    let (status, text) = call(
        &app,
        Method::DELETE,
        &format!("/v1/admin/api-keys/{key_id}"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_error(status, &text, 404, "key_not_found");
}

#[tokio::test]
async fn api_keys_must_name_existing_accounts() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/api-keys",
        Some(ADMIN_TOKEN),
        Some(&json!({"name": "k", "accountIds": []})),
    )
    .await;
    assert_error(status, &text, 400, "invalid_field");
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/api-keys",
        Some(ADMIN_TOKEN),
        Some(&json!({"name": "k", "accountIds": ["acc_nope"]})),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/api-keys",
        Some(ADMIN_TOKEN),
        Some(&json!({"accountIds": [SAMPLE_ACCOUNT_ID]})),
    )
    .await;
    assert_error(status, &text, 400, "missing_field");
}

#[tokio::test]
async fn requests_without_a_valid_key_are_401_with_the_exact_body() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let routes = [
        (Method::GET, "/v1/whatsapp/attribution?phone=16505551234"),
        (Method::GET, "/v1/whatsapp/conversations/conv_nope"),
        (Method::GET, "/v1/admin/accounts"),
        (Method::GET, "/v1/admin/api-keys"),
        (Method::GET, "/v1/admin/accounts/acc_sample"),
        (Method::DELETE, "/v1/admin/accounts/acc_sample"),
    ];
    for (method, path) in routes {
        for token in [
            None,
            Some("wrong-token"),
            Some("ctwa_0000000000000000"),
            Some(""),
        ] {
            let (status, text) = call(&app, method.clone(), path, token, None).await;
            assert_unauthorized(status, &text, &format!("{method} {path} with {token:?}"));
        }
    }
    // A Basic header or a prefix of the admin token is not the admin token.
    let response = app
        .client
        .get(app.url("/v1/admin/accounts"))
        .header("Authorization", format!("Basic {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let prefix = &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1];
    let (status, text) = call(&app, Method::GET, "/v1/admin/accounts", Some(prefix), None).await;
    assert_unauthorized(status, &text, "a prefix of the admin token");
    // The account survived the unauthorised DELETE.
    let (status, _) = call(
        &app,
        Method::GET,
        "/v1/admin/accounts/acc_sample",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_api_key_on_an_admin_route_is_403() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let key = app.create_key(&[SAMPLE_ACCOUNT_ID]).await;
    let calls = [
        (Method::GET, "/v1/admin/accounts".to_string(), None),
        (
            Method::GET,
            format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
            None,
        ),
        (
            Method::PATCH,
            format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
            Some(json!({"name": "hijacked"})),
        ),
        (
            Method::DELETE,
            format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
            None,
        ),
        (
            Method::POST,
            "/v1/admin/accounts".to_string(),
            Some(account_body(Some("acc_by_key"), OTHER_PHONE_NUMBER_ID)),
        ),
        (Method::GET, "/v1/admin/api-keys".to_string(), None),
        (
            Method::POST,
            "/v1/admin/api-keys".to_string(),
            Some(json!({"name": "escalate", "accountIds": [SAMPLE_ACCOUNT_ID]})),
        ),
    ];
    for (method, path, body) in calls {
        let (status, text) = call(&app, method, &path, Some(&key), body.as_ref()).await;
        assert_error(status, &text, 403, "forbidden");
    }
    // Nothing changed.
    let (_, text) = call(
        &app,
        Method::GET,
        &format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(parse(&text)["name"], "Sample shop");
    let (_, text) = call(
        &app,
        Method::GET,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(parse(&text)["accounts"].as_array().unwrap().len(), 1);
}

/// Two accounts on different business numbers, and one user who wrote to both.
async fn two_accounts_one_user(app: &TestApp, phone: &str) {
    app.register_sample_account().await;
    app.register_account(OTHER_ACCOUNT_ID, OTHER_PHONE_NUMBER_ID)
        .await;
    let to_sample = messages_webhook(&[(
        "wamid.SCOPE-SAMPLE",
        phone,
        1_750_000_000,
        Some(referral(Some("CLID-SAMPLE"), "ad-sample")),
    )]);
    let to_other = for_phone_number_id(
        messages_webhook(&[(
            "wamid.SCOPE-OTHER",
            phone,
            1_750_000_100,
            Some(referral(Some("CLID-OTHER"), "ad-other")),
        )]),
        OTHER_PHONE_NUMBER_ID,
    );
    for body in [&to_sample, &to_other] {
        assert_eq!(app.post_webhook_json(body).await.status(), 200);
    }
}

#[tokio::test]
async fn a_scoped_key_sees_only_its_accounts_in_lookups() {
    let app = spawn_app().await;
    let phone = "15551112222";
    two_accounts_one_user(&app, phone).await;

    // The admin sees both.
    let everything = app.attribution(phone).await;
    let mut accounts: Vec<&str> = everything["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|result| result["accountId"].as_str().unwrap())
        .collect();
    accounts.sort();
    assert_eq!(accounts, vec![OTHER_ACCOUNT_ID, SAMPLE_ACCOUNT_ID]);

    let sample_key = app.create_key(&[SAMPLE_ACCOUNT_ID]).await;
    let (status, text) = call(
        &app,
        Method::GET,
        &format!("/v1/whatsapp/attribution?phone={phone}"),
        Some(&sample_key),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(
        !text.contains("CLID-OTHER"),
        "another account's click leaked: {text}"
    );
    assert!(
        !text.contains(OTHER_ACCOUNT_ID),
        "another account leaked: {text}"
    );
    let body = parse(&text);
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["accountId"], SAMPLE_ACCOUNT_ID);
    assert_eq!(
        results[0]["conversations"][0]["metadata"]["ctwa_clid"],
        "CLID-SAMPLE"
    );

    // With its own accountId, the same.
    let (status, text) = call(
        &app,
        Method::GET,
        &format!("/v1/whatsapp/attribution?phone={phone}&accountId={SAMPLE_ACCOUNT_ID}"),
        Some(&sample_key),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(parse(&text)["results"].as_array().unwrap().len(), 1);

    // A key for both accounts sees both; the admin can narrow with accountId.
    let both_key = app.create_key(&[SAMPLE_ACCOUNT_ID, OTHER_ACCOUNT_ID]).await;
    let (_, text) = call(
        &app,
        Method::GET,
        &format!("/v1/whatsapp/attribution?phone={phone}"),
        Some(&both_key),
        None,
    )
    .await;
    assert_eq!(parse(&text)["results"].as_array().unwrap().len(), 2);
    let (_, text) = call(
        &app,
        Method::GET,
        &format!("/v1/whatsapp/attribution?phone={phone}&accountId={OTHER_ACCOUNT_ID}"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    let narrowed = parse(&text);
    assert_eq!(narrowed["results"].as_array().unwrap().len(), 1);
    assert_eq!(narrowed["results"][0]["accountId"], OTHER_ACCOUNT_ID);
}

#[tokio::test]
async fn a_scoped_key_asking_for_another_account_gets_the_same_404_as_for_a_missing_one() {
    let app = spawn_app().await;
    let phone = "15551113333";
    two_accounts_one_user(&app, phone).await;
    let sample_key = app.create_key(&[SAMPLE_ACCOUNT_ID]).await;

    let (status, existing_text) = call(
        &app,
        Method::GET,
        &format!("/v1/whatsapp/attribution?phone={phone}&accountId={OTHER_ACCOUNT_ID}"),
        Some(&sample_key),
        None,
    )
    .await;
    assert_error(status, &existing_text, 404, "account_not_found");
    assert!(!existing_text.contains("CLID-OTHER"));

    let missing_id = "acc_nowhere";
    let (status, missing_text) = call(
        &app,
        Method::GET,
        &format!("/v1/whatsapp/attribution?phone={phone}&accountId={missing_id}"),
        Some(&sample_key),
        None,
    )
    .await;
    assert_error(status, &missing_text, 404, "account_not_found");
    // The answers differ only by the id that was asked for.
    assert_eq!(
        existing_text.replace(OTHER_ACCOUNT_ID, "<id>"),
        missing_text.replace(missing_id, "<id>")
    );
}

#[tokio::test]
async fn a_scoped_key_cannot_read_another_accounts_conversation() {
    let app = spawn_app().await;
    let phone = "15551114444";
    two_accounts_one_user(&app, phone).await;
    let everything = app.attribution(phone).await;
    let conversation_of = |account_id: &str| -> String {
        everything["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|result| result["accountId"] == account_id)
            .unwrap()["conversations"][0]["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let sample_conversation = conversation_of(SAMPLE_ACCOUNT_ID);
    let other_conversation = conversation_of(OTHER_ACCOUNT_ID);

    let sample_key = app.create_key(&[SAMPLE_ACCOUNT_ID]).await;
    let (status, text) = call(
        &app,
        Method::GET,
        &format!("/v1/whatsapp/conversations/{sample_conversation}"),
        Some(&sample_key),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(parse(&text)["metadata"]["ctwa_clid"], "CLID-SAMPLE");

    let (status, hidden_text) = call(
        &app,
        Method::GET,
        &format!("/v1/whatsapp/conversations/{other_conversation}"),
        Some(&sample_key),
        None,
    )
    .await;
    assert_eq!(status, 404, "{hidden_text}");
    assert!(!hidden_text.contains("CLID-OTHER"), "{hidden_text}");
    let (status, missing_text) = call(
        &app,
        Method::GET,
        "/v1/whatsapp/conversations/conv_000000000000000000000000",
        Some(&sample_key),
        None,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(parse(&hidden_text)["code"], parse(&missing_text)["code"]);

    // The admin reads both.
    assert_eq!(
        app.conversation(&other_conversation).await["metadata"]["ctwa_clid"],
        "CLID-OTHER"
    );
}

/// The attribution lookup of `phone` as `token` sees: (status, body text).
async fn lookup(app: &TestApp, phone: &str, token: &str) -> (u16, String) {
    call(
        app,
        Method::GET,
        &format!("/v1/whatsapp/attribution?phone={phone}"),
        Some(token),
        None,
    )
    .await
}

/// The admin's list of API keys: (id, accountIds) pairs.
async fn listed_keys(app: &TestApp) -> Vec<(String, Value)> {
    let (status, text) = call(
        app,
        Method::GET,
        "/v1/admin/api-keys",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    parse(&text)["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| {
            (
                key["id"].as_str().unwrap().to_string(),
                key["accountIds"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn deleting_an_account_revokes_its_own_keys_and_narrows_shared_ones() {
    let app = spawn_app().await;
    let phone = "15551115555";
    two_accounts_one_user(&app, phone).await;
    let only_sample_key = app.create_key(&[SAMPLE_ACCOUNT_ID]).await;
    let shared_key = app.create_key(&[SAMPLE_ACCOUNT_ID, OTHER_ACCOUNT_ID]).await;
    let other_key = app.create_key(&[OTHER_ACCOUNT_ID]).await;
    let (_, text) = lookup(&app, phone, &shared_key).await;
    assert!(text.contains("CLID-SAMPLE"), "{text}");

    let (status, text) = call(
        &app,
        Method::DELETE,
        &format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 204, "{text}");
    assert!(text.is_empty(), "{text}");

    // A key that reached the deleted account only is revoked.
    let (status, text) = lookup(&app, phone, &only_sample_key).await;
    assert_unauthorized(status, &text, "a key scoped to the deleted account only");

    // A shared key keeps its other account and loses the deleted one.
    let (status, text) = lookup(&app, phone, &shared_key).await;
    assert_eq!(status, 200, "{text}");
    assert!(!text.contains("CLID-SAMPLE"), "{text}");
    let body = parse(&text);
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{text}");
    assert_eq!(results[0]["accountId"], OTHER_ACCOUNT_ID);
    let (status, text) = call(
        &app,
        Method::GET,
        &format!("/v1/whatsapp/attribution?phone={phone}&accountId={SAMPLE_ACCOUNT_ID}"),
        Some(&shared_key),
        None,
    )
    .await;
    assert_error(status, &text, 404, "account_not_found");

    // A key that never reached it is untouched.
    let (status, text) = lookup(&app, phone, &other_key).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("CLID-OTHER"), "{text}");

    // The admin's list agrees: two keys left, both on the other account only.
    let keys = listed_keys(&app).await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    for (_, account_ids) in &keys {
        assert_eq!(account_ids, &json!([OTHER_ACCOUNT_ID]), "{keys:?}");
    }
}

#[tokio::test]
async fn a_deleted_account_id_is_retired_and_its_data_is_kept_for_the_admin_only() {
    let app = spawn_app().await;
    let phone = "15551116666";
    two_accounts_one_user(&app, phone).await;
    let old_key = app.create_key(&[SAMPLE_ACCOUNT_ID]).await;
    let path = format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}");
    let (status, text) = call(&app, Method::DELETE, &path, Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 204, "{text}");

    // The same id, another number: refused with a code of its own and a message that says why.
    let new_number = "301234567890123";
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        Some(&account_body(Some(SAMPLE_ACCOUNT_ID), new_number)),
    )
    .await;
    assert_error(status, &text, 409, "account_id_retired");
    let message = parse(&text)["error"].as_str().unwrap().to_string();
    assert!(message.contains(SAMPLE_ACCOUNT_ID), "{message}");
    assert!(
        message.contains("conversations and conversions are kept"),
        "{message}"
    );
    assert!(message.contains("another id"), "{message}");
    let (status, text) = call(&app, Method::GET, &path, Some(ADMIN_TOKEN), None).await;
    assert_error(status, &text, 404, "account_not_found");

    // The old key stays dead.
    let (status, text) = lookup(&app, phone, &old_key).await;
    assert_unauthorized(status, &text, "the deleted account's key");

    // A new account on the old number, under a new id, starts with nothing of the old one.
    let new_id = "acc_sample_2";
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        Some(&account_body(Some(new_id), SAMPLE_PHONE_NUMBER_ID)),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let new_key = app.create_key(&[new_id]).await;
    let (status, text) = lookup(&app, phone, &new_key).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(parse(&text)["results"], json!([]), "{text}");

    // The deleted account's click ids are still in the store, under the retired id, for the
    // admin token only.
    let everything = app.attribution(phone).await;
    let kept = everything["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|result| result["accountId"] == SAMPLE_ACCOUNT_ID)
        .unwrap_or_else(|| panic!("the deleted account's data is gone: {everything}"));
    assert_eq!(
        kept["conversations"][0]["metadata"]["ctwa_clid"],
        "CLID-SAMPLE"
    );
}

#[tokio::test]
async fn a_key_cannot_be_created_for_a_deleted_account() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let (status, _) = call(
        &app,
        Method::DELETE,
        &format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/api-keys",
        Some(ADMIN_TOKEN),
        Some(&json!({"name": "late", "accountIds": [SAMPLE_ACCOUNT_ID]})),
    )
    .await;
    assert_error(status, &text, 400, "unknown_account");
    assert_eq!(listed_keys(&app).await, vec![]);
}

/// The deletion is durable before its 204: after a SIGKILL right after it, the real binary
/// still refuses the key, lists it narrowed or not at all, and keeps the id retired.
#[tokio::test]
async fn an_account_deletion_survives_a_kill_right_after_its_answer() {
    use crate::server::{RunningServer, EXIT_TIMEOUT};

    let data_dir = tempfile::tempdir().unwrap();
    let env = [
        ("CTWA_APP_SECRETS", crate::helpers::APP_SECRET.to_string()),
        ("CTWA_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        (
            "CTWA_VERIFY_TOKEN",
            crate::helpers::VERIFY_TOKEN.to_string(),
        ),
        ("CTWA_GRAPH_URL", "http://127.0.0.1:9".to_string()),
    ];
    let admin = |server: &RunningServer, method: Method, path: &str, body: Option<Value>| {
        let mut request = server
            .client
            .request(method, server.url(path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.expect("the server answers");
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };

    let mut server = RunningServer::launch(data_dir.path(), &env).await;
    for (id, number) in [
        (SAMPLE_ACCOUNT_ID, SAMPLE_PHONE_NUMBER_ID),
        (OTHER_ACCOUNT_ID, OTHER_PHONE_NUMBER_ID),
    ] {
        let (status, text) = admin(
            &server,
            Method::POST,
            "/v1/admin/accounts",
            Some(account_body(Some(id), number)),
        )
        .await;
        assert_eq!(status, 201, "{text}");
    }
    let mut secrets = Vec::new();
    for account_ids in [
        json!([SAMPLE_ACCOUNT_ID]),
        json!([SAMPLE_ACCOUNT_ID, OTHER_ACCOUNT_ID]),
    ] {
        let (status, text) = admin(
            &server,
            Method::POST,
            "/v1/admin/api-keys",
            Some(json!({"name": "k", "accountIds": account_ids})),
        )
        .await;
        assert_eq!(status, 201, "{text}");
        secrets.push(parse(&text)["key"].as_str().unwrap().to_string());
    }
    let (status, text) = admin(
        &server,
        Method::DELETE,
        &format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
        None,
    )
    .await;
    assert_eq!(status, 204, "{text}");
    server.kill_hard().await;
    drop(server);

    let mut server = RunningServer::launch(data_dir.path(), &env).await;
    let with_key = |secret: &str, account_id: &str| {
        server
            .client
            .get(server.url(&format!(
                "/v1/whatsapp/attribution?phone=15551117777&accountId={account_id}"
            )))
            .bearer_auth(secret)
            .send()
    };
    let only_sample = with_key(&secrets[0], OTHER_ACCOUNT_ID).await.unwrap();
    assert_eq!(only_sample.status(), 401, "{}", server.log());
    let shared_on_sample = with_key(&secrets[1], SAMPLE_ACCOUNT_ID).await.unwrap();
    assert_eq!(shared_on_sample.status(), 404);
    let shared_on_other = with_key(&secrets[1], OTHER_ACCOUNT_ID).await.unwrap();
    assert_eq!(shared_on_other.status(), 200);
    let (status, text) = admin(&server, Method::GET, "/v1/admin/api-keys", None).await;
    assert_eq!(status, 200, "{text}");
    let keys = parse(&text)["keys"].clone();
    assert_eq!(keys.as_array().unwrap().len(), 1, "{keys}");
    assert_eq!(keys[0]["accountIds"], json!([OTHER_ACCOUNT_ID]));
    let (status, text) = admin(
        &server,
        Method::POST,
        "/v1/admin/accounts",
        Some(account_body(Some(SAMPLE_ACCOUNT_ID), "301234567890123")),
    )
    .await;
    assert_error(status, &text, 409, "account_id_retired");

    server.terminate();
    assert!(
        server.wait_for_exit(EXIT_TIMEOUT).await.success(),
        "{}",
        server.log()
    );
}

/// Found by schemathesis: a token that cannot be an HTTP header value was stored, and every Graph
/// call for the account then failed before it was sent (a 502 on POST /v1/whatsapp/dataset).
#[tokio::test]
async fn an_access_token_that_cannot_be_a_header_is_refused() {
    let app = spawn_app().await;
    for token in ["tök\u{e9}n", "tok\u{7f}en", "tok\u{1}en", "tok en"] {
        let mut body = account_body(Some("acc_token"), SAMPLE_PHONE_NUMBER_ID);
        body["accessToken"] = Value::from(token);
        let (status, text) = call(
            &app,
            Method::POST,
            "/v1/admin/accounts",
            Some(ADMIN_TOKEN),
            Some(&body),
        )
        .await;
        assert_error(status, &text, 400, "invalid_field");
        assert!(text.contains("accessToken"), "{text}");
    }
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        Some(&account_body(Some("acc_token"), SAMPLE_PHONE_NUMBER_ID)),
    )
    .await;
    assert_eq!(status, 201, "{text}");
}

/// Found by schemathesis: serde reads a struct from an array too (fields by position), so
/// `"metadata": [null, null]` or a whole body sent as an array used to be accepted.
#[tokio::test]
async fn objects_sent_as_arrays_are_refused() {
    let app = spawn_app().await;
    let mut body = account_body(Some("acc_array"), SAMPLE_PHONE_NUMBER_ID);
    body["metadata"] = json!([SAMPLE_DATASET_ID, null]);
    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/accounts",
        Some(ADMIN_TOKEN),
        Some(&body),
    )
    .await;
    assert_error(status, &text, 400, "invalid_field");
    assert!(text.contains("expected an object"), "{text}");

    let (status, text) = call(
        &app,
        Method::POST,
        "/v1/admin/api-keys",
        Some(ADMIN_TOKEN),
        Some(&json!(["reporting", [SAMPLE_ACCOUNT_ID]])),
    )
    .await;
    assert_error(status, &text, 400, "invalid_field");
    assert!(text.contains("JSON object"), "{text}");
}
