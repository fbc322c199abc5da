//! The `ringcast` binary: configuration, logging, then the runtime.

use std::process::ExitCode;

fn main() -> ExitCode {
    let config = match ringcast::config::Config::load() {
        Ok(c) => c,
        Err(e) => {
            // clap's own output (--help, --version, usage errors) is already formatted.
            if e.starts_with("error:")
                || e.contains("Usage:")
                || !e.starts_with("invalid") && !e.contains("config file")
            {
                eprint!("{e}");
                if !e.ends_with('\n') {
                    eprintln!();
                }
                let help = e.contains("Usage: ringcast [OPTIONS]") && !e.starts_with("error:");
                return if help || e.starts_with("ringcast ") {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(2)
                };
            }
            eprintln!("ringcast: {e}");
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
