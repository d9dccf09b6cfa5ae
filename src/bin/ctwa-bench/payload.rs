//! What the bench sends: signed webhooks in the shapes of `fixtures/meta/*.json` (one message or
//! a batch per POST), Zernio-shaped conversion requests and attribution lookups, each built from a
//! request index so that every wamid, phone and event id is unique within a run.
//!
//! Phones: index `i` of the run is the user `phone_base + i` (12 digits), who sends one message.
//! About 30 % of the messages carry a CTWA referral with a `ctwa_clid` (decided by a hash of the
//! index, so the share holds for any range of indexes), the rest are plain text or button replies.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::Method;
use sha2::Sha256;
use std::fmt::Write as _;

use crate::load::Prepared;

/// The Graph API version the spawned server is given and the stand-in answers under.
pub const GRAPH_VERSION: &str = "v25.0";
/// The dataset of the bench account: conversions go to `/{GRAPH_VERSION}/{DATASET_ID}/events`.
pub const DATASET_ID: &str = "990000000000001";

/// How a range of indexes is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// ~30 % CTWA referrals, ~10 % button replies, the rest plain text.
    Realistic,
    /// Every message carries a CTWA referral (the phones `convert` sends conversions for).
    AllReferrals,
}

/// The bench's account on the server and how its traffic is written.
pub struct Fleet {
    pub run: u32,
    pub account_id: String,
    pub phone_number_id: String,
    pub waba_id: String,
    pub display_phone_number: String,
    /// Phones are `phone_base + index`.
    phone_base: u64,
    app_secret: Option<Vec<u8>>,
    /// `Bearer <admin token>`.
    admin_auth: Option<HeaderValue>,
}

/// A fast, stateless 64-bit mixer (SplitMix64's finaliser): good enough to spread indexes.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

impl Fleet {
    pub fn new(run: u32, app_secret: Option<&str>, admin_token: Option<&str>) -> Fleet {
        // Distinct runs against one server use distinct numbers and phones: 10^9 phones per run.
        let slot = u64::from(run) % 89 + 10;
        Fleet {
            run,
            account_id: format!("bench-{run:08x}"),
            phone_number_id: format!("9{:014}", u64::from(run)),
            waba_id: format!("8{:014}", u64::from(run)),
            display_phone_number: "15550001234".to_string(),
            phone_base: slot * 1_000_000_000,
            app_secret: app_secret.map(|secret| secret.as_bytes().to_vec()),
            admin_auth: admin_token.map(|token| {
                HeaderValue::from_str(&format!("Bearer {token}"))
                    .expect("the admin token is a valid header value")
            }),
        }
    }

    /// The phone (digits, 12 of them) of the user with this index.
    pub fn phone(&self, index: u64) -> u64 {
        self.phone_base + index
    }

    pub fn has_referral(&self, index: u64, mix: Mix) -> bool {
        match mix {
            Mix::AllReferrals => true,
            Mix::Realistic => mix64(index ^ u64::from(self.run)) % 100 < 30,
        }
    }

