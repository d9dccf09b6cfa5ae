//! A conversion's record and its transitions: queued, in flight, sent, failed, expired, or of
//! unknown outcome. The fields are private; every change goes through one method here, so the
//! record is built in one place and settled as undelivered in one place.
//!
//! The serde shape is the stored one: field names and `#[serde(default)]`s stay as they are so
//! existing stores keep reading.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::graph::{ErrorClass, EventsReceived, GraphError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversionStatus {
    /// Recorded and not delivered yet: being sent, or waiting in the outbox.
    Queued,
    Sent,
    Failed,
    /// Still undelivered when the event became older than Meta accepts.
    Expired,
    /// Meta may have taken it but never said so (its answer was lost twice, or could not be
    /// read): never sent again automatically; an operator checks Events Manager.
    Unknown,
}

impl ConversionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConversionStatus::Queued => "queued",
            ConversionStatus::Sent => "sent",
            ConversionStatus::Failed => "failed",
            ConversionStatus::Expired => "expired",
            ConversionStatus::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversionSource {
    Api,
    AutomaticEvent,
}

impl ConversionSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ConversionSource::Api => "api",
            ConversionSource::AutomaticEvent => "automatic_event",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversionFailure {
    pub code: String,
    pub message: String,
    pub meta_code: Option<i64>,
    pub meta_subcode: Option<i64>,
}

impl ConversionFailure {
    /// A failure of ours (no Meta error code).
    fn new(code: &str, message: &str) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            meta_code: None,
            meta_subcode: None,
        }
    }

    fn from_graph(error: &GraphError) -> Self {
        Self {
            code: error.code(),
            message: error.actionable_message(),
            meta_code: error.meta_code(),
            meta_subcode: error.meta_subcode(),
        }
    }
}

/// The delivery policy's numbers the transitions need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The outbox's first wait after a request ran out of budget; doubles with each outbox
    /// attempt.
    pub outbox_backoff_base: Duration,
    /// The cap of the outbox's wait.
    pub outbox_backoff_max: Duration,
    /// The guard before the one resend of an event whose outcome is unknown.
    pub unknown_resend_after: Duration,
}

impl RetryPolicy {
    /// The outbox's wait before its next attempt: the base after a request ran out of budget,
    /// doubling with each attempt the outbox itself made, capped.
    fn outbox_backoff(&self, outbox_attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(outbox_attempts.min(20));
        self.outbox_backoff_base
            .saturating_mul(factor)
            .min(self.outbox_backoff_max)
    }
}

/// What one attempt to deliver led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Meta took the event, refused it for good, or its outcome can no longer be learned: the
    /// record is final.
    Final,
    /// Meta did not take it; worth trying again later. The record stays queued.
    Transient,
    /// Meta may have it: the record waits for its one guarded resend.
    Unanswered,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversionRecord {
    account_id: String,
    event_name: String,
    event_id: String,
    conversation_id: String,
    event_time: i64,
    source: ConversionSource,
    dataset_id: String,
    /// The exact body sent to Meta (customer data only as hashes); the token is not in it.
    request_body: Value,
    status: ConversionStatus,
    /// Graph calls started for this record, by requests and the outbox.
    attempts: u32,
    /// Graph calls started by the outbox; its backoff doubles with these only.
    #[serde(default)]
    outbox_attempts: u32,
    /// Set (durably) just before a Graph call and cleared with its outcome: a record found with
    /// it set and its lease passed was cut off mid-send, so Meta may have it.
    #[serde(default)]
    in_flight_since_ms: Option<i64>,
    /// Attempts whose outcome stayed unknown (cut off, timed out, connection broken).
    #[serde(default)]
    unknown_outcomes: u32,
    /// Sent again after an attempt with an unknown outcome: Meta may count it twice.
    #[serde(default)]
    possible_duplicate: bool,
    created_at_ms: i64,
    updated_at_ms: i64,
    /// When the outbox may try next; while a request is sending, a lease past its budget.
    next_attempt_at_ms: Option<i64>,
    events_received: i64,
    events_failed: i64,
    trace_id: Option<String>,
    duration_ms: u64,
    error: Option<ConversionFailure>,
    warnings: Vec<String>,
}

