//! The standard `process_*` metrics of Prometheus's client libraries, read from
//! `/proc` at the scrape. Linux only: elsewhere they are left out.

/// The process as `/proc` describes it at one moment.
pub struct Process {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub start_time_seconds: f64,
}

/// Reads the process's figures; `None` where `/proc` cannot be read.
#[cfg(target_os = "linux")]
pub fn read() -> Option<Process> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses: the fields that follow
    // start after the last `)`, with field 3 (the state).
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // Field `n` as numbered in proc(5).
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let (utime, stime, start_ticks, rss_pages) = (field(14)?, field(15)?, field(22)?, field(24)?);
    // SAFETY: sysconf only reads a configuration value.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let (ticks, page) = (u64::try_from(ticks).ok().filter(|&t| t > 0)?, u64::try_from(page).ok()?);
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given.
    let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 { limit.rlim_cur } else { 0 };
    Some(Process {
        cpu_seconds: (utime + stime) as f64 / ticks as f64,
        resident_bytes: rss_pages * page,
        open_fds,
        max_fds,
        start_time_seconds: boot as f64 + start_ticks as f64 / ticks as f64,
    })
}

#[cfg(not(target_os = "linux"))]
pub fn read() -> Option<Process> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn reads_this_process() {
        let p = super::read().expect("/proc is readable");
        assert!(p.resident_bytes > 0);
        assert!(p.open_fds >= 3, "stdin, stdout, stderr at least");
        assert!(p.max_fds >= p.open_fds);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(p.start_time_seconds <= now + 1.0 && p.start_time_seconds > now - 86_400.0 * 365.0);
    }
}
