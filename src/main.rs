//! The `ringcast` binary: configuration, logging, then the runtime.

use std::process::ExitCode;

use ringcast::config::{Config, ConfigError};

/// jemalloc rather than glibc's allocator: with 15,000 idle connections
/// glibc left 1.9 KB of resident memory per connection (half of it free
/// space fragmented between live objects), jemalloc 1.2 KB with the same
/// code (1.0 KB with the later per-connection savings); see
/// docs/benchmarks.md, idle memory. The `system-allocator` feature keeps
/// glibc's, for heap profilers (heaptrack, massif) that hook malloc.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // Before the configuration: --max-connections' default follows it.
    ringcast::runtime::raise_file_limit();
    let config = match Config::load() {
        Ok(c) => c,
        // clap prints usage errors, --help and --version and picks the exit code.
        Err(ConfigError::CommandLine(e)) => e.exit(),
        Err(ConfigError::Invalid(message)) => {
            eprintln!("ringcast: {message}");
            return ExitCode::from(2);
        }
    };
    // Validated with the configuration: the filter parses.
    let filter = tracing_subscriber::EnvFilter::try_new(config.log_filter().0)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        // When stderr is gone (a log reader that died), a line that cannot
        // be written is dropped: by default the subscriber reports the
        // failure with eprintln!, which panics and would kill whichever
        // thread logged (the signal thread, a worker).
        .log_internal_errors(false)
        .init();
    match ringcast::runtime::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringcast: {e}");
            ExitCode::from(1)
        }
    }
}
