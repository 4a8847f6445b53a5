//! The process's logger: one line per record on standard error, as text for
//! people or as JSON for log shippers, with a level per module. Libraries
//! (tungstenite, redis, mio) stay at `warn` unless asked for, so that
//! `--log-level debug` shows the server's own story, not its dependencies'.

use std::fmt;
use std::io::Write;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::ValueEnum;
use log::{LevelFilter, Log, Metadata, Record};

/// How each line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `2025-01-02T03:04:05.678Z INFO  [target] message`
    Text,
    /// `{"ts":"2025-01-02T03:04:05.678Z","level":"INFO","target":"...","msg":"..."}`
    Json,
}

/// Which records pass: a level per module path prefix, the most specific wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// Records of rollingpaper's own modules not named below.
    own: LevelFilter,
    /// Records of every other crate not named below.
    libraries: LevelFilter,
    /// `(module path, level)`, longest path first.
    modules: Vec<(String, LevelFilter)>,
}

/// A `--log` value that does not parse, with the part that is wrong.
#[derive(Debug)]
pub struct BadFilter(String);

impl fmt::Display for BadFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Filter {
    /// `own` for the server's modules; libraries at `warn` (or lower, if `own` is).
    /// `spec` (`--log`, `RP_LOG`) is comma-separated `LEVEL` or `module::path=LEVEL`;
    /// a bare level applies to every module, libraries included.
    ///
    /// # Errors
    /// A directive whose level is not one of off, error, warn, info, debug, trace.
    pub fn new(own: LevelFilter, spec: Option<&str>) -> Result<Filter, BadFilter> {
        let mut filter = Filter { own, libraries: own.min(LevelFilter::Warn), modules: Vec::new() };
        for directive in spec.unwrap_or("").split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let (module, level) = match directive.split_once('=') {
                Some((module, level)) => (Some(module.trim()), level.trim()),
                None => (None, directive),
            };
            let level = LevelFilter::from_str(level).map_err(|_| {
                BadFilter(format!(
                    "{directive:?}: {level:?} is not a level (off, error, warn, info, debug, trace); \
                     use for example info,rollingpaper::store=debug"
                ))
            })?;
            match module {
                Some("") => return Err(BadFilter(format!("{directive:?} names no module"))),
                Some(module) => filter.modules.push((module.to_string(), level)),
                None => (filter.own, filter.libraries) = (level, level),
            }
        }
        filter.modules.sort_by_key(|(module, _)| std::cmp::Reverse(module.len()));
        Ok(filter)
    }

    /// The level in force for a record's target.
    pub fn level(&self, target: &str) -> LevelFilter {
        let within =
            |module: &str| target.strip_prefix(module).is_some_and(|rest| rest.is_empty() || rest.starts_with("::"));
        if let Some((_, level)) = self.modules.iter().find(|(module, _)| within(module)) {
            return *level;
        }
        if within(env!("CARGO_CRATE_NAME")) {
            self.own
        } else {
            self.libraries
        }
    }

    /// The most verbose level any record may pass at (for `log::set_max_level`).
    pub fn max(&self) -> LevelFilter {
        self.modules.iter().map(|(_, level)| *level).fold(self.own.max(self.libraries), Ord::max)
    }
}

pub struct Logger {
    filter: Filter,
    format: Format,
}

impl Logger {
    /// Installs the logger for the whole process.
    ///
    /// # Errors
    /// Another logger was installed first.
    pub fn install(filter: Filter, format: Format) -> Result<(), log::SetLoggerError> {
        let max = filter.max();
        log::set_boxed_logger(Box::new(Logger { filter, format }))?;
        log::set_max_level(max);
        Ok(())
    }

    fn line(&self, record: &Record) -> String {
        let ts = timestamp(SystemTime::now());
        match self.format {
            Format::Text => format!("{ts} {:<5} [{}] {}\n", record.level(), record.target(), record.args()),
            Format::Json => {
                // Written by hand to keep the keys in reading order; values are escaped.
                let quote = |text: &str| serde_json::to_string(text).expect("a string serializes");
                format!(
                    "{{\"ts\":\"{ts}\",\"level\":\"{}\",\"target\":{},\"msg\":{}}}\n",
                    record.level(),
                    quote(record.target()),
                    quote(&record.args().to_string())
                )
            }
        }
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.filter.level(metadata.target())
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            // One write per line, so lines of different threads never interleave;
            // a failed write to stderr has nowhere to be reported.
            let _ = std::io::stderr().lock().write_all(self.line(record).as_bytes());
        }
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// RFC 3339 in UTC with milliseconds, `2025-01-02T03:04:05.678Z`.
fn timestamp(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn libraries_stay_at_warn_unless_asked() {
        let filter = Filter::new(LevelFilter::Debug, None).unwrap();
        assert_eq!(filter.level("rollingpaper::store::writer"), LevelFilter::Debug);
        assert_eq!(filter.level("tungstenite::protocol"), LevelFilter::Warn);
        assert_eq!(filter.level("redis"), LevelFilter::Warn);
        // A crate whose name merely starts like ours is not ours.
        assert_eq!(filter.level("rollingpaperish"), LevelFilter::Warn);
        let quiet = Filter::new(LevelFilter::Error, None).unwrap();
        assert_eq!(quiet.level("mio::poll"), LevelFilter::Error);
    }

    #[test]
    fn per_module_levels_win_and_the_longest_path_first() {
        let filter = Filter::new(LevelFilter::Info, Some("info, rollingpaper::store=debug,redis=trace")).unwrap();
        assert_eq!(filter.level("rollingpaper::store::writer"), LevelFilter::Debug);
        assert_eq!(filter.level("rollingpaper::server"), LevelFilter::Info);
        assert_eq!(filter.level("redis::sentinel"), LevelFilter::Trace);
        assert_eq!(filter.level("mio"), LevelFilter::Info);
        assert_eq!(filter.max(), LevelFilter::Trace);
        let filter =
            Filter::new(LevelFilter::Info, Some("rollingpaper=warn,rollingpaper::store::writer=trace")).unwrap();
        assert_eq!(filter.level("rollingpaper::store::writer"), LevelFilter::Trace);
        assert_eq!(filter.level("rollingpaper::store::loader"), LevelFilter::Warn);
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        let e = Filter::new(LevelFilter::Info, Some("rollingpaper=loud")).unwrap_err().to_string();
        assert!(e.contains("loud") && e.contains("for example"), "{e}");
        assert!(Filter::new(LevelFilter::Info, Some("=debug")).is_err());
    }

    #[test]
    fn json_lines_are_one_object_each() {
        let logger = Logger { filter: Filter::new(LevelFilter::Info, None).unwrap(), format: Format::Json };
        let line = logger.line(
            &Record::builder()
                .level(log::Level::Warn)
                .target("rollingpaper::store")
                .args(format_args!("Redis \"down\"\nretrying"))
                .build(),
        );
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "{line}");
        assert!(line.starts_with("{\"ts\":"), "{line}");
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["level"], "WARN");
        assert_eq!(value["target"], "rollingpaper::store");
        assert_eq!(value["msg"], "Redis \"down\"\nretrying");
        assert!(value["ts"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let at = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
        assert_eq!(timestamp(at), "2024-02-29T12:34:56.789Z");
    }
}
