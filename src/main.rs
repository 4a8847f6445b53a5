//! The `rollingpaper` binary: configuration, logging, run, exit status.

use std::process::ExitCode;

use clap::Parser;
use rollingpaper::config::Config;
use rollingpaper::server::{self, Outcome};

fn main() -> ExitCode {
    let config = match Config::parse().validate() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("rollingpaper: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = simple_logger::SimpleLogger::new().with_utc_timestamps().with_level(config.log_level).init() {
        eprintln!("rollingpaper: cannot start logging: {e}");
        return ExitCode::from(2);
    }
    // A thread that panics leaves its sessions or the backlog behind: rather than
    // serve on half-alive, the process stops and its supervisor starts it again.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        log::error!("fatal: {info}");
        default_hook(info);
        std::process::abort();
    }));
    log::info!("starting: {config}");
    match server::run(config) {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Lost(n)) => {
            log::error!("{n} edits could not be written to Redis before the shutdown timeout");
            ExitCode::FAILURE
        }
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(2)
        }
    }
}