    /// The admin API body that creates the bench account, with a dataset.
    pub fn account_body(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.account_id,
            "name": "ctwa-bench",
            "phoneNumberId": self.phone_number_id,
            "wabaId": self.waba_id,
            "displayPhoneNumber": self.display_phone_number,
            "accessToken": format!("bench-token-{:08x}", self.run),
            "metadata": { "metaCapiDatasetId": DATASET_ID },
        })
    }

    fn admin_auth(&self) -> HeaderValue {
        self.admin_auth
            .clone()
            .expect("an admin token is set before any /v1 request is built")
    }

    /// One inbound message of user `index`, as Meta writes it (`messages[]` item).
    fn write_message(&self, out: &mut String, index: u64, mix: Mix, timestamp: u64) {
        let phone = self.phone(index);
        let run = self.run;
        let hash = mix64(index.wrapping_add(u64::from(run) << 32));
        out.push('{');
        if self.has_referral(index, mix) {
            // wa_02_text_ctwa_referral.json; 20 ads, a click id as long as Meta's.
            let ad = 120_226_305_854_810_000 + hash % 20;
            let _ = write!(
                out,
                r#""referral":{{"source_url":"https://fb.me/b{ad:x}","source_id":"{ad}","source_type":"ad","body":"Summer Succulents are here!","headline":"Chat with us","media_type":"image","image_url":"https://scontent.xx.fbcdn.net/v/t45.1-{ad}","ctwa_clid":"Aff-bench{run:08x}{index:012}n8ZTODiE79d22KtAwQKj9e_mIEOOj27vDVwFjN80dp4_0NiNhEgpGo0AHemvuSoifXaytfTzcchptiErTKCqTrJ5nW1h7IHYeYymGb5K5J5","welcome_message":{{"text":"Hi there! Let us know how we can help!"}}}},"from":"{phone}","id":"wamid.BENCH{run:08X}{index:012}AgASGBQzQUQ0N0VFMDA2MTQ0RkJFNkNDNAA=","timestamp":"{timestamp}","text":{{"body":"Can I get more info about this?"}},"type":"text""#
            );
        } else if hash.is_multiple_of(7) {
            // wa_10_interactive_button_reply.json
            let _ = write!(
                out,
                r#""context":{{"from":"{display}","id":"wamid.BENCHCTX{run:08X}{index:012}"}},"from":"{phone}","id":"wamid.BENCH{run:08X}{index:012}AgASGBQzQTZBQzg0MzQ4QjRCM0NGNkVGOAA=","timestamp":"{timestamp}","type":"interactive","interactive":{{"type":"button_reply","button_reply":{{"id":"cancel-button","title":"Cancel"}}}}"#,
                display = self.display_phone_number
            );
        } else {
            // wa_01_text_inbound.json
            let _ = write!(
                out,
                r#""from":"{phone}","id":"wamid.BENCH{run:08X}{index:012}AgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=","timestamp":"{timestamp}","type":"text","text":{{"body":"Does it come in another color?"}}"#
            );
        }
        out.push('}');
    }

    /// A webhook body with the messages of users `first .. first + count`, one change, as Meta
    /// batches them (`contacts[]` and `messages[]` side by side).
    pub fn webhook_body(&self, first: u64, count: u64, mix: Mix) -> Bytes {
        let timestamp = now_unix();
        let mut out = String::with_capacity(600 + count as usize * 700);
        let _ = write!(
            out,
            r#"{{"object":"whatsapp_business_account","entry":[{{"id":"{waba}","changes":[{{"value":{{"messaging_product":"whatsapp","metadata":{{"display_phone_number":"{display}","phone_number_id":"{number}"}},"contacts":["#,
            waba = self.waba_id,
            display = self.display_phone_number,
            number = self.phone_number_id,
        );
        for index in first..first + count {
            if index != first {
                out.push(',');
            }
            let phone = self.phone(index);
            let _ = write!(
                out,
                r#"{{"profile":{{"name":"Bench User {index}"}},"wa_id":"{phone}"}}"#
            );
        }
        out.push_str(r#"],"messages":["#);
        for index in first..first + count {
            if index != first {
                out.push(',');
            }
            self.write_message(&mut out, index, mix, timestamp);
        }
        out.push_str(r#"]},"field":"messages"}]}]}"#);
        Bytes::from(out)
    }

    /// A signed `POST /webhooks/whatsapp` with this body.
    pub fn signed_webhook(&self, body: Bytes) -> Prepared {
        let secret = self
            .app_secret
            .as_deref()
            .expect("an app secret is set before any webhook is built");
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(&body);
        let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        Prepared {
            method: Method::POST,
            path: "/webhooks/whatsapp".to_string(),
            headers: vec![
                (CONTENT_TYPE, HeaderValue::from_static("application/json")),
                (
                    HeaderName::from_static("x-hub-signature-256"),
                    HeaderValue::from_str(&signature).expect("hex is a valid header value"),
                ),
            ],
            body,
        }
    }

    /// Conversion number `index` (unique event id) for the user `phone_index`, who clicked an ad.
    pub fn conversion(&self, index: u64, phone_index: u64) -> Prepared {
        let phone = self.phone(phone_index);
        let run = self.run;
        let body = if index.is_multiple_of(2) {
            format!(
                r#"{{"accountId":"{account}","eventName":"Purchase","eventId":"bench-{run:08x}-{index}","phoneE164":"{phone}","value":49.9,"currency":"USD","contentIds":["sku-{sku}"],"email":"buyer{index}@example.com"}}"#,
                account = self.account_id,
                sku = index % 100,
            )
        } else {
            format!(
                r#"{{"accountId":"{account}","eventName":"LeadSubmitted","eventId":"bench-{run:08x}-{index}","phoneE164":"{phone}","externalId":"crm-{index}"}}"#,
                account = self.account_id,
            )
        };
        Prepared {
            method: Method::POST,
            path: "/v1/whatsapp/conversions".to_string(),
            headers: vec![
                (CONTENT_TYPE, HeaderValue::from_static("application/json")),
                (AUTHORIZATION, self.admin_auth()),
            ],
            body: Bytes::from(body),
        }
    }

    /// `GET /v1/whatsapp/attribution?phone=` for the user `phone_index`.
    pub fn lookup(&self, phone_index: u64) -> Prepared {
        Prepared {
            method: Method::GET,
            path: format!("/v1/whatsapp/attribution?phone={}", self.phone(phone_index)),
            headers: vec![(AUTHORIZATION, self.admin_auth())],
            body: Bytes::new(),
        }
    }
}

/// What the Graph stand-in is sent directly, to measure its own latency: a conversion as the
/// server writes it.
pub fn graph_event(index: u64) -> Prepared {
    let body = format!(
        r#"{{"data":[{{"event_name":"Purchase","event_time":{time},"event_id":"bench-direct-{index}","action_source":"business_messaging","messaging_channel":"whatsapp","user_data":{{"ctwa_clid":"Aff-bench-direct","whatsapp_business_account_id":"102290129340398"}},"custom_data":{{"value":49.9,"currency":"USD"}}}}]}}"#,
        time = now_unix()
    );
    Prepared {
        method: Method::POST,
        path: format!("/{GRAPH_VERSION}/{DATASET_ID}/events"),
        headers: vec![
            (CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (
                AUTHORIZATION,
                HeaderValue::from_static("Bearer bench-token"),
            ),
        ],
        body: Bytes::from(body),
    }
}
