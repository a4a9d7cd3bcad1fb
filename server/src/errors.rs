//! Printing an error with its causes, each once.
//!
//! Library errors here keep their cause as `source()` and leave it out of their own
//! message, as the Rust API guidelines ask; the binary prints the chain with anyhow's
//! `{:#}`. Where the library itself shows an error (a reply body, a log line) it uses
//! `Chain`, which walks the same causes.

use std::fmt;

/// Displays an error and its causes as "error: cause: cause".
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_printed_once() {
        let e = crate::store::StoreError::Open {
            path: "/proc/nope".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let text = Chain(&e).to_string();
        assert_eq!(
            text.matches("No such file or directory").count(),
            1,
            "{text}"
        );
        assert!(text.starts_with("cannot open /proc/nope: "), "{text}");
    }
}
