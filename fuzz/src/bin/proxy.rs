//! PROXY protocol v2 headers and X-Forwarded-For values.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        use ringcast::http::proxy;
        if data.len() >= proxy::FIXED {
            let mut fixed = [0u8; proxy::FIXED];
            fixed.copy_from_slice(&data[..proxy::FIXED]);
            if proxy::body_length(&fixed).is_ok() {
                let _ = proxy::source(&fixed, &data[proxy::FIXED..]);
            }
        }
        let text = String::from_utf8_lossy(data);
        let _ = proxy::forwarded_for(text.lines(), |ip| ip.is_loopback());
    });
}
