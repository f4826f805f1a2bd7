//! `routemq-bridge`: the command line (spec §2). Only wiring: parse arguments, load the
//! config, hand over to the library. Exit codes: 0 clean stop, 1 runtime failure, 2 bad
//! config or usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use routemq_bridge::cli;

#[derive(Parser)]
#[command(
    name = "routemq-bridge",
    version,
    about = "MQTT ⇄ Redis bridge for IoT gateways, the companion of RouteMQ"
)]
struct Args {
    /// The config file.
    #[arg(long, short, global = true, env = "ROUTEMQ_BRIDGE_CONFIG", default_value = routemq_bridge::daemon::config::DEFAULT_PATH)]
    config: PathBuf,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Validate the config without connecting and print the route table.
    Check,
    /// Show which routes a topic matches, the params captured and the rendered keys.
    Match {
        /// A published topic, e.g. sensors/dev-1/data.
        topic: String,
        /// A payload to render the templates with (JSON for JSON routes).
        #[arg(long)]
        payload: Option<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let code = match args.command.unwrap_or(Command::Run) {
        Command::Run => cli::run(&args.config),
        Command::Check => cli::check(&args.config),
        Command::Match { topic, payload } => cli::matches(&args.config, &topic, payload.as_deref()),
    };
    ExitCode::from(code)
}
