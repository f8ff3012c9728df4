//! One tracing set-up for every binary: `RUST_LOG` filters (default `info`),
//! `ORRERY_LOG_JSON=1` switches to JSON lines. Spans carry `run_id`, `step`,
//! `queue` and `workflow`. Colours only when standard error is a terminal:
//! a log file or a journal gets plain text.

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,sqlx=warn,apalis=warn,apalis_core=warn,apalis_redis=warn")
    });
    let json = std::env::var("ORRERY_LOG_JSON").is_ok_and(|v| v == "1" || v == "true");
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.compact().try_init()
    };
}
