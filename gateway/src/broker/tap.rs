//! The tap: what local MQTT clients publish on the sinks' topic filters, taken in for the cloud.

use std::sync::Arc;

use tracing::{debug, warn};

use super::{EmbeddedBroker, TOPIC_PREFIX};

/// Most distinct local topics taken in for the cloud sinks. Each costs a tag key and a dictionary
/// entry for the life of the process, so a client publishing on ever-new topics must not grow them
/// without bound.
pub const MAX_EXTERNAL_TOPICS: usize = 10_000;

impl EmbeddedBroker {
    /// Subscribes to `filters` on the local broker and feeds what local MQTT clients publish there
    /// to the cloud sinks, as verbatim messages. Only what local clients published is taken in: the
    /// gateway's own `updraft/…` topics and every topic the gateway publishes (plugin outputs under
    /// any template) are skipped, because their points reach the sinks directly, and so are topics
    /// starting with `skip_prefixes` (the sinks' own output, when a sink publishes to this broker).
    pub fn spawn_tap(
        &mut self,
        filters: &[String],
        skip_prefixes: &[String],
        registry: Arc<crate::base::point::Registry>,
        tx: crate::hub::BusSender,
        dropped: Arc<crate::metrics::Counter>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let Some((mut link_tx, mut rx)) = self.tap.take() else { return };
        for f in filters {
            // `try_`: this runs on an async worker, where rumqttd's blocking calls must not.
            if let Err(e) = link_tx.try_subscribe(f.as_str()) {
                warn!(filter = %f, error = %e, "Cannot subscribe to a local topic for the cloud sinks.");
            }
        }
        let mut external = 0usize;
        let mut skip: Vec<String> = skip_prefixes.to_vec();
        skip.push(format!("{TOPIC_PREFIX}/"));
        tokio::spawn(async move {
            let _keep = link_tx;
            loop {
                let publish = tokio::select! {
                    n = rx.next() => match n {
                        Ok(Some(rumqttd::Notification::Forward(f))) => f.publish,
                        Ok(_) => continue,
                        Err(_) => break,
                    },
                    _ = cancel.cancelled() => break,
                };
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                if skip.iter().any(|p| topic.starts_with(p.as_str())) {
                    continue;
                }
                let key = match registry.get_topic(&topic) {
                    // A topic the gateway publishes itself (a plugin output, a device reading):
                    // its points already reach the sinks through the hub. Taking them in again
                    // would feed them back to the publisher, and so round for ever.
                    Some(k) if !k.external => continue,
                    Some(k) => k,
                    None if external >= MAX_EXTERNAL_TOPICS => {
                        dropped.inc();
                        if dropped.get() == 1 {
                            warn!(limit = MAX_EXTERNAL_TOPICS, %topic, "Too many distinct local topics for the cloud sinks; dropping messages on new ones.");
                        }
                        continue;
                    }
                    None => {
                        external += 1;
                        registry.intern_external(&topic)
                    }
                };
                let point = crate::base::point::Point::message(key, publish.payload, crate::base::point::now_ms());
                if tx.send(crate::hub::batch(vec![point])).await.is_err() {
                    break;
                }
            }
            debug!("Local topic tap stopped.");
        });
    }
}
