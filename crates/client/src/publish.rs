//! Durable publish/subscribe: [`Client::publish`].

use serde::Serialize;
use warren_core::topology::{QueueSpec, TOPIC_EXCHANGE};
use warren_core::{Envelope, Outgoing, Target, Via};

use crate::{Client, Error, Receipt};

impl Client {
    /// Publishes `payload` to `topic` and returns once the broker has confirmed it. Every
    /// method that subscribes to the topic (`Service::subscribe`) gets the message through
    /// its own durable queue, also when its workers are down or the broker restarts before
    /// they run; messages published before a subscriber's first start are not delivered to
    /// it. A fresh cid is generated; see [`Client::publish_with_cid`].
    ///
    /// ```no_run
    /// # async fn demo(client: warren_client::Client) -> Result<(), warren_client::Error> {
    /// let receipt = client.publish("orders.created", &serde_json::json!({"order": 42})).await?;
    /// println!("published as {} (cid {})", receipt.id, receipt.cid);
    /// # Ok(()) }
    /// ```
    pub async fn publish(&self, topic: &str, payload: &impl Serialize) -> Result<Receipt, Error> {
        self.publish_message(topic, payload, None, None).await
    }

    /// Like [`Client::publish`], with the caller's cid (the caller owns its uniqueness).
    pub async fn publish_with_cid(
        &self,
        topic: &str,
        payload: &impl Serialize,
        cid: impl Into<String>,
    ) -> Result<Receipt, Error> {
        self.publish_message(topic, payload, Some(cid.into()), None)
            .await
    }

    /// Publishes to `topic` with an optional cid (else a fresh one) and the task that caused
    /// the message (`parent`; handler contexts pass their own task id, so a subscriber's
    /// `ctx.parent()` names the publisher).
    pub async fn publish_message(
        &self,
        topic: &str,
        payload: &impl Serialize,
        cid: Option<String>,
        parent: Option<uuid::Uuid>,
    ) -> Result<Receipt, Error> {
        if let Some(c) = &cid {
            crate::task::check_cid(c)?;
        }
        let recent = QueueSpec::recent(topic)?;
        let target = Target::new("topic", topic)?;
        let payload = serde_json::to_value(payload).map_err(Error::Encode)?;
        let mut env = Envelope::new(&target, payload, cid);
        env.channel = Via::Publish;
        env.topic = Some(topic.to_owned());
        env.parent = parent;
        let body = env.to_bytes().map_err(Error::Encode)?;
        let mut msg = Outgoing::new(TOPIC_EXCHANGE, topic, body);
        msg.message_id = Some(env.id.to_string());
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
