//! Which browser pages may open WebSockets: `--allowed-origins`, exact
//! origins or `scheme://*.domain` patterns, compared case-insensitively as
//! browsers send them (`scheme://host[:port]`, no path).

/// The allowed origins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origins {
    /// Lower case. A pattern is stored as its scheme and the suffix after
    /// `*` (`https://`, `.example.com`).
    exact: Vec<String>,
    wildcard: Vec<(String, String)>,
}

impl Origins {
    /// Parses the list; `None` when it is empty (any origin).
    pub fn parse(list: &[String]) -> Result<Option<Origins>, String> {
        if list.is_empty() {
            return Ok(None);
        }
        let mut origins = Origins {
            exact: Vec::new(),
            wildcard: Vec::new(),
        };
        for entry in list {
            let entry = entry.trim().to_ascii_lowercase();
            let Some((scheme, host)) = entry.split_once("://") else {
                return Err(format!(
                    "--allowed-origins `{entry}` is not an origin (like https://app.example.com)"
                ));
            };
            if !matches!(scheme, "http" | "https") || host.is_empty() || host.contains('/') {
                return Err(format!(
                    "--allowed-origins `{entry}` is not an origin: scheme://host[:port], no path"
                ));
            }
            match host.strip_prefix('*') {
                Some(suffix) if suffix.starts_with('.') && !suffix.contains('*') => origins
                    .wildcard
                    .push((format!("{scheme}://"), suffix.to_string())),
                Some(_) => {
                    return Err(format!(
                        "--allowed-origins `{entry}`: a pattern is scheme://*.domain"
                    ))
                }
                None if host.contains('*') => {
                    return Err(format!(
                        "--allowed-origins `{entry}`: `*` may only start the host"
                    ))
                }
                None => origins.exact.push(entry),
            }
        }
        Ok(Some(origins))
    }

    /// Whether a handshake's `Origin` is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        self.exact.contains(&origin)
            || self.wildcard.iter().any(|(scheme, suffix)| {
                origin.strip_prefix(scheme.as_str()).is_some_and(|host| {
                    host.len() > suffix.len() && host.ends_with(suffix.as_str())
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(list: &[&str]) -> Origins {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        Origins::parse(&list).unwrap().unwrap()
    }

    #[test]
    fn exact_origins_and_subdomain_patterns() {
        let o = origins(&[
            "https://app.example.com",
            "https://*.example.org",
            "http://localhost:8080",
        ]);
        assert!(o.allows("https://app.example.com"));
        assert!(o.allows("HTTPS://App.Example.com"));
        assert!(!o.allows("https://app.example.com.evil.net"));
        assert!(!o.allows("http://app.example.com"), "another scheme");
        assert!(o.allows("https://a.b.example.org"));
        assert!(
            !o.allows("https://example.org"),
            "the pattern needs a subdomain"
        );
        assert!(!o.allows("https://evilexample.org"));
        assert!(o.allows("http://localhost:8080"));
        assert!(!o.allows("http://localhost:8081"));
        assert!(!o.allows("null"));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            "example.com",
            "ftp://x",
            "https://x/path",
            "https://a*.x",
            "https://x.*",
        ] {
            assert!(Origins::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
        assert_eq!(Origins::parse(&[]).unwrap(), None);
    }
}
