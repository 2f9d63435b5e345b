//! Refcount block entries of any width (1 to 64 bits).

/// Read entry `idx` of a refcount block (`buf`) with `1 << order` bit entries.
pub fn get(buf: &[u8], order: u32, idx: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = idx * bits;
            let byte = buf[bit / 8];
            ((byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8) as u64
        }
        3 => buf[idx] as u64,
        4 => u16::from_be_bytes([buf[idx * 2], buf[idx * 2 + 1]]) as u64,
        5 => u32::from_be_bytes(buf[idx * 4..idx * 4 + 4].try_into().unwrap()) as u64,
        _ => u64::from_be_bytes(buf[idx * 8..idx * 8 + 8].try_into().unwrap()),
    }
}

/// Set entry `idx` to `v` (which must fit the width).
pub fn set(buf: &mut [u8], order: u32, idx: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = idx * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let b = &mut buf[bit / 8];
            *b = (*b & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
        3 => buf[idx] = v as u8,
        4 => buf[idx * 2..idx * 2 + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => buf[idx * 4..idx * 4 + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => buf[idx * 8..idx * 8 + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

/// Largest refcount representable with `1 << order` bits.
pub fn max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_widths() {
        for order in 0..=6u32 {
            let mut buf = vec![0u8; 512];
            let n = (512 * 8) >> order;
            for i in 0..n {
                set(&mut buf, order, i, (i as u64 * 7 + 3) & max(order));
            }
            for i in 0..n {
                assert_eq!(
                    get(&buf, order, i),
                    (i as u64 * 7 + 3) & max(order),
                    "order {order} idx {i}"
                );
            }
        }
    }
}
