//! The `amqp-gateway` binary: flags → config → logging → run until SIGTERM/SIGINT. No logic.

use std::process::ExitCode;

use amqp_gateway::cli::Cli;
use amqp_gateway::config::{self, LogFormat};
use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded = match config::load(cli.config.as_deref(), std::env::vars(), cli.overrides()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("amqp-gateway: invalid configuration\n{e}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&loaded.config.log.level));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match loaded.config.log.format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("amqp-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(amqp_gateway::run(
        loaded.config,
        amqp_gateway::shutdown::signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("amqp-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
