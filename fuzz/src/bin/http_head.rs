//! The HTTP request head parser and the handshake check on what it parses.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(Some((head, _))) = ringcast::http::message::Head::parse(data) {
            let _ = ringcast::ws::handshake::check(&head);
            let _ = head.keep_alive();
            let _ = ringcast::auth::token_of(&head.path, head.header("authorization"));
        }
    });
}
