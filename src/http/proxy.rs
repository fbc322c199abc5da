//! The client's address when a trusted proxy stands in front, without I/O:
//! from the PROXY protocol v2 header the proxy sends before anything else
//! (`--proxy-protocol`), or from the `X-Forwarded-For` header of an HTTP
//! proxy. Only peers in `--trusted-proxies` are believed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The first 12 bytes of every PROXY v2 header.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part: signature, version and command, family, length.
pub const FIXED: usize = 16;
/// Longest address block read (TLVs beyond the addresses included).
pub const MAX_BODY: usize = 512;

/// Why a PROXY v2 header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("the connection did not start with a PROXY protocol v2 header")]
    NoSignature,
    #[error("unsupported PROXY protocol version or command")]
    BadCommand,
    #[error("the PROXY header is longer than {MAX_BODY} bytes")]
    TooLong,
    #[error("the PROXY header's addresses are cut short")]
    CutShort,
}

/// Reads the fixed part: how many bytes of addresses follow.
pub fn body_length(fixed: &[u8; FIXED]) -> Result<usize, ProxyError> {
    if fixed[..12] != SIGNATURE {
        return Err(ProxyError::NoSignature);
    }
    // Version 2, command LOCAL (0) or PROXY (1).
    if fixed[12] >> 4 != 2 || fixed[12] & 0x0f > 1 {
        return Err(ProxyError::BadCommand);
    }
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    if len > MAX_BODY {
        return Err(ProxyError::TooLong);
    }
    Ok(len)
}

/// The client's address from the fixed part and its body: `None` for a
/// LOCAL command (the proxy's own health check) or an unspecified
/// family, when the peer's address stands.
pub fn source(fixed: &[u8; FIXED], body: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    if fixed[12] & 0x0f == 0 {
        return Ok(None);
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match fixed[13] >> 4 {
        // AF_INET: src(4) dst(4) sport(2) dport(2).
        1 => {
            let b = body.get(..12).ok_or(ProxyError::CutShort)?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port(&b[8..10]))))
        }
        // AF_INET6: src(16) dst(16) sport(2) dport(2).
        2 => {
            let b = body.get(..36).ok_or(ProxyError::CutShort)?;
            let mut raw = [0u8; 16];
            raw.copy_from_slice(&b[..16]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(raw)),
                port(&b[32..34]),
            )))
        }
        _ => Ok(None),
    }
}

/// The client's address from `X-Forwarded-For` values (each header a
/// comma-separated list, oldest first): the right-most address that is
/// not one of the trusted proxies, as the ones to its right are.
pub fn forwarded_for<'a>(
    values: impl Iterator<Item = &'a str>,
    trusted: impl Fn(IpAddr) -> bool,
) -> Option<IpAddr> {
    let hops: Vec<&str> = values.flat_map(|v| v.split(',')).collect();
    for hop in hops.iter().rev() {
        let ip: IpAddr = hop.trim().parse().ok()?;
        if !trusted(ip) {
            return Some(ip);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(command: u8, family: u8, body: &[u8]) -> ([u8; FIXED], Vec<u8>) {
        let mut fixed = [0u8; FIXED];
        fixed[..12].copy_from_slice(&SIGNATURE);
        fixed[12] = 0x20 | command;
        fixed[13] = family;
        fixed[14..].copy_from_slice(&(body.len() as u16).to_be_bytes());
        (fixed, body.to_vec())
    }

    #[test]
    fn ipv4_and_ipv6_sources_are_read() {
        let v4 = [203, 0, 113, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x01, 0xbb];
        let (fixed, body) = header(1, 0x11, &v4);
        assert_eq!(body_length(&fixed), Ok(12));
        assert_eq!(
            source(&fixed, &body),
            Ok(Some("203.0.113.9:8080".parse().unwrap()))
        );
        let mut v6 = vec![0u8; 36];
        v6[..16].copy_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        v6[32..34].copy_from_slice(&443u16.to_be_bytes());
        let (fixed, body) = header(1, 0x21, &v6);
        assert_eq!(
            source(&fixed, &body),
            Ok(Some("[2001:db8::7]:443".parse().unwrap()))
        );
        let (local, body) = header(0, 0x00, &[]);
        assert_eq!(source(&local, &body), Ok(None), "LOCAL: the peer stands");
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut fixed = [0u8; FIXED];
        fixed[..4].copy_from_slice(b"GET ");
        assert_eq!(body_length(&fixed), Err(ProxyError::NoSignature));
        let (mut v1, _) = header(1, 0x11, &[0; 12]);
        v1[12] = 0x11;
        assert_eq!(body_length(&v1), Err(ProxyError::BadCommand));
        let (fixed, _) = header(1, 0x11, &[0; 600]);
        assert_eq!(body_length(&fixed), Err(ProxyError::TooLong));
        let (fixed, body) = header(1, 0x21, &[0; 12]);
        assert_eq!(source(&fixed, &body), Err(ProxyError::CutShort));
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_hop() {
        let trusted = |ip: IpAddr| ip.to_string().starts_with("10.");
        let got = forwarded_for(
            ["198.51.100.1, 203.0.113.5", "10.0.0.2"].into_iter(),
            trusted,
        );
        assert_eq!(
            got,
            Some("203.0.113.5".parse().unwrap()),
            "the left-most may be forged"
        );
        assert_eq!(forwarded_for(["10.0.0.1"].into_iter(), trusted), None);
        assert_eq!(forwarded_for(["not-an-ip"].into_iter(), trusted), None);
        assert_eq!(forwarded_for(std::iter::empty(), trusted), None);
    }
}
