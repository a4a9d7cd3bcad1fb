//! Test hooks: named points in the store's write paths where an end-to-end test can make the
//! node wait or fail, to open the windows a race or a crash needs (after the idea of
//! FreeBSD's fail points and the `fail` crate).
//!
//! They are read once, from `SLAPSHOT_TEST_HOOKS`, and cost one load of an empty list when
//! it is not set. A node started with hooks says so in its log. The format is a
//! comma-separated list of `POINT[@KEY_PREFIX]=ACTION[*COUNT]`:
//! - `POINT` is one of the [`Hook`] names, e.g. `put.after_write`;
//! - `@KEY_PREFIX` limits the rule to shard keys starting with it (points without a key
//!   ignore it);
//! - `ACTION` is `delay:MILLISECONDS` or `fail` (the operation gets an I/O error, as if the
//!   device had refused it);
//! - `*COUNT` fires the rule only that many times.
//!
//! Example: `SLAPSHOT_TEST_HOOKS='put.after_write@slow-=delay:2000*1,retire=fail'`.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

/// Where a hook can fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A PUT's body has arrived; its sequence number (and a create-only PUT's check) is
    /// still to come.
    PutBeforeCheck,
    /// A PUT's record is written, not yet durable or indexed.
    PutAfterWrite,
    /// A PUT is indexed and about to be acknowledged.
    PutAfterIndex,
    /// A DELETE removed the index entry and is about to zero the record.
    DeleteAfterUnindex,
    /// A record is about to be zeroed (invalidated) on the device.
    Invalidate,
    /// A free region was taken for appends; its header is not written yet.
    RegionBeforeHeader,
    /// Eviction wrote a hot shard's copy and has not pointed the index at it yet.
    ReinsertAfterCopy,
    /// Eviction is about to write the victim region's retired header.
    Retire,
}

impl Hook {
    const ALL: [Hook; 8] = [
        Hook::PutBeforeCheck,
        Hook::PutAfterWrite,
        Hook::PutAfterIndex,
        Hook::DeleteAfterUnindex,
        Hook::Invalidate,
        Hook::RegionBeforeHeader,
        Hook::ReinsertAfterCopy,
        Hook::Retire,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hook::PutBeforeCheck => "put.before_check",
            Hook::PutAfterWrite => "put.after_write",
            Hook::PutAfterIndex => "put.after_index",
            Hook::DeleteAfterUnindex => "delete.after_unindex",
            Hook::Invalidate => "invalidate",
            Hook::RegionBeforeHeader => "region.before_header",
            Hook::ReinsertAfterCopy => "reinsert.after_copy",
            Hook::Retire => "retire",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Delay(Duration),
    Fail,
}

#[derive(Debug)]
struct Rule {
    hook: Hook,
    key_prefix: Option<String>,
    action: Action,
    /// Firings left; `u32::MAX` means unlimited.
    remaining: AtomicU32,
}

/// The environment variable the rules are read from.
pub const ENV: &str = "SLAPSHOT_TEST_HOOKS";

fn rules() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| match std::env::var(ENV) {
        Ok(spec) if !spec.trim().is_empty() => match parse(&spec) {
            Ok(rules) => {
                tracing::warn!(hooks = %spec, "test hooks are active: this node is for tests only");
                rules
            }
            Err(e) => {
                tracing::error!(hooks = %spec, error = %e, "ignoring malformed {ENV}");
                Vec::new()
            }
        },
        _ => Vec::new(),
    })
}

fn parse(spec: &str) -> Result<Vec<Rule>, String> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (target, action) = item
                .trim()
                .split_once('=')
                .ok_or_else(|| format!("{item}: expected POINT=ACTION"))?;
            let (point, key_prefix) = match target.split_once('@') {
                Some((point, prefix)) => (point, Some(prefix.to_owned())),
                None => (target, None),
            };
            let hook = Hook::ALL
                .into_iter()
                .find(|h| h.name() == point)
                .ok_or_else(|| format!("{point}: no such hook"))?;
            let (action, count) = match action.split_once('*') {
                Some((action, count)) => (
                    action,
                    count
                        .parse::<u32>()
                        .map_err(|_| format!("{item}: bad count"))?,
                ),
                None => (action, u32::MAX),
            };
            let action = match action.split_once(':') {
                Some(("delay", ms)) => Action::Delay(Duration::from_millis(
                    ms.parse().map_err(|_| format!("{item}: bad delay"))?,
                )),
                None if action == "fail" => Action::Fail,
                _ => return Err(format!("{item}: expected delay:MS or fail")),
            };
            Ok(Rule {
                hook,
                key_prefix,
                action,
                remaining: AtomicU32::new(count),
            })
        })
        .collect()
}

/// Runs the rules for `hook` (and `key`, if the point has one): waits, or returns the
/// injected failure. Without rules this returns at once.
pub async fn at(hook: Hook, key: Option<&[u8]>) -> std::io::Result<()> {
    let rules = rules();
    if rules.is_empty() {
        return Ok(());
    }
    for rule in rules.iter().filter(|r| r.hook == hook) {
        if let (Some(prefix), Some(key)) = (&rule.key_prefix, key)
            && !key.starts_with(prefix.as_bytes())
        {
            continue;
        }
        let fire = rule
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match n {
                0 => None,
                u32::MAX => Some(u32::MAX),
                n => Some(n - 1),
            })
            .is_ok();
        if !fire {
            continue;
        }
        tracing::info!(hook = hook.name(), action = ?rule.action, "test hook fired");
        match rule.action {
            Action::Delay(d) => monoio::time::sleep(d).await,
            Action::Fail => {
                return Err(std::io::Error::other(format!(
                    "injected failure at {}",
                    hook.name()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse() {
        let rules = parse("put.after_write@slow-=delay:250*1, retire=fail").unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].hook, Hook::PutAfterWrite);
        assert_eq!(rules[0].key_prefix.as_deref(), Some("slow-"));
        assert_eq!(rules[0].action, Action::Delay(Duration::from_millis(250)));
        assert_eq!(rules[0].remaining.load(Ordering::Relaxed), 1);
        assert_eq!(rules[1].action, Action::Fail);
        assert!(parse("nowhere=fail").is_err());
        assert!(parse("retire=explode").is_err());
    }
}
