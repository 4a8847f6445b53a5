//! The `rollingpaper` binary: configuration, logging, a first look at Redis,
//! run, exit status (0 clean, 1 edits lost at shutdown, 2 configuration).

use std::process::ExitCode;

use rollingpaper::config::{self, Config, StoreKind};
use rollingpaper::logging::Logger;
use rollingpaper::server::{self, Outcome};
use rollingpaper::store::target::{Target, Unusable};

fn main() -> ExitCode {
    let config = match Config::from_args(std::env::args_os()) {
        Ok(config) => config,
        // `--help` and `--version` exit 0 through here; bad flags exit 2.
        Err(e) => e.exit(),
    };
    let config = match config.validate() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("rollingpaper: {e}");
            return ExitCode::from(2);
        }
    };
    let installed = config.log_filter().map_err(|e| e.to_string()).and_then(|filter| {
        Logger::install(filter, config.log_format).map_err(|e| format!("cannot start logging: {e}"))
    });
    if let Err(e) = installed {
        eprintln!("rollingpaper: {e}");
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
    log::info!("rollingpaper {} starting: {config}", env!("CARGO_PKG_VERSION"));
    if config.listen.ip().is_unspecified() {
        log::info!("--listen {} is every interface of this machine", config.listen);
    }
    if config.jwt_secret.is_none() {
        log::warn!(
            "auth is off (no --jwt-secret): clients name themselves with ?user=; set RP_JWT_SECRET in production"
        );
    }
    if config.store == StoreKind::Redis && !redis_may_work(&config) {
        return ExitCode::from(2);
    }
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

/// Looks at Redis once: a configuration that can never work stops the start
/// (a supervisor restarting it would only repeat the error); a Redis that is
/// merely down does not, since it may come up and the server waits for it.
fn redis_may_work(config: &Config) -> bool {
    let url = config::redact(&config.redis);
    let target = Target::configured(&config.redis, config.redis_ca_file.as_deref()).expect("checked by validate");
    match target.check() {
        Ok(()) => log::info!("Redis at {url} answers"),
        Err(Unusable::Down(why)) => log::warn!(
            "Redis at {url} does not answer yet ({why}); serving anyway: edits wait in the backlog \
             and /readyz answers 503 until it does"
        ),
        Err(Unusable::Misconfigured(why)) => {
            log::error!("--redis {url}: {why}");
            return false;
        }
    }
    true
}
