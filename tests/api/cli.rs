//! The admin subcommands of the real binary, against a running server.

use std::process::{Command, Output};

use serde_json::Value;

use crate::helpers::{
    messages_webhook, referral, spawn_app, TestApp, ADMIN_TOKEN, SAMPLE_PHONE,
    SAMPLE_PHONE_NUMBER_ID, SAMPLE_WABA_ID,
};

async fn ctwa_relay(app: &TestApp, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ctwa-relay"));
    command
        .args(args)
        .arg("--url")
        .arg(&app.address)
        .env("CTWA_ADMIN_TOKEN", ADMIN_TOKEN)
        .env_remove("CTWA_CONFIG")
        .env_remove("CTWA_ACCESS_TOKEN");
    tokio::task::spawn_blocking(move || command.output().expect("the binary runs"))
        .await
        .unwrap()
}

fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the command prints JSON")
}

#[tokio::test]
async fn accounts_keys_and_lookup_work_from_the_command_line() {
    let app = spawn_app().await;
    let added = json_of(
        &ctwa_relay(
            &app,
            &[
                "accounts",
                "add",
                "--id",
                "acc_cli",
                "--phone-number-id",
                SAMPLE_PHONE_NUMBER_ID,
                "--waba-id",
                SAMPLE_WABA_ID,
                "--access-token",
                "EAAG-cli-token",
                "--dataset-id",
                "42",
            ],
        )
        .await,
    );
    assert_eq!(added["id"], "acc_cli");
    assert_eq!(added["hasAccessToken"], true);
    assert_eq!(added["metadata"]["metaCapiDatasetId"], "42");

    let listed = json_of(&ctwa_relay(&app, &["accounts", "list"]).await);
    assert_eq!(listed["accounts"].as_array().unwrap().len(), 1);
    let updated = json_of(
        &ctwa_relay(
            &app,
            &["accounts", "update", "acc_cli", "--name", "CLI shop"],
        )
        .await,
    );
    assert_eq!(updated["name"], "CLI shop");
    assert_eq!(
        json_of(&ctwa_relay(&app, &["accounts", "show", "acc_cli"]).await)["name"],
        "CLI shop"
    );

    let key = json_of(
        &ctwa_relay(
            &app,
            &["keys", "create", "--name", "crm", "--account", "acc_cli"],
        )
        .await,
    );
    assert!(key["key"].as_str().unwrap().starts_with("ctwa_"));
    let keys = json_of(&ctwa_relay(&app, &["keys", "list"]).await);
    assert_eq!(keys["keys"][0]["id"], key["id"]);
    assert!(keys["keys"][0].get("key").is_none());
    let revoked = ctwa_relay(&app, &["keys", "revoke", key["id"].as_str().unwrap()]).await;
    assert!(revoked.status.success());

    let webhook = messages_webhook(&[(
        "wamid.CLI",
        SAMPLE_PHONE,
        1_750_275_992,
        Some(referral(Some("CLID-CLI"), "ad-cli")),
    )]);
    assert_eq!(app.post_webhook_json(&webhook).await.status(), 200);
    let lookup = json_of(&ctwa_relay(&app, &["lookup", "--phone", SAMPLE_PHONE]).await);
    assert_eq!(
        lookup["results"][0]["conversations"][0]["metadata"]["ctwa_clid"],
        "CLID-CLI"
    );

    let removed = ctwa_relay(&app, &["accounts", "remove", "acc_cli"]).await;
    assert!(removed.status.success());
    let missing = ctwa_relay(&app, &["accounts", "show", "acc_cli"]).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
}

#[tokio::test]
async fn admin_commands_without_a_token_say_what_to_set() {
    let app = spawn_app().await;
    let output = tokio::task::spawn_blocking({
        let address = app.address.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_ctwa-relay"))
                .args(["accounts", "list", "--url", &address])
                .env_remove("CTWA_ADMIN_TOKEN")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("CTWA_ADMIN_TOKEN"));
}

#[tokio::test]
async fn lookup_sends_its_values_as_typed() {
    let app = spawn_app().await;
    // A '+' reaches the server as '+', which the contract refuses with a hint, not as a space.
    let plus = ctwa_relay(&app, &["lookup", "--phone", "+16505551234"]).await;
    assert!(!plus.status.success());
    let stderr = String::from_utf8_lossy(&plus.stderr);
    assert!(stderr.contains("drop the leading '+'"), "{stderr}");

    // An '&' stays inside the BSUID instead of starting another parameter.
    let bsuid = format!("US.none&phone={SAMPLE_PHONE}");
    let lookup = json_of(&ctwa_relay(&app, &["lookup", "--bsuid", &bsuid]).await);
    assert_eq!(lookup["bsuid"], bsuid.as_str());
    assert_eq!(lookup["phone"], Value::Null);
    assert_eq!(lookup["results"].as_array().unwrap().len(), 0);
}
