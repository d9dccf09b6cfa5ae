//! The webhook journal keeps bodies for the retention period, and always keeps those still
//! held for a number without an account.

use crate::helpers::{messages_webhook, metric_value, referral, spawn_app, SAMPLE_PHONE};

#[tokio::test]
async fn old_journal_entries_are_pruned_but_held_ones_survive() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let routed = messages_webhook(&[("wamid.R1", SAMPLE_PHONE, 1_750_275_992, None)]);
    assert_eq!(app.post_webhook_json(&routed).await.status(), 200);
    let mut held = messages_webhook(&[(
        "wamid.H1",
        "15550009999",
        1_750_275_992,
        Some(referral(Some("CLID-HELD"), "ad-held")),
    )]);
    held["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = "999000999".into();
    assert_eq!(app.post_webhook_json(&held).await.status(), 200);
    assert_eq!(
        metric_value(&app.metrics().await, "ctwa_journal_entries_pruned_total"),
        Some(0.0)
    );

    // 31 days later the routed body is past the 30-day retention; the held one is kept.
    app.clock.advance(chrono::Duration::days(31));
    app.prune_journal_now().await;
    let pruned = metric_value(&app.metrics().await, "ctwa_journal_entries_pruned_total");
    assert_eq!(pruned, Some(1.0));

    // The held body is still there to be replayed when its account arrives.
    let response = app
        .admin_post(
            "/v1/admin/accounts",
            &serde_json::json!({"id": "acc_late", "phoneNumberId": "999000999", "wabaId": "1", "accessToken": "t"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let lookup = app.attribution("15550009999").await;
    assert_eq!(
        lookup["results"][0]["conversations"][0]["metadata"]["ctwa_clid"],
        "CLID-HELD"
    );
    // The sample account's data is untouched by pruning the journal.
    assert_eq!(app.sample_conversations(SAMPLE_PHONE).await.len(), 1);
}
