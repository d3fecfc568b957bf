//! Streamed replies of HTTP room reads, and the contract codes of a refused read.
//!
//! A read holds a copy of what it sends, up to a room's 64 MiB; the rate and turns that
//! bound how many are built at once are [`crate::admission::read_gate`]'s. The reply is
//! streamed: items are serialized 64 KiB at a time as the client takes them, and each
//! item's copy is freed once written, so a read never holds a second full copy as JSON
//! text (it took ~100-125 MB per 64 MiB room before). The reply holds its read's
//! [`Turn`] until its last chunk.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use serde_json::Value as Json;

use super::ApiError;
use crate::admission::read_gate::{ReadRefused, Turn};
use crate::protocol::codes::Code;

impl From<ReadRefused> for ApiError {
    fn from(refused: ReadRefused) -> ApiError {
        let code = match refused {
            ReadRefused::RateLimited { .. } => Code::RateLimited,
            ReadRefused::Busy { .. } => Code::Unavailable,
        };
        ApiError::new(code, refused.to_string())
    }
}

/// Bytes serialized per chunk of a streamed reply.
const CHUNK_BYTES: usize = 64 * 1024;

/// A JSON object whose one list is streamed: `head` (the object up to the list's `[`),
/// the items comma-separated, then `]}`.
pub struct StreamedJson {
    head: Option<Bytes>,
    items: Box<dyn Iterator<Item = Json>>,
    first: bool,
    /// Freed with the last chunk.
    turn: Option<Turn>,
}

impl StreamedJson {
    /// `head` must be a JSON object's text without its closing brace, ending in
    /// `"name":[` (see [`object_head`]).
    pub fn new(head: String, items: Box<dyn Iterator<Item = Json>>, turn: Turn) -> StreamedJson {
        StreamedJson {
            head: Some(Bytes::from(head)),
            items,
            first: true,
            turn: Some(turn),
        }
    }
}

/// The text of `fields` as an object, left open with `"list":[` at the end.
pub fn object_head(fields: &serde_json::Map<String, Json>, list: &str) -> String {
    let mut text = Json::Object(fields.clone()).to_string();
    text.pop(); // the closing brace, which `to_string` always writes last
    if !fields.is_empty() {
        text.push(',');
    }
    text.push_str(&Json::String(list.to_owned()).to_string());
    text.push_str(":[");
    text
}

/// The whole object [`StreamedJson`] would stream, built at once: `fields`, then `list`
/// holding `items` (for a reply that travels to another node in one piece).
pub fn collect(
    mut fields: serde_json::Map<String, Json>,
    list: &str,
    items: Box<dyn Iterator<Item = Json>>,
) -> Json {
    fields.insert(list.to_owned(), Json::Array(items.collect()));
    Json::Object(fields)
}

impl Stream for StreamedJson {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.turn.is_none() {
            return Poll::Ready(None);
        }
        let mut chunk = match self.head.take() {
            Some(head) => head.to_vec(),
            None => Vec::with_capacity(CHUNK_BYTES + 1024),
        };
        while chunk.len() < CHUNK_BYTES {
            let Some(item) = self.items.next() else {
                chunk.extend_from_slice(b"]}");
                // The reply is complete: free the turn now rather than when actix
                // drops the body.
                self.turn = None;
                break;
            };
            if !std::mem::take(&mut self.first) {
                chunk.push(b',');
            }
            // Writing a `serde_json::Value` into a Vec cannot fail: its keys are strings
            // and the writer is infallible.
            let _ = serde_json::to_writer(&mut chunk, &item);
        }
        Poll::Ready(Some(Ok(Bytes::from(chunk))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::read_gate::ReadGate;
    use crate::outbound::KillSwitch;
    use futures_util::StreamExt;
    use serde_json::json;
    use std::time::Duration;

    #[tokio::test]
    async fn a_streamed_reply_is_one_json_object_and_frees_its_turn() {
        let gate = ReadGate::new(10, 1, Duration::from_secs(60));
        let turn = gate
            .turn(KillSwitch::default())
            .await
            .expect("one turn is free");
        let mut fields = serde_json::Map::new();
        fields.insert("head".into(), json!(7));
        let items: Vec<Json> = (0..20_000).map(|i| json!({ "seq": i })).collect();
        let body = StreamedJson::new(
            object_head(&fields, "events"),
            Box::new(items.into_iter()),
            turn,
        );
        let chunks: Vec<Bytes> = body.map(|c| c.expect("infallible")).collect().await;
        assert!(chunks.len() > 1, "20,000 items take more than one chunk");
        let text: Vec<u8> = chunks.concat();
        let value: Json = serde_json::from_slice(&text).expect("valid JSON");
        assert_eq!(value["head"], 7);
        assert_eq!(value["events"].as_array().map(Vec::len), Some(20_000));
        assert_eq!(value["events"][19_999]["seq"], 19_999);
        gate.turn(KillSwitch::default())
            .await
            .expect("the finished reply gave its turn back");
    }

    #[test]
    fn an_empty_list_is_still_an_object() {
        let head = object_head(&serde_json::Map::new(), "entries");
        assert_eq!(head, r#"{"entries":["#);
    }
}