/// A conversion as its source describes it, before any attempt.
pub struct NewConversion {
    pub account_id: String,
    pub event_name: String,
    pub event_id: String,
    pub conversation_id: String,
    pub event_time: i64,
    pub source: ConversionSource,
    pub dataset_id: String,
    pub request_body: Value,
    pub warnings: Vec<String>,
}

/// What [`ConversionRecord::begin`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// The record is to be stored as queued (continuing a failed or expired one with the same
    /// key); the caller sends it.
    Started(Box<ConversionRecord>),
    /// The same (account, event name, event id) is already sent, queued or of unknown outcome:
    /// nothing is sent.
    Existing(Box<ConversionRecord>),
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl ConversionRecord {
    /// A new queued record, due at once.
    pub fn queued(new: NewConversion, now_ms: i64) -> Self {
        Self {
            account_id: new.account_id,
            event_name: new.event_name,
            event_id: new.event_id,
            conversation_id: new.conversation_id,
            event_time: new.event_time,
            source: new.source,
            dataset_id: new.dataset_id,
            request_body: new.request_body,
            status: ConversionStatus::Queued,
            attempts: 0,
            outbox_attempts: 0,
            in_flight_since_ms: None,
            unknown_outcomes: 0,
            possible_duplicate: false,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            next_attempt_at_ms: Some(now_ms),
            events_received: 0,
            events_failed: 0,
            trace_id: None,
            duration_ms: 0,
            error: None,
            warnings: new.warnings,
        }
    }

    /// The deduplication rule, given the record already stored under the same (account, event
    /// name, event id): a sent, queued or unknown one wins and nothing is sent; a failed or
    /// expired one may be sent again, and this record continues it.
    pub fn begin(mut self, previous: Option<&ConversionRecord>) -> Begin {
        if let Some(previous) = previous {
            if matches!(
                previous.status,
                ConversionStatus::Sent | ConversionStatus::Queued | ConversionStatus::Unknown
            ) {
                return Begin::Existing(Box::new(previous.clone()));
            }
            self.continue_from(previous);
        }
        Begin::Started(Box::new(self))
    }

    /// A new try of an event whose earlier record failed or expired. Meta may still hold a copy
    /// from an earlier attempt whose outcome was unknown, so the attempts, that count and the
    /// `possibleDuplicate` flag carry over: the try is flagged, and one more unknown outcome
    /// makes it `unknown` at once.
    fn continue_from(&mut self, previous: &ConversionRecord) {
        self.attempts += previous.attempts;
        self.unknown_outcomes = previous.unknown_outcomes;
        self.possible_duplicate = previous.possible_duplicate || previous.unknown_outcomes > 0;
    }

    /// Marks the record's next Graph call in flight; the caller makes that durable before it
    /// sends. Until `lease` has passed, the outbox leaves the record alone.
    pub fn start_attempt(&mut self, now_ms: i64, lease: Duration, outbox: bool) {
        self.attempts += 1;
        if outbox {
            self.outbox_attempts += 1;
        }
        if self.unknown_outcomes > 0 {
            self.possible_duplicate = true;
        }
        self.in_flight_since_ms = Some(now_ms);
        self.updated_at_ms = now_ms;
        self.next_attempt_at_ms = Some(now_ms.saturating_add(millis(lease)));
    }

    /// Applies the answer of one Graph call (status, counts, error, trace id, the next outbox
    /// time).
    pub fn apply_answer(
        &mut self,
        answer: Result<EventsReceived, GraphError>,
        now_ms: i64,
        policy: &RetryPolicy,
    ) -> Attempt {
        self.in_flight_since_ms = None;
        self.updated_at_ms = now_ms;
        let error = match answer {
            Ok(received) if received.events_received >= 1 => {
                self.status = ConversionStatus::Sent;
                self.events_received = received.events_received;
                self.events_failed = 0;
                self.trace_id = received.fbtrace_id;
                self.error = None;
                self.next_attempt_at_ms = None;
                return Attempt::Final;
            }
            Ok(received) => {
                self.trace_id = received.fbtrace_id;
                self.fail(
                    ConversionStatus::Failed,
                    ConversionFailure::new(
                        "events_received_zero",
                        "Meta answered success but counted no event (events_received: 0); check the dataset and the event in Events Manager",
                    ),
                    now_ms,
                );
                return Attempt::Final;
            }
            Err(error) => error,
        };
        self.trace_id = error.trace_id().or(self.trace_id.take());
        let failure = ConversionFailure::from_graph(&error);
        let settled = match error.class() {
            ErrorClass::Transient => {
                self.error = Some(failure);
                let backoff = policy.outbox_backoff(self.outbox_attempts);
                self.next_attempt_at_ms = Some(now_ms.saturating_add(millis(backoff)));
                return Attempt::Transient;
            }
            ErrorClass::Unanswered => {
                self.error = Some(failure);
                return self.outcome_unknown(now_ms, policy);
            }
            ErrorClass::Permanent => ConversionStatus::Failed,
            ErrorClass::Unreadable => ConversionStatus::Unknown,
        };
        self.fail(settled, failure, now_ms);
        Attempt::Final
    }

    /// An attempt whose outcome is unknown. The first one is followed by a single resend, no
    /// earlier than the guard interval, flagged `possibleDuplicate`; after a second, the record
    /// is held as `unknown` and never sent again automatically.
    pub fn outcome_unknown(&mut self, now_ms: i64, policy: &RetryPolicy) -> Attempt {
        self.in_flight_since_ms = None;
        self.updated_at_ms = now_ms;
        self.unknown_outcomes += 1;
        if self.unknown_outcomes == 1 {
            self.status = ConversionStatus::Queued;
            self.next_attempt_at_ms =
                Some(now_ms.saturating_add(millis(policy.unknown_resend_after)));
            return Attempt::Unanswered;
        }
        let Some(mut error) = self.error.take() else {
            self.settle_undelivered(ConversionStatus::Unknown, now_ms);
            return Attempt::Final;
        };
        error.message = format!(
            "Meta's answer was lost twice ({}); the event is not sent again automatically. Check Events Manager, and send it with a new eventId only if it is missing there",
            error.code
        );
        self.fail(ConversionStatus::Unknown, error, now_ms);
        Attempt::Final
    }

    /// Still undelivered once Meta would no longer accept it.
    pub fn expire(&mut self, now_ms: i64) {
        let failure = ConversionFailure {
            meta_code: self.error.as_ref().and_then(|error| error.meta_code),
            ..ConversionFailure::new(
                "expired",
                "the event stayed undeliverable until it was older than the 7 days Meta accepts",
            )
        };
        self.fail(ConversionStatus::Expired, failure, now_ms);
    }

    /// Found in flight once its lease passed: the process that sent it stopped before it could
    /// store Meta's answer, so Meta may have the event.
    pub fn interrupted(&mut self, now_ms: i64, policy: &RetryPolicy) -> Attempt {
        self.error = Some(ConversionFailure::new(
            "send_interrupted",
            "ctwa-relay stopped while sending this event, so Meta may have it; it is sent once more after a guard interval and flagged possibleDuplicate",
        ));
        self.outcome_unknown(now_ms, policy)
    }

    /// The account was removed before the conversion could be delivered.
    pub fn account_gone(&mut self, now_ms: i64) {
        self.fail(
            ConversionStatus::Failed,
            ConversionFailure::new(
                "account_not_found",
                "the account was removed before the conversion could be delivered",
            ),
            now_ms,
        );
    }

    /// How long the request that recorded the conversion took, its retries included.
    pub fn set_duration(&mut self, elapsed: Duration) {
        self.duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    }

    /// The one "mark this conversion failed" block: a final status other than sent, one failed
    /// event, out of the outbox, with the reason.
    fn fail(&mut self, status: ConversionStatus, error: ConversionFailure, now_ms: i64) {
        self.settle_undelivered(status, now_ms);
        self.error = Some(error);
    }

    fn settle_undelivered(&mut self, status: ConversionStatus, now_ms: i64) {
        debug_assert!(!matches!(
            status,
            ConversionStatus::Queued | ConversionStatus::Sent
        ));
        self.status = status;
        self.in_flight_since_ms = None;
        self.updated_at_ms = now_ms;
        self.next_attempt_at_ms = None;
        self.events_received = 0;
        self.events_failed = 1;
    }

    pub fn account_id(&self) -> &str {
        &self.account_id
    }

    pub fn event_name(&self) -> &str {
        &self.event_name
    }

    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    pub fn conversation_id(&self) -> &str {
        &self.conversation_id
    }

    /// The event's time, unix seconds.
    pub fn event_time(&self) -> i64 {
        self.event_time
    }

    pub fn source(&self) -> ConversionSource {
        self.source
    }

    pub fn dataset_id(&self) -> &str {
        &self.dataset_id
    }

    pub fn request_body(&self) -> &Value {
        &self.request_body
    }

    pub fn status(&self) -> ConversionStatus {
        self.status
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Attempts whose outcome stayed unknown; a send after one may duplicate the event.
    pub fn unknown_outcomes(&self) -> u32 {
        self.unknown_outcomes
    }

    pub fn possible_duplicate(&self) -> bool {
        self.possible_duplicate
    }

    /// Marked in flight and not settled since: `Some(when the attempt started)`.
    pub fn in_flight_since_ms(&self) -> Option<i64> {
        self.in_flight_since_ms
    }

    pub fn created_at_ms(&self) -> i64 {
        self.created_at_ms
    }

    pub fn next_attempt_at_ms(&self) -> Option<i64> {
        self.next_attempt_at_ms
    }

    pub fn events_received(&self) -> i64 {
        self.events_received
    }

    pub fn events_failed(&self) -> i64 {
        self.events_failed
    }

    pub fn trace_id(&self) -> Option<&str> {
        self.trace_id.as_deref()
    }

    pub fn duration_ms(&self) -> u64 {
        self.duration_ms
    }

    pub fn error(&self) -> Option<&ConversionFailure> {
        self.error.as_ref()
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::MetaError;

    const NOW: i64 = 1_750_000_000_000;

    const POLICY: RetryPolicy = RetryPolicy {
        outbox_backoff_base: Duration::from_millis(100),
        outbox_backoff_max: Duration::from_millis(1_000),
        unknown_resend_after: Duration::from_millis(600),
    };

    fn new_record() -> ConversionRecord {
        ConversionRecord::queued(
            NewConversion {
                account_id: "acc".into(),
                event_name: "LeadSubmitted".into(),
                event_id: "e1".into(),
                conversation_id: "conv".into(),
                event_time: NOW / 1000 - 60,
                source: ConversionSource::Api,
                dataset_id: "ds".into(),
                request_body: serde_json::json!({"data": []}),
                warnings: vec!["outside_attribution_window".into()],
            },
            NOW,
        )
    }

    fn received(events_received: i64, trace: &str) -> Result<EventsReceived, GraphError> {
        Ok(EventsReceived {
            events_received,
            messages: Vec::new(),
            fbtrace_id: Some(trace.into()),
        })
    }

    fn meta_error(code: i64, subcode: Option<i64>) -> GraphError {
        GraphError::Meta {
            http_status: 400,
            error: Box::new(MetaError {
                message: "refused".into(),
                code,
                error_subcode: subcode,
                error_user_title: None,
                error_user_msg: None,
                fbtrace_id: Some(format!("TRACE-{code}")),
            }),
        }
    }

    fn timeout() -> Result<EventsReceived, GraphError> {
        Err(GraphError::Timeout(Duration::from_millis(300)))
    }

    /// A record as the request path leaves it before its first Graph call.
    fn in_flight() -> ConversionRecord {
        let mut record = new_record();
        record.start_attempt(NOW, Duration::from_secs(5), false);
        record
    }

    #[test]
    fn a_new_record_is_queued_and_due_at_once() {
        let record = new_record();
        assert_eq!(record.status(), ConversionStatus::Queued);
        assert_eq!(record.next_attempt_at_ms(), Some(NOW));
        assert_eq!(record.created_at_ms(), NOW);
        assert_eq!(record.attempts(), 0);
        assert_eq!(record.warnings(), ["outside_attribution_window"]);
    }

    #[test]
    fn an_attempt_is_marked_in_flight_with_a_lease() {
        let mut record = new_record();
        record.start_attempt(NOW, Duration::from_secs(5), true);
        assert_eq!(record.attempts(), 1);
        assert_eq!(record.outbox_attempts, 1);
        assert_eq!(record.in_flight_since_ms(), Some(NOW));
        assert_eq!(record.next_attempt_at_ms(), Some(NOW + 5_000));
        assert!(!record.possible_duplicate());
        record.start_attempt(NOW + 10, Duration::from_secs(5), false);
        assert_eq!((record.attempts(), record.outbox_attempts), (2, 1));
    }

    #[test]
    fn a_success_is_sent_and_final() {
        let mut record = in_flight();
        let attempt = record.apply_answer(received(1, "OK"), NOW + 50, &POLICY);
        assert_eq!(attempt, Attempt::Final);
        assert_eq!(record.status(), ConversionStatus::Sent);
        assert_eq!(record.events_received(), 1);
        assert_eq!(record.events_failed(), 0);
        assert_eq!(record.trace_id(), Some("OK"));
        assert_eq!(record.error(), None);
        assert_eq!(record.next_attempt_at_ms(), None);
        assert_eq!(record.in_flight_since_ms(), None);
    }

    #[test]
    fn zero_events_received_is_a_failure() {
        let mut record = in_flight();
        let attempt = record.apply_answer(received(0, "ZERO"), NOW + 50, &POLICY);
        assert_eq!(attempt, Attempt::Final);
        assert_eq!(record.status(), ConversionStatus::Failed);
        assert_eq!((record.events_received(), record.events_failed()), (0, 1));
        assert_eq!(record.trace_id(), Some("ZERO"));
        assert_eq!(record.error().unwrap().code, "events_received_zero");
        assert_eq!(record.next_attempt_at_ms(), None);
    }

    #[test]
    fn a_permanent_refusal_fails_with_meta_codes_and_trace() {
        let mut record = in_flight();
        let attempt = record.apply_answer(Err(meta_error(190, Some(463))), NOW + 50, &POLICY);
        assert_eq!(attempt, Attempt::Final);
        assert_eq!(record.status(), ConversionStatus::Failed);
        let error = record.error().unwrap();
        assert_eq!(error.code, "190");
        assert_eq!(
            (error.meta_code, error.meta_subcode),
            (Some(190), Some(463))
        );
        assert_eq!(record.trace_id(), Some("TRACE-190"));
        assert_eq!(record.events_failed(), 1);
        assert_eq!(record.next_attempt_at_ms(), None);
        assert_eq!(record.in_flight_since_ms(), None);
    }

    #[test]
    fn an_unreadable_success_is_unknown_and_final() {
        let mut record = in_flight();
        let answer = Err(GraphError::Malformed("truncated".into()));
        assert_eq!(
            record.apply_answer(answer, NOW + 50, &POLICY),
            Attempt::Final
        );
        assert_eq!(record.status(), ConversionStatus::Unknown);
        assert_eq!(record.error().unwrap().code, "malformed_response");
        assert_eq!(record.next_attempt_at_ms(), None);
    }

    #[test]
    fn a_transient_failure_stays_queued_with_the_outbox_backoff() {
        let mut record = in_flight();
        let attempt = record.apply_answer(Err(meta_error(4, None)), NOW + 50, &POLICY);
        assert_eq!(attempt, Attempt::Transient);
        assert_eq!(record.status(), ConversionStatus::Queued);
        assert_eq!(record.error().unwrap().code, "4");
        // Attempts made by a request do not grow the outbox's backoff: one base interval.
        assert_eq!(record.next_attempt_at_ms(), Some(NOW + 50 + 100));
        assert_eq!(record.in_flight_since_ms(), None);
        // Each outbox attempt doubles it, up to the cap.
        let mut at = NOW + 50;
        for expected in [200, 400, 800, 1_000, 1_000] {
            record.start_attempt(at, Duration::from_secs(5), true);
            record.apply_answer(Err(GraphError::Status { status: 503 }), at, &POLICY);
            assert_eq!(record.next_attempt_at_ms(), Some(at + expected));
            at += expected;
        }
    }

    #[test]
    fn a_lost_answer_is_resent_once_after_the_guard_then_held_as_unknown() {
        let mut record = in_flight();
        assert_eq!(
            record.apply_answer(timeout(), NOW + 300, &POLICY),
            Attempt::Unanswered
        );
        assert_eq!(record.status(), ConversionStatus::Queued);
        assert_eq!(record.next_attempt_at_ms(), Some(NOW + 300 + 600));
        assert_eq!(record.error().unwrap().code, "timeout");
        assert!(!record.possible_duplicate());
        // The guarded resend is flagged.
        record.start_attempt(NOW + 900, Duration::from_secs(5), true);
        assert!(record.possible_duplicate());
        assert_eq!(
            record.apply_answer(timeout(), NOW + 1_200, &POLICY),
            Attempt::Final
        );
        assert_eq!(record.status(), ConversionStatus::Unknown);
        assert_eq!(record.attempts(), 2);
        assert_eq!(record.events_failed(), 1);
        assert_eq!(record.next_attempt_at_ms(), None);
        let error = record.error().unwrap();
        assert_eq!(error.code, "timeout");
        assert!(
            error.message.contains("Events Manager"),
            "{}",
            error.message
        );
    }

    #[test]
    fn a_resend_that_succeeds_is_sent_and_stays_flagged() {
        let mut record = in_flight();
        record.apply_answer(timeout(), NOW + 300, &POLICY);
        record.start_attempt(NOW + 900, Duration::from_secs(5), true);
        record.apply_answer(received(1, "RESENT"), NOW + 950, &POLICY);
        assert_eq!(record.status(), ConversionStatus::Sent);
        assert!(record.possible_duplicate());
        assert_eq!(record.trace_id(), Some("RESENT"));
    }

    #[test]
    fn an_interrupted_send_is_an_unknown_outcome() {
        let mut record = in_flight();
        assert_eq!(
            record.interrupted(NOW + 10_000, &POLICY),
            Attempt::Unanswered
        );
        assert_eq!(record.status(), ConversionStatus::Queued);
        assert_eq!(record.in_flight_since_ms(), None);
        assert_eq!(record.error().unwrap().code, "send_interrupted");
        assert_eq!(record.next_attempt_at_ms(), Some(NOW + 10_000 + 600));
        // Cut off again: held as unknown.
        record.start_attempt(NOW + 11_000, Duration::from_secs(5), true);
        assert_eq!(record.interrupted(NOW + 20_000, &POLICY), Attempt::Final);
        assert_eq!(record.status(), ConversionStatus::Unknown);
        assert!(record.error().unwrap().message.contains("lost twice"));
    }

    #[test]
    fn an_expired_record_keeps_metas_code_and_leaves_the_outbox() {
        let mut record = in_flight();
        record.apply_answer(Err(meta_error(613, None)), NOW, &POLICY);
        record.expire(NOW + 1);
        assert_eq!(record.status(), ConversionStatus::Expired);
        let error = record.error().unwrap();
        assert_eq!(error.code, "expired");
        assert_eq!(error.meta_code, Some(613));
        assert_eq!(error.meta_subcode, None);
        assert_eq!(record.events_failed(), 1);
        assert_eq!(record.next_attempt_at_ms(), None);
    }

    #[test]
    fn a_record_whose_account_is_gone_fails() {
        let mut record = new_record();
        record.account_gone(NOW + 1);
        assert_eq!(record.status(), ConversionStatus::Failed);
        assert_eq!(record.error().unwrap().code, "account_not_found");
        assert_eq!(record.events_failed(), 1);
        assert_eq!(record.next_attempt_at_ms(), None);
    }

    #[test]
    fn a_sent_queued_or_unknown_record_wins_over_a_repeat() {
        let mut sent = in_flight();
        sent.apply_answer(received(1, "OK"), NOW, &POLICY);
        let mut unknown = in_flight();
        unknown.apply_answer(Err(GraphError::Malformed("x".into())), NOW, &POLICY);
        for previous in [sent, in_flight(), unknown] {
            match in_flight().begin(Some(&previous)) {
                Begin::Existing(existing) => assert_eq!(*existing, previous),
                Begin::Started(_) => panic!("{:?} was started again", previous.status()),
            }
        }
        assert_eq!(
            in_flight().begin(None),
            Begin::Started(Box::new(in_flight()))
        );
    }

    #[test]
    fn a_retry_of_a_failed_record_carries_over_attempts_and_the_unknown_budget() {
        // The first answer was lost, the guarded resend refused.
        let mut previous = in_flight();
        previous.apply_answer(timeout(), NOW, &POLICY);
        previous.start_attempt(NOW + 600, Duration::from_secs(5), true);
        previous.apply_answer(received(0, "ZERO"), NOW + 700, &POLICY);
        assert_eq!(previous.status(), ConversionStatus::Failed);
        let Begin::Started(mut retry) = in_flight().begin(Some(&previous)) else {
            panic!("a failed record may be sent again");
        };
        assert_eq!(retry.attempts(), 3);
        assert!(retry.possible_duplicate());
        assert_eq!(retry.unknown_outcomes(), 1);
        // One more lost answer makes it unknown at once.
        assert_eq!(
            retry.apply_answer(timeout(), NOW + 900, &POLICY),
            Attempt::Final
        );
        assert_eq!(retry.status(), ConversionStatus::Unknown);

        let mut expired = in_flight();
        expired.expire(NOW);
        let Begin::Started(retry) = new_record().begin(Some(&expired)) else {
            panic!("an expired record may be sent again");
        };
        assert_eq!(retry.attempts(), 1);
        assert!(!retry.possible_duplicate());
    }

    /// The stored shape: the same field names as before the fields became private, and a record
    /// written before the later fields existed still reads.
    #[test]
    fn the_stored_shape_is_unchanged() {
        let value = serde_json::to_value(new_record()).unwrap();
        let names: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "account_id",
            "event_name",
            "event_id",
            "conversation_id",
            "event_time",
            "source",
            "dataset_id",
            "request_body",
            "status",
            "attempts",
            "outbox_attempts",
            "in_flight_since_ms",
            "unknown_outcomes",
            "possible_duplicate",
            "created_at_ms",
            "updated_at_ms",
            "next_attempt_at_ms",
            "events_received",
            "events_failed",
            "trace_id",
            "duration_ms",
            "error",
            "warnings",
        ];
        let mut names = names;
        names.sort_unstable();
        expected.sort_unstable();
        assert_eq!(names, expected);
        assert_eq!(value["status"], "queued");
        assert_eq!(value["source"], "api");

        let old = serde_json::json!({
            "account_id": "acc", "event_name": "Purchase", "event_id": "e1",
            "conversation_id": "conv", "event_time": 1, "source": "automatic_event",
            "dataset_id": "ds", "request_body": {}, "status": "sent", "attempts": 1,
            "created_at_ms": 2, "updated_at_ms": 3, "next_attempt_at_ms": null,
            "events_received": 1, "events_failed": 0, "trace_id": "T", "duration_ms": 4,
            "error": null, "warnings": []
        });
        let record: ConversionRecord = serde_json::from_value(old).unwrap();
        assert_eq!(record.status(), ConversionStatus::Sent);
        assert_eq!(record.source(), ConversionSource::AutomaticEvent);
        assert_eq!(
            (record.unknown_outcomes(), record.possible_duplicate()),
            (0, false)
        );
    }
}
