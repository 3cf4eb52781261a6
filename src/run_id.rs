//! Run ids: checked in one place, before anything is written, by the client (`start_run`), the CLI and the
//! worker when it decodes a job.
//!
//! A run id is 1 to [`MAX_RUN_ID_LEN`] bytes of `A-Z a-z 0-9 . _ : -`. The set keeps ids safe everywhere they
//! travel: SQL values, Redis keys (`{run}` hash tags), AMQP message ids (`run/node/attempt`, at most 255 bytes),
//! log lines, Kubernetes labels and shells. UUIDs, ULIDs, `fr-<uid>` and `order-42:retry.1` fit; 200 bytes leave
//! room for the node id and attempt in a message id.

/// Longest run id, in bytes.
pub const MAX_RUN_ID_LEN: usize = 200;

/// Why a run id is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunIdError {
    /// The id is empty.
    #[error("invalid run id: it is empty")]
    Empty,
    /// The id is too long.
    #[error("invalid run id {shown}: {len} bytes, at most {MAX_RUN_ID_LEN} are allowed")]
    TooLong {
        /// The start of the id (escaped).
        shown: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The id holds a character outside the allowed set.
    #[error("invalid run id {shown}: character {ch:?} at byte {at} is not allowed (use A-Z a-z 0-9 . _ : -)")]
    BadChar {
        /// The start of the id (escaped).
        shown: String,
        /// The first offending character.
        ch: char,
        /// Its byte offset.
        at: usize,
    },
}

/// Check a run id (see the module documentation for the rule).
pub fn validate_run_id(id: &str) -> Result<(), RunIdError> {
    if id.is_empty() {
        return Err(RunIdError::Empty);
    }
    if id.len() > MAX_RUN_ID_LEN {
        return Err(RunIdError::TooLong { shown: shown(id), len: id.len() });
    }
    match id.char_indices().find(|&(_, c)| !is_allowed(c)) {
        Some((at, ch)) => Err(RunIdError::BadChar { shown: shown(id), ch, at }),
        None => Ok(()),
    }
}

fn is_allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// The id for a message: escaped (no control character reaches a terminal or a log) and cut at 40 characters.
fn shown(id: &str) -> String {
    let mut s: String = id.chars().take(40).collect();
    if s.len() < id.len() {
        s.push('…');
    }
    format!("{s:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_ids() {
        for id in ["a", "3c17a7e2-8f1b-4c8e-9d7a-0b1c2d3e4f5a", "fr-1234", "order-42:retry.1", "t_kill_1_2_ab"] {
            assert_eq!(validate_run_id(id), Ok(()), "{id}");
        }
        assert!(validate_run_id(&"x".repeat(MAX_RUN_ID_LEN)).is_ok());
    }

    #[test]
    fn bad_ids() {
        assert_eq!(validate_run_id(""), Err(RunIdError::Empty));
        let long = "y".repeat(300);
        let err = validate_run_id(&long).unwrap_err();
        assert!(matches!(err, RunIdError::TooLong { len: 300, .. }));
        assert!(err.to_string().len() < 200, "{err}");
        for (id, ch) in [("a\0b", '\0'), ("a b", ' '), ("a/b", '/'), ("{a}", '{'), ("é", 'é'), ("a\nb", '\n')] {
            match validate_run_id(id) {
                Err(RunIdError::BadChar { ch: found, .. }) => assert_eq!(found, ch, "{id:?}"),
                other => panic!("{id:?}: {other:?}"),
            }
        }
        let msg = validate_run_id("a\0b").unwrap_err().to_string();
        assert!(!msg.contains('\0'), "{msg:?}");
    }
}
