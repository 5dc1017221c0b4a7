//! A tiny deterministic PRNG for the synthetic cluster (SplitMix64): the same seed always gives
//! the same cluster, on every platform, with no dependency.
//!
//! Must not: be used for anything that needs unpredictability.

/// Kubernetes' generated-name alphabet (no vowels, no look-alike digits).
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// `n` in Kubernetes' name alphabet, zero-padded to `width`: unique per `n`, unlike random
/// suffixes, which collide at a million pods.
pub fn name_suffix(mut n: u64, width: usize) -> String {
    let base = NAME_ALPHABET.len() as u64;
    let mut out = vec![NAME_ALPHABET[0]; width];
    for slot in out.iter_mut().rev() {
        *slot = NAME_ALPHABET[(n % base) as usize];
        n /= base;
    }
    String::from_utf8(out).unwrap_or_default()
}

#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, from the top 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)`; `n` must be positive. The modulo bias is irrelevant at our sizes.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// 64 lowercase hex digits, the shape of a container ID.
    pub fn hex64(&mut self) -> String {
        let mut s = String::with_capacity(64);
        for _ in 0..4 {
            s.push_str(&format!("{:016x}", self.next_u64()));
        }
        s
    }

    /// `n` random characters from the alphabet Kubernetes uses for generated name suffixes.
    pub fn alnum(&mut self, n: usize) -> String {
        (0..n).map(|_| NAME_ALPHABET[self.below(NAME_ALPHABET.len())] as char).collect()
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        let a: Vec<u64> = { let mut r = SplitMix64::new(7); (0..4).map(|_| r.next_u64()).collect() };
        let b: Vec<u64> = { let mut r = SplitMix64::new(7); (0..4).map(|_| r.next_u64()).collect() };
        let c: Vec<u64> = { let mut r = SplitMix64::new(8); (0..4).map(|_| r.next_u64()).collect() };
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut r = SplitMix64::new(1);
        assert!((0..1000).all(|_| (0.0..1.0).contains(&r.unit())));
        assert_eq!(r.hex64().len(), 64);
    }
}
