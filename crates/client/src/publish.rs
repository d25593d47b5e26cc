//! Durable publish/subscribe: [`Message`] and [`Client::publish`].

use serde::Serialize;
use serde_json::Value;
use warren_core::topology::{QueueSpec, TOPIC_EXCHANGE};
use warren_core::{Envelope, Outgoing, Target, Via};

use crate::args::Invalid;
use crate::{Client, Error, Receipt};

/// A message to publish to a topic: its payload and options. Build with [`Message::new`],
/// then pass to [`Client::publish`]. Building never fails: a payload that does not
/// serialize is returned by `publish`, before anything is sent.
///
/// ```
/// use warren_client::Message;
/// let msg = Message::new("orders.created", &serde_json::json!({"order": 42})).with_cid("order-42");
/// assert_eq!(msg.topic(), "orders.created");
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Message {
    invalid: Invalid,
    topic: String,
    payload: Value,
    cid: Option<String>,
    parent: Option<uuid::Uuid>,
}

impl Message {
    /// A message for `topic` with a JSON payload.
    pub fn new(topic: impl Into<String>, payload: &impl Serialize) -> Self {
        let mut invalid = Invalid::default();
        let payload = invalid.json(payload);
        Self {
            invalid,
            topic: topic.into(),
            payload,
            cid: None,
            parent: None,
        }
    }

    /// Uses the caller's correlation id (the caller owns its uniqueness); by default a
    /// fresh one is generated.
    pub fn with_cid(mut self, cid: impl Into<String>) -> Self {
        self.cid = Some(cid.into());
        self
    }

    /// Records the task that caused the message, so a subscriber's `ctx.parent()` names
    /// the publisher (handler contexts set it to their own task).
    pub fn with_parent(mut self, parent: uuid::Uuid) -> Self {
        self.parent = Some(parent);
        self
    }

    /// Uses `cid` unless the message already has one (handler contexts pass their own).
    pub fn inherit_cid(mut self, cid: &str) -> Self {
        self.cid.get_or_insert_with(|| cid.to_owned());
        self
    }

    /// The topic.
    #[must_use]
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl Client {
    /// Publishes `msg` to its topic and returns once the broker has confirmed it. Every
    /// method that subscribes to the topic (`Service::subscribe`) gets the message through
    /// its own durable queue, also when its workers are down or the broker restarts before
    /// they run; messages published before a subscriber's first start are not delivered to
    /// it.
    ///
    /// ```no_run
    /// # async fn demo(client: warren_client::Client) -> Result<(), warren_client::Error> {
    /// use warren_client::Message;
    /// let receipt = client.publish(Message::new("orders.created", &serde_json::json!({"order": 42}))).await?;
    /// println!("published as {} (cid {})", receipt.id, receipt.cid);
    /// # Ok(()) }
    /// ```
    ///
    /// Errors: an invalid topic, cid or payload before anything is sent; broker errors.
    pub async fn publish(&self, msg: Message) -> Result<Receipt, Error> {
        msg.invalid.check()?;
        let Message {
            topic,
            payload,
            cid,
            parent,
            ..
        } = msg;
        let topic = topic.as_str();
        if let Some(c) = &cid {
            crate::task::check_cid(c)?;
        }
        let recent = QueueSpec::recent(topic)?;
        let target = Target::new("topic", topic)?;
        let mut env = Envelope::new(&target, payload, cid);
        env.channel = Via::Publish;
        env.topic = Some(topic.to_owned());
        env.parent = parent;
        let body = env.to_bytes().map_err(|e| Error::Encode(e.into()))?;
        let mut msg = Outgoing::new(TOPIC_EXCHANGE, topic, body);
        msg.message_id = Some(warren_core::envelope::id_string(&env.id));
        msg.correlation_id = Some(env.cid.clone());
        // The topic's recent-messages queue makes it routable before anyone subscribes.
        let key = format!("topic:{topic}");
        self.sender()
            .publisher()
            .publish_routed(
                &msg,
                &key,
                &|| Ok(vec![recent.clone()]),
                self.publish_deadline(),
            )
            .await?;
        if let Some(r) = self.recorder() {
            r.bump(&format!("published:{topic}")).await;
        }
        tracing::debug!(id = %env.id, cid = %env.cid, topic, "published");
        Ok(Receipt {
            id: env.id,
            cid: env.cid,
        })
    }
}
