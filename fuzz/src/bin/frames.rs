//! The WebSocket frame reader: any bytes from a client, split in two
//! reads at a point the input chooses, never panic.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&cut, rest)) = data.split_first() else {
            return;
        };
        let mut bytes = rest.to_vec();
        let cut = (cut as usize).min(bytes.len());
        let (a, b) = bytes.split_at_mut(cut);
        let mut reader = ringcast::ws::frame::WsReader::default();
        let mut on = |_: ringcast::ws::frame::Incoming<'_>| true;
        if reader.feed(a, 4096, &mut on).is_ok() {
            let _ = reader.feed(b, 4096, &mut on);
        }
    });
}
