//! What a token lets its connection do per channel: the `caps` claim,
//! compiled once per connection (`{sub}` substituted, `*` prefixes split
//! off) so that checking a request is a scan of a few rules with no
//! allocation.

use std::collections::BTreeMap;

use super::AuthError;

/// An action a token may allow on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    Subscribe,
    Publish,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// The channel name, or the prefix before a final `*`.
    pattern: Box<str>,
    prefix: bool,
    subscribe: bool,
    publish: bool,
}

impl Rule {
    fn matches(&self, channel: &str) -> bool {
        if self.prefix {
            channel.starts_with(&*self.pattern)
        } else {
            channel == &*self.pattern
        }
    }
}

/// A connection's capabilities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    /// `None`: the token had no `caps` (subscribe everywhere, publish
    /// nowhere).
    rules: Option<Box<[Rule]>>,
}

/// Most rules one token may carry.
const MAX_RULES: usize = 256;

impl Caps {
    /// What a token without `caps` may do: subscribe everywhere, publish
    /// nowhere.
    pub fn subscribe_only() -> Caps {
        Caps { rules: None }
    }

    /// Compiles the `caps` claim for a token whose `sub` is `sub`.
    pub fn compile(
        claim: &BTreeMap<String, Vec<String>>,
        sub: Option<&str>,
    ) -> Result<Caps, AuthError> {
        if claim.len() > MAX_RULES {
            return Err(AuthError::BadCaps(format!(
                "at most {MAX_RULES} patterns are allowed"
            )));
        }
        let mut rules = Vec::with_capacity(claim.len());
        for (pattern, actions) in claim {
            let (mut subscribe, mut publish) = (false, false);
            for action in actions {
                match action.as_str() {
                    "subscribe" => subscribe = true,
                    "publish" => publish = true,
                    "*" => (subscribe, publish) = (true, true),
                    other => {
                        let shown: String = other.chars().take(32).collect();
                        return Err(AuthError::BadCaps(format!(
                            "unknown action `{shown}` (use subscribe, publish or *)"
                        )));
                    }
                }
            }
            let pattern = if pattern.contains("{sub}") {
                let Some(sub) = sub else {
                    return Err(AuthError::BadCaps(
                        "a pattern uses {sub} but the token has no sub".into(),
                    ));
                };
                pattern.replace("{sub}", sub)
            } else {
                pattern.clone()
            };
            let (literal, prefix) = match pattern.strip_suffix('*') {
                Some(literal) => (literal, true),
                None => (pattern.as_str(), false),
            };
            if literal.contains('*') {
                return Err(AuthError::BadCaps("`*` may only end a pattern".into()));
            }
            if !literal.is_empty() || !prefix {
                // A prefix need not be a whole channel name, but it must be
                // made of what channel names are made of.
                let checked = if prefix {
                    format!("{literal}x")
                } else {
                    literal.to_string()
                };
                if let Err(why) = crate::protocol::validate_channel(&checked) {
                    let shown: String = pattern.chars().take(64).collect();
                    return Err(AuthError::BadCaps(format!("pattern `{shown}`: {why}")));
                }
            }
            rules.push(Rule {
                pattern: literal.into(),
                prefix,
                subscribe,
                publish,
            });
        }
        Ok(Caps {
            rules: Some(rules.into_boxed_slice()),
        })
    }

    /// Whether `what` is allowed on `channel`.
    pub fn allows(&self, channel: &str, what: Capability) -> bool {
        let Some(rules) = &self.rules else {
            return what == Capability::Subscribe;
        };
        rules.iter().any(|rule| {
            let granted = match what {
                Capability::Subscribe => rule.subscribe,
                Capability::Publish => rule.publish,
            };
            granted && rule.matches(channel)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(pairs: &[(&str, &[&str])], sub: Option<&str>) -> Result<Caps, AuthError> {
        let claim = pairs
            .iter()
            .map(|(p, a)| (p.to_string(), a.iter().map(|s| s.to_string()).collect()))
            .collect();
        Caps::compile(&claim, sub)
    }

    #[test]
    fn patterns_match_names_and_prefixes_with_sub_substituted() {
        let c = caps(
            &[
                ("prices.*", &["subscribe"]),
                ("chat.{sub}", &["subscribe", "publish"]),
                ("ops", &["*"]),
            ],
            Some("alice"),
        )
        .unwrap();
        use Capability::*;
        assert!(c.allows("prices.AAPL", Subscribe));
        assert!(!c.allows("prices.AAPL", Publish));
        assert!(
            !c.allows("pricesX", Subscribe),
            "the prefix includes the dot"
        );
        assert!(c.allows("chat.alice", Publish));
        assert!(!c.allows("chat.bob", Subscribe));
        assert!(
            !c.allows("chat.alice.x", Subscribe),
            "a name is not a prefix"
        );
        assert!(c.allows("ops", Publish) && c.allows("ops", Subscribe));
        assert!(!c.allows("other", Subscribe));
    }

    #[test]
    fn no_caps_means_subscribe_everywhere_and_publish_nowhere() {
        let c = Caps::subscribe_only();
        assert!(c.allows("anything", Capability::Subscribe));
        assert!(!c.allows("anything", Capability::Publish));
        let everything = caps(&[("*", &["*"])], None).unwrap();
        assert!(everything.allows("x", Capability::Publish));
    }

    #[test]
    fn bad_claims_are_refused_with_a_reason() {
        for (pairs, why) in [
            (&[("a", &["read"][..])][..], "unknown action"),
            (&[("a.{sub}", &["subscribe"][..])][..], "no sub"),
            (&[("a*b", &["subscribe"][..])][..], "may only end"),
            (
                &[("bad channel", &["subscribe"][..])][..],
                "pattern `bad channel`",
            ),
        ] {
            let e = caps(pairs, None).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
    }
}
