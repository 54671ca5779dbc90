//! Logging through tracing: readable text on a terminal, JSON lines when asked. Every line of
//! a running node carries its region and node through the `node` span.

use std::io::IsTerminal;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The filter when `RUST_LOG` is not set. automerge instruments its change and column parsers
/// with INFO spans (`#[tracing::instrument]`): at `info` every received change opened several
/// spans, ~3 % of a catch-up's CPU in a profile, for nothing an operator reads.
pub const DEFAULT_FILTER: &str = "info,automerge=warn";

/// Install the global subscriber. `RUST_LOG` overrides [`DEFAULT_FILTER`].
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    // A log line that cannot be written (stderr on a full disk) is dropped. By default the
    // subscriber reports that with `eprintln!`, which panics when stderr fails, and so took
    // the writer thread down with it on a full disk.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    // A second init (tests) keeps the first subscriber: ignoring the error is correct.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::DEFAULT_FILTER;
    use tracing::Level;
    use tracing::level_filters::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn the_default_filter_parses_and_keeps_automerge_spans_out() {
        let filter = tracing_subscriber::EnvFilter::try_new(DEFAULT_FILTER).expect("parses");
        assert_eq!(filter.max_level_hint(), Some(LevelFilter::INFO));
        let subscriber = tracing_subscriber::registry().with(filter);
        tracing::subscriber::with_default(subscriber, || {
            // A callsite's target is its module path: what automerge's instrumented parsers use.
            assert!(!tracing::enabled!(target: "automerge::storage::columns", Level::INFO));
            assert!(tracing::enabled!(target: "automerge::storage::columns", Level::WARN));
            assert!(tracing::enabled!(target: "meridian_node::replica", Level::INFO));
        });
    }
}
