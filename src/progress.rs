//! Progress for long jobs, with rates and ETAs (indicatif's estimators).
//!
//! * [`bytes_bar`]: a bar on stderr for `engramctl` (backup create, verify, restore). It draws
//!   only on a terminal: piped or scripted output stays exactly as it was.
//! * [`Logged`]: a node's long jobs (vector shard rebuilds). A node's stderr is its log, so its
//!   progress is a log line every few seconds with the rate and ETA, not a bar.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar counting bytes toward `total` (`None`: unknown, a counter with a rate). `estimated`
/// marks a total that is a guess (the bar then says `~`).
pub fn bytes_bar(total: Option<u64>, estimated: bool, message: &str) -> ProgressBar {
    bytes_bar_to(ProgressDrawTarget::stderr(), total, estimated, message)
}

/// [`bytes_bar`] drawing to `target` (tests draw into memory).
pub fn bytes_bar_to(target: ProgressDrawTarget, total: Option<u64>, estimated: bool, message: &str) -> ProgressBar {
    let template = match (total, estimated) {
        (None, _) => "{msg} {spinner} {bytes} ({binary_bytes_per_sec}, {elapsed})",
        (Some(_), false) => "{msg} [{bar:30}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, ETA {eta})",
        (Some(_), true) => "{msg} [{bar:30}] {bytes}/~{total_bytes} ({binary_bytes_per_sec}, ETA ~{eta})",
    };
    let style = ProgressStyle::with_template(template).expect("a valid template").progress_chars("=> ");
    let bar = ProgressBar::with_draw_target(total, target).with_style(style).with_message(message.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Counts a node's long job and logs its progress at most every `every`: done, total,
/// rate and ETA.
pub struct Logged {
    what: &'static str,
    unit: &'static str,
    bar: ProgressBar,
    every: Duration,
    last: Instant,
}

impl Logged {
    pub fn new(what: &'static str, unit: &'static str, total: u64) -> Logged {
        Logged::with_interval(what, unit, total, Duration::from_secs(5))
    }

    pub fn with_interval(what: &'static str, unit: &'static str, total: u64, every: Duration) -> Logged {
        let bar = ProgressBar::hidden();
        bar.set_length(total);
        Logged { what, unit, bar, every, last: Instant::now() }
    }

    /// Counts `n` more done; logs when the interval has passed. Returns whether it logged.
    pub fn inc(&mut self, n: u64) -> bool {
        self.bar.inc(n);
        if self.last.elapsed() < self.every {
            return false;
        }
        self.last = Instant::now();
        let (done, total) = (self.bar.position(), self.bar.length().unwrap_or(0));
        tracing::info!(
            done,
            total,
            unit = self.unit,
            per_sec = self.per_sec().round() as u64,
            eta_secs = self.eta().as_secs(),
            "{}: {done} of {total} {}",
            self.what,
            self.unit
        );
        true
    }

    /// Done per second so far.
    pub fn per_sec(&self) -> f64 {
        self.bar.per_sec()
    }

    /// The estimated time left.
    pub fn eta(&self) -> Duration {
        self.bar.eta()
    }

    pub fn done(&self) -> u64 {
        self.bar.position()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_shows_bytes_rate_and_eta_and_a_pipe_shows_nothing() {
        let term = indicatif::InMemoryTerm::new(4, 120);
        let bar =
            bytes_bar_to(ProgressDrawTarget::term_like(Box::new(term.clone())), Some(4 << 20), false, "verifying");
        std::io::copy(&mut bar.wrap_read(&vec![0u8; 1 << 20][..]), &mut std::io::sink()).unwrap();
        // The steady tick (every 200 ms) redraws.
        let redraw = || std::thread::sleep(Duration::from_millis(450));
        redraw();
        let shown = term.contents();
        assert!(shown.contains("verifying") && shown.contains("1.00 MiB/4.00 MiB"), "{shown}");
        assert!(shown.contains("/s") && shown.contains("ETA"), "{shown}");
        bar.finish();

        let term = indicatif::InMemoryTerm::new(4, 120);
        let bar = bytes_bar_to(ProgressDrawTarget::term_like(Box::new(term.clone())), Some(100), true, "creating");
        bar.inc(10);
        redraw();
        assert!(term.contents().contains("/~100 B") && term.contents().contains("ETA ~"), "{}", term.contents());

        let term = indicatif::InMemoryTerm::new(4, 120);
        let bar = bytes_bar_to(ProgressDrawTarget::term_like(Box::new(term.clone())), None, false, "receiving");
        bar.inc(2048);
        redraw();
        assert!(term.contents().contains("2.00 KiB") && term.contents().contains("/s"), "{}", term.contents());

        // stderr of a test is no terminal: nothing is drawn.
        assert!(bytes_bar(Some(10), false, "x").is_hidden());
    }

    #[test]
    fn logged_progress_counts_and_estimates() {
        let mut p = Logged::with_interval("rebuilding", "memories", 1000, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(20));
        assert!(p.inc(250));
        assert_eq!(p.done(), 250);
        assert!(p.per_sec() > 0.0);
        assert!(p.eta() > Duration::ZERO, "three quarters to go");
        let mut quiet = Logged::with_interval("rebuilding", "memories", 10, Duration::from_secs(3600));
        assert!(!quiet.inc(1), "logs at most once per interval");
    }
}
