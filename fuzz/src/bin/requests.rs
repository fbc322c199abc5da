//! Client requests in both formats: the first byte picks the format.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&pick, payload)) = data.split_first() else {
            return;
        };
        let format = if pick & 1 == 0 {
            ringcast::protocol::Format::Json
        } else {
            ringcast::protocol::Format::MsgPack
        };
        let _ = ringcast::protocol::decode_requests(format, payload, 1000);
    });
}
