//! The API server's size limits on what the operator writes (event notes, condition reasons and messages), and
//! the cutting that keeps a text within them: the beginning, which names the object and the cause, is kept.

/// Longest event note the API server accepts (bytes).
pub const EVENT_NOTE_MAX: usize = 1_024;
/// Longest event reason and action the API server accepts.
pub const EVENT_REASON_MAX: usize = 128;
/// Longest condition message the API server accepts (bytes).
pub const CONDITION_MESSAGE_MAX: usize = 32_768;
/// Longest condition reason the API server accepts.
pub const CONDITION_REASON_MAX: usize = 1_024;

/// `text` cut to at most `max` bytes on a character boundary, ending in `…` when cut: the beginning (which names
/// the object and the cause) is kept.
pub fn fit(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    const ELLIPSIS: &str = "…";
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &text[..end])
}

/// A reason the API server accepts (`^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$`, at most `max` characters):
/// other characters are dropped; an empty result becomes `Unknown`.
pub fn fit_reason(reason: &str, max: usize) -> String {
    let mut out: String = reason.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(max).collect();
    while out.starts_with(|c: char| !c.is_ascii_alphabetic()) {
        out.remove(0);
    }
    if out.is_empty() { "Unknown".to_string() } else { out }
}
