//! Giving back the memory a burst left in a table: subscription churn or a
//! storm of requests in flight grows hash maps that would otherwise keep
//! their size for the life of the process.

use std::collections::HashMap;

/// Tables smaller than this are left as they are.
pub const SHRINK_FROM: usize = 64;

/// Shrinks `map` when a burst left it mostly empty.
pub fn shrink_map<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > SHRINK_FROM && map.len() < map.capacity() / 4 {
        map.shrink_to_fit();
    }
}
