//! `GET /v1/tasks/{id}/events`: the task pushed as server-sent events.
//!
//! Each event (`event: task`) carries the whole task view, sent when its
//! state, current step, progress or attempts change; the stream ends after
//! the event that shows the task finished. The engine writes transitions to
//! PostgreSQL only, so the stream reads the task every 250 ms (one indexed
//! query) while a client listens; it holds no lock and no connection between
//! reads. Keep-alive comments flow every 15 s.

use std::{convert::Infallible, time::Duration};

use axum::{
    extract::{Path, State},
    response::sse::{Event, KeepAlive, Sse},
};
use futures::Stream;

use crate::{
    app::AppState,
    auth::Caller,
    error::ApiResult,
    extract::parse_id,
    tasks::{self, TaskView},
};

const POLL: Duration = Duration::from_millis(250);

/// What makes a change worth an event.
fn fingerprint(t: &TaskView) -> String {
    let attempts: i32 = t.steps.iter().map(|s| s.attempts).sum();
    let cb: i32 = t.callbacks.iter().map(|c| c.attempts).sum();
    format!(
        "{}|{:?}|{}|{attempts}|{cb}",
        t.state, t.current_step, t.progress.done
    )
}

fn finished(t: &TaskView) -> bool {
    matches!(t.state.as_str(), "succeeded" | "failed" | "cancelled")
}

pub async fn handler(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let id = parse_id(&id, "task")?;
    let first = tasks::load(&state.0, &caller, id).await?;
    struct S {
        state: AppState,
        caller: Caller,
        last: Option<String>,
        next: Option<TaskView>,
        seq: u64,
        done: bool,
    }
    let init = S {
        state,
        caller,
        last: None,
        next: Some(first),
        seq: 0,
        done: false,
    };
    let stream = futures::stream::unfold(init, move |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            let view = match s.next.take() {
                Some(v) => v,
                None => {
                    tokio::time::sleep(POLL).await;
                    match tasks::load(&s.state.0, &s.caller, id).await {
                        Ok(v) => v,
                        // Gone (purged) or the database is unreachable: end the stream;
                        // the client reconnects or polls.
                        Err(_) => return None,
                    }
                }
            };
            let fp = fingerprint(&view);
            if s.last.as_ref() == Some(&fp) {
                continue;
            }
            s.last = Some(fp);
            s.seq += 1;
            s.done = finished(&view);
            let event = Event::default()
                .event("task")
                .id(s.seq.to_string())
                .json_data(&view)
                .unwrap_or_else(|_| Event::default().comment("unserialisable task"));
            return Some((Ok(event), s));
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
