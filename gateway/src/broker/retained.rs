//! The gateway's retained values on the local bus, answered from the hub's current values.
//!
//! Every tag's last point is already kept by the hub (`CurrentValues`), so the broker does not keep
//! a second copy: when a client subscribes, the router asks this source for the retained messages
//! matching its filter and they are rendered then. Points therefore cost the broker nothing while
//! nobody subscribes to them (the publisher asks the router's `FilterWatch` first), which is most
//! of a gateway's life: issue 13 measured 3–4 µs per point for publishing every point retained.

use std::sync::Arc;

use bytes::Bytes;
use rumqttd::protocol::{matches, Publish};

use crate::base::point::Point;
use crate::hub::CurrentValues;

/// Serves the retained messages of the gateway's own topics.
pub struct Retained {
    pub values: Arc<CurrentValues>,
}

/// Whether a point is state the broker keeps retained: device and plugin points are; a plugin's
/// verbatim message is an event, and a local client's message is the broker's own.
fn is_retained(p: &Point) -> bool {
    !p.key.external && p.payload.is_none()
}

impl rumqttd::RetainedSource for Retained {
    fn retained(&self, filter: &str, out: &mut Vec<Publish>) {
        let mut json = Vec::with_capacity(128);
        self.values.visit(|p| {
            if !is_retained(p) {
                return;
            }
            let Ok(topic) = std::str::from_utf8(&p.key.topic) else { return };
            if !matches(topic, filter) {
                return;
            }
            json.clear();
            p.write_json(&mut json);
            out.push(Publish::new(p.key.topic.clone(), Bytes::copy_from_slice(&json), true));
        });
    }
}
