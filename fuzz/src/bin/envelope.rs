//! What arrives from Redis: pub/sub envelopes and stored items.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        use ringcast::backplane::envelope::{decode_item, decode_message, Incoming};
        if let Ok(Incoming::Sequenced { items, .. }) = decode_message(data) {
            for item in items {
                let _ = decode_item(item);
            }
        }
        let _ = decode_item(data);
        let _ = ringcast::backplane::envelope::raw_data(data);
    });
}
