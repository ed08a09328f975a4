//! containerd's event stream: task exits and OOM kills, so container state
//! follows the tasks without polling.

use containerd_client::events::{TaskExit, TaskOom};
use containerd_client::services::v1::{
    events_client::EventsClient, PublishRequest, SubscribeRequest,
};
use containerd_client::types::Envelope;
use prost::Message;
use std::time::Duration;
use tonic::Streaming;

use super::Containerd;
use crate::{Error, Result};

/// A subscription to containerd events.
pub type EventStream = Streaming<Envelope>;

/// Topic of the marker event that proves a subscription is live.
const MARKER_TOPIC: &str = "/imacri/monitor-ready";

#[derive(Debug, Clone, PartialEq)]
pub enum TaskEvent {
    /// A process exited: the init process when `exec_id == container_id`.
    Exit {
        container_id: String,
        exec_id: String,
        exit_status: u32,
        exited_at: i64,
    },
    Oom {
        container_id: String,
    },
}

/// Decodes an envelope by its type URL (containerd's URLs have no `/`, so
/// `Any::to_msg` does not apply).
pub fn decode(env: &Envelope) -> Option<TaskEvent> {
    let any = env.event.as_ref()?;
    let ty = any.type_url.rsplit('/').next().unwrap_or(&any.type_url);
    match ty {
        "containerd.events.TaskExit" => {
            let e = TaskExit::decode(any.value.as_slice()).ok()?;
            Some(TaskEvent::Exit {
                container_id: e.container_id,
                exec_id: e.id,
                exit_status: e.exit_status,
                exited_at: e
                    .exited_at
                    .filter(|t| t.seconds > 0)
                    .and_then(|t| {
                        t.seconds
                            .checked_mul(1_000_000_000)?
                            .checked_add(i64::from(t.nanos))
                    })
                    .unwrap_or(0),
            })
        }
        "containerd.events.TaskOOM" => {
            let e = TaskOom::decode(any.value.as_slice()).ok()?;
            Some(TaskEvent::Oom {
                container_id: e.container_id,
            })
        }
        _ => None,
    }
}

impl Containerd {
    /// Subscribes to task events of our namespace. containerd answers a
    /// subscription only when the first event arrives, so a marker event is
    /// published until the subscription returns: when this returns, no later
    /// task event can be missed.
    pub async fn subscribe_tasks(&self) -> Result<Streaming<Envelope>> {
        let ns = self.namespace().to_string();
        let mut client = EventsClient::new(self.channel.clone());
        let req = SubscribeRequest {
            filters: vec![
                format!("namespace=={ns},topic~=\"^/tasks/\""),
                format!("namespace=={ns},topic==\"{MARKER_TOPIC}\""),
            ],
        };
        let mut sub = tokio::spawn(async move { client.subscribe(req).await });
        let mut publisher = EventsClient::new(self.channel.clone());
        for _ in 0..100 {
            let marker = PublishRequest {
                topic: MARKER_TOPIC.to_string(),
                event: Some(prost_types::Any {
                    type_url: "imacri.dev.MonitorReady".into(),
                    value: Vec::new(),
                }),
            };
            let _ = publisher.publish(self.req(marker)).await;
            tokio::select! {
                r = &mut sub => {
                    let stream = r
                        .map_err(|e| Error::Internal(format!("event subscription task: {e}")))?
                        .map_err(|e| Error::containerd("subscribing to events", e))?
                        .into_inner();
                    return Ok(stream);
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        sub.abort();
        Err(Error::Unavailable(
            "containerd did not answer the event subscription".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(type_url: &str, value: Vec<u8>) -> Envelope {
        Envelope {
            event: Some(prost_types::Any {
                type_url: type_url.into(),
                value,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn decodes_exits_and_ooms_by_url() {
        let exit = TaskExit {
            container_id: "c".into(),
            id: "c".into(),
            pid: 7,
            exit_status: 137,
            exited_at: Some(prost_types::Timestamp {
                seconds: 2,
                nanos: 5,
            }),
        };
        let e = decode(&envelope(
            "containerd.events.TaskExit",
            exit.encode_to_vec(),
        ))
        .unwrap();
        assert_eq!(
            e,
            TaskEvent::Exit {
                container_id: "c".into(),
                exec_id: "c".into(),
                exit_status: 137,
                exited_at: 2_000_000_005
            }
        );
        let oom = TaskOom {
            container_id: "c".into(),
        };
        assert_eq!(
            decode(&envelope("containerd.events.TaskOOM", oom.encode_to_vec())),
            Some(TaskEvent::Oom {
                container_id: "c".into()
            })
        );
        assert_eq!(
            decode(&envelope("containerd.events.TaskStart", vec![])),
            None
        );
    }
}
