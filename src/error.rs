//! The one error type of the relay: an I/O or setup failure with the context
//! of what was being done, so a start-up failure reads as one clear line
//! ("binding SO_REUSEPORT listener on 0.0.0.0:8080: Address in use").

use std::fmt;

/// An error with a chain of human-readable context, outermost first.
#[derive(Debug)]
pub struct Error {
    context: Vec<String>,
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn msg(message: impl Into<String>) -> Self {
        Error {
            context: Vec::new(),
            source: message.into().into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.context.iter().rev() {
            write!(f, "{c}: ")?;
        }
        write!(f, "{}", self.source)
    }
}

// Like anyhow's error, this type deliberately does not implement
// `std::error::Error`, so that any error converts into it with `?`.

impl<E: std::error::Error + Send + Sync + 'static> From<E> for Error {
    fn from(e: E) -> Self {
        Error {
            context: Vec::new(),
            source: Box::new(e),
        }
    }
}

/// Adds "what we were doing" to any fallible result, pingora style.
pub trait Context<T> {
    fn context(self, what: impl Into<String>) -> Result<T>;
    fn with_context<F: FnOnce() -> String>(self, what: F) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| {
            let mut e = e.into();
            e.context.push(what.into());
            e
        })
    }

    fn with_context<F: FnOnce() -> String>(self, what: F) -> Result<T> {
        self.map_err(|e| {
            let mut e = e.into();
            e.context.push(what());
            e
        })
    }
}
