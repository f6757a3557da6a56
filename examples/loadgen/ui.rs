//! Progress on stderr: a bar on a terminal, plain lines otherwise, nothing with `--quiet`.

use std::fmt::Display;
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress on stderr: a bar on a terminal, plain lines otherwise, nothing with `--quiet`.
pub(crate) struct Ui {
    /// Hidden (every call a no-op) unless stderr is a terminal and not `--quiet`.
    pub(crate) bar: ProgressBar,
    visible: bool,
    quiet: bool,
}

pub(crate) const SETUP_TEMPLATE: &str = "{prefix:>12} [{bar:32}] {pos}/{len} {msg} ({elapsed})";
pub(crate) const PUBLISH_TEMPLATE: &str = "{prefix:>12} [{bar:32}] {pos}/{len} s  {msg}";

impl Ui {
    pub(crate) fn new(quiet: bool) -> Ui {
        let visible = !quiet && std::io::stderr().is_terminal();
        let bar = if visible {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        Ui {
            bar,
            visible,
            quiet,
        }
    }

    /// Whether to print one progress line a second (stderr is not a terminal, and not `--quiet`).
    pub(crate) fn lines(&self) -> bool {
        !self.visible && !self.quiet
    }

    /// A progress note (not with `--quiet`).
    pub(crate) fn note(&self, msg: impl Display) {
        if !self.quiet {
            self.bar.suspend(|| eprintln!("loadgen: {msg}"));
        }
    }

    /// Something the user should know about the results, even with `--quiet`.
    pub(crate) fn warn(&self, msg: impl Display) {
        self.bar.suspend(|| eprintln!("loadgen: {msg}"));
    }

    /// Starts a phase of `len` steps on the bar.
    pub(crate) fn phase(&self, prefix: &'static str, len: u64, template: &str) {
        self.bar.reset();
        self.bar.set_style(
            ProgressStyle::with_template(template)
                .expect("a valid progress template")
                .progress_chars("=> "),
        );
        self.bar.set_prefix(prefix);
        self.bar.set_message("");
        self.bar.set_length(len);
        self.bar.set_position(0);
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
