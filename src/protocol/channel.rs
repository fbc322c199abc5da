//! Names a client gives: channels (1 to 255 bytes of UTF-8, no whitespace
//! or control characters, and nothing starting with `$`, reserved for the
//! relay) and publication keys (1 to 255 bytes of UTF-8).

/// Returns why `key` is not a valid publication key, if it is not.
pub fn validate_key(key: &str) -> Result<(), &'static str> {
    match key.len() {
        0 => Err("key is empty"),
        1..=255 => Ok(()),
        _ => Err("key is longer than 255 bytes"),
    }
}

/// Returns why `name` is not a valid channel name, if it is not.
pub fn validate_channel(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("channel name is empty");
    }
    if name.len() > 255 {
        return Err("channel name is longer than 255 bytes");
    }
    if name.starts_with('$') {
        return Err("channel names starting with `$` are reserved");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("channel name contains whitespace or a control character");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_channel;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["prices.AAPL", "a", "ümlaut/чат", &"x".repeat(255)] {
            assert!(validate_channel(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        for n in [
            "",
            "a b",
            "tab\t",
            "nl\n",
            "$sys",
            "nul\0",
            "nbsp\u{a0}",
            &"x".repeat(256),
        ] {
            assert!(validate_channel(n).is_err(), "{n:?}");
        }
    }
}
