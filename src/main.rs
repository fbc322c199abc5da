//! The `ringcast` binary: configuration, logging, then the runtime.

use std::process::ExitCode;

use ringcast::config::{Config, ConfigError};

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(c) => c,
        // clap prints usage errors, --help and --version and picks the exit code.
        Err(ConfigError::CommandLine(e)) => e.exit(),
        Err(ConfigError::Invalid(message)) => {
            eprintln!("ringcast: {message}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match ringcast::runtime::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringcast: {e}");
            ExitCode::from(1)
        }
    }
}
