//! A streamed reply as server-sent events, framed as OpenAI frames it: the role alone in the
//! first chunk, then content deltas, then a chunk with the `finish_reason`, then (with
//! `include_usage`) one chunk with no choices and the usage, then `data: [DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::ApiError;
use crate::scheduler::Event;
use crate::wire::{Delta, StreamHead};

struct Stream {
    events: UnboundedReceiver<Event>,
    head: StreamHead,
    frames: VecDeque<Bytes>,
    ended: bool,
}

fn frame(value: &impl Serialize) -> Bytes {
    let json = serde_json::to_string(value).unwrap_or_default();
    Bytes::from(format!("data: {json}\n\n"))
}

impl Stream {
    /// Turns the next event into frames; marks the end.
    fn push(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Text(text)) => self.frames.push_back(frame(&self.head.chunk(
                Delta {
                    role: None,
                    content: Some(text),
                },
                None,
            ))),
            Some(Event::Done { finish, usage, .. }) => {
                self.frames
                    .push_back(frame(&self.head.chunk(Delta::default(), Some(finish))));
                if self.head.include_usage {
                    self.frames.push_back(frame(&self.head.usage_chunk(usage)));
                }
                self.frames
                    .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                self.ended = true;
            }
            // Headers are sent: an error half-way is an event of its own, as llama.cpp and
            // OpenAI send it; the official clients raise it.
            Some(Event::Failed(e)) => {
                self.frames.push_back(error_frame(&e));
                self.ended = true;
            }
            None => {
                self.frames
                    .push_back(error_frame(&ApiError::internal("the model thread stopped")));
                self.ended = true;
            }
            Some(Event::Accepted { .. }) => {}
        }
    }
}

fn error_frame(e: &ApiError) -> Bytes {
    #[derive(Serialize)]
    struct Body<'a> {
        error: crate::error::Detail<'a>,
    }
    frame(&Body { error: e.detail() })
}

/// The streaming response for a request the model thread has accepted.
pub fn response(head: StreamHead, events: UnboundedReceiver<Event>) -> Response {
    let first = frame(&head.chunk(
        Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        },
        None,
    ));
    let state = Stream {
        events,
        head,
        frames: VecDeque::from([first]),
        ended: false,
    };
    let body = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(bytes) = s.frames.pop_front() {
                return Some((Ok::<_, Infallible>(bytes), s));
            }
            if s.ended {
                return None;
            }
            let event = s.events.recv().await;
            s.push(event);
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
