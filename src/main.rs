use std::process::ExitCode;

use clap::Parser;

use ctwa_relay::cli::{self, Cli, Command};
use ctwa_relay::settings::Settings;
use ctwa_relay::startup::Application;
use ctwa_relay::telemetry;

/// mimalloc instead of glibc's malloc: in a profile of `ingest-batch`, glibc's malloc and free
/// were ~30 % of the store writer's CPU (BENCHMARKS.md), and its arenas kept freed memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A fatal error is printed once, with its causes on one line and no backtrace, and the process
/// exits 1.
#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        None | Some(Command::Serve) => serve(cli.config).await,
        Some(Command::MigrateStore { from, to }) => cli::migrate_store(from, to).await,
        Some(command) => cli::run_admin(command).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let settings = Settings::load(config.as_deref())?;
    telemetry::init(settings.log_format);
    for feature in settings.disabled_features() {
        tracing::warn!("{feature}");
    }
    let application = Application::build(settings).await?;
    tracing::info!("listening on http://{}", application.address());
    application.run_until_stopped().await
}
