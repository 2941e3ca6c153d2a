//! `--color auto|always|never`: whether the logs (and `data preview`) use ANSI colours.
//!
//! `auto`, the default, colours a stream only when it is a terminal and `NO_COLOR` is unset
//! or empty (<https://no-color.org>), so that `llava train … 2>&1 | tee log` writes plain text.
//! An explicit `always` or `never` wins over `NO_COLOR`, as the convention asks.

use std::io::IsTerminal;
use std::sync::OnceLock;

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ColorChoice {
    #[default]
    Auto,
    Always,
    Never,
}

static CHOICE: OnceLock<ColorChoice> = OnceLock::new();

impl ColorChoice {
    /// Whether to colour a stream, given whether it is a terminal and the `NO_COLOR` value.
    pub fn enabled(self, is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => is_terminal && no_color.is_none_or(|v| v.is_empty()),
        }
    }

    /// Makes this the process's choice (the first call wins: the demo's in-process
    /// subcommands keep the user's).
    pub fn set_global(self) {
        let _ = CHOICE.set(self);
    }
}

fn enabled_for(is_terminal: bool) -> bool {
    let choice = CHOICE.get().copied().unwrap_or_default();
    choice.enabled(is_terminal, std::env::var_os("NO_COLOR").as_deref())
}

/// Whether to colour what goes to stderr (the logs).
pub fn stderr() -> bool {
    enabled_for(std::io::stderr().is_terminal())
}

/// Whether to colour what goes to stdout.
pub fn stdout() -> bool {
    enabled_for(std::io::stdout().is_terminal())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_needs_a_terminal_and_no_no_color() {
        let set = Some(std::ffi::OsStr::new("1"));
        let empty = Some(std::ffi::OsStr::new(""));
        assert!(ColorChoice::Auto.enabled(true, None));
        assert!(ColorChoice::Auto.enabled(true, empty));
        assert!(!ColorChoice::Auto.enabled(true, set));
        assert!(!ColorChoice::Auto.enabled(false, None));
        assert!(ColorChoice::Always.enabled(false, set));
        assert!(!ColorChoice::Never.enabled(true, None));
    }
}
