//! Assertions over command output and logs.

/// Panics naming the first of `needles` that `text` does not contain, with the whole text.
#[track_caller]
pub fn assert_contains(text: &str, needles: &[&str]) {
    for needle in needles {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}
