//! Multiply-accumulate over GF(2^8): `outputs[r] = sum over i of coeffs[r][i] * inputs[i]`,
//! byte by byte, the one operation both encoding and decoding reduce to.
//!
//! Each kernel walks the shards in the dot-product order of ISA-L's `gf_vect_dot_prod`: at
//! each vector position it loads every input once and folds it into up to `GROUP` output
//! accumulators held in registers, then stores each output once. Outputs beyond `GROUP`
//! take further passes, and `dot` walks the shards in stripes so that those passes find
//! the inputs still in L1/L2.
//!
//! The kernels, best first (chosen at run time, see `Kernel::detect`):
//! - GFNI (`gf2p8affineqb`) on 512- or 256-bit vectors: "multiply by c" is one 8x8 bit
//!   matrix per coefficient, one instruction per input vector and output.
//! - PSHUFB split-nibble tables on AVX-512BW or AVX2: c * x = lo[x & 15] ^ hi[x >> 4], two
//!   16-entry lookups per input vector and output.
//! - Scalar: one 256-byte row of the multiplication table per coefficient. Every SIMD
//!   kernel is tested against it, and it against the field's definition.

use super::field;

/// Outputs accumulated in registers per pass: 4 accumulators plus the input and the
/// coefficient operands fit the 16 vector registers of AVX2 with room to spare, and no
/// code here needs more than 4 outputs per pass in normal operation (4 parity shards).
const GROUP: usize = 4;

/// Bytes of each shard processed before moving to the next stripe. With up to 63 inputs
/// a stripe of all of them stays within L2 (63 x 4 KiB = 252 KiB); with 10 inputs it fits
/// L1 (40 KiB of 48).
const STRIPE: usize = 4096;

/// An implementation of the multiply-accumulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Table lookups, one byte at a time; runs everywhere.
    Scalar,
    /// PSHUFB nibble tables on 256-bit vectors.
    Avx2,
    /// PSHUFB nibble tables on 512-bit vectors.
    Avx512Bw,
    /// GF2P8AFFINEQB on 256-bit vectors (GFNI without AVX-512, e.g. Alder Lake).
    GfniAvx2,
    /// GF2P8AFFINEQB on 512-bit vectors.
    GfniAvx512,
}

impl Kernel {
    /// Every kernel, slowest first.
    pub const ALL: [Kernel; 5] = [
        Kernel::Scalar,
        Kernel::Avx2,
        Kernel::Avx512Bw,
        Kernel::GfniAvx2,
        Kernel::GfniAvx512,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Bw => "avx512bw",
            Kernel::GfniAvx2 => "gfni-avx2",
            Kernel::GfniAvx512 => "gfni-avx512",
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bw => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::GfniAvx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("gfni")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::GfniAvx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("gfni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The kernels this CPU can run, slowest first.
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// The fastest kernel this CPU can run (detected once).
    pub fn detect() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            Kernel::available()
                .pop()
                .expect("the scalar kernel is always available")
        })
    }
}

/// `outputs[r] = sum_i coeffs[r * n + i] * inputs[i]` with n = `inputs.len()`, over every
/// byte; all slices have one length. Falls back to the scalar kernel if `kernel` cannot
/// run here.
pub(crate) fn dot(kernel: Kernel, coeffs: &[u8], inputs: &[&[u8]], outputs: &mut [&mut [u8]]) {
    let n = inputs.len();
    assert_eq!(
        coeffs.len(),
        n * outputs.len(),
        "one coefficient per input and output"
    );
    let Some(len) = inputs.first().map(|s| s.len()) else {
        // No inputs: every output is the empty sum.
        outputs.iter_mut().for_each(|o| o.fill(0));
        return;
    };
    assert!(
        inputs.iter().all(|s| s.len() == len) && outputs.iter().all(|s| s.len() == len),
        "inputs and outputs have one length"
    );
    let kernel = if kernel.is_available() {
        kernel
    } else {
        Kernel::Scalar
    };
    // Coefficients in the form the kernel consumes, per group of outputs, input-major
    // (entry i * width + r) so that the inner loop reads them in order.
    let groups: Vec<Prepared> = coeffs
        .chunks(GROUP * n)
        .map(|rows| Prepared::new(kernel, rows, n))
        .collect();
    let mut start = 0;
    while start < len {
        let end = (start + STRIPE).min(len);
        for (prepared, outs) in groups.iter().zip(outputs.chunks_mut(GROUP)) {
            prepared.run(inputs, outs, start, end);
        }
        start = end;
    }
}

/// One group's coefficients, expanded for one kernel.
struct Prepared<'a> {
    kernel: Kernel,
    /// The raw coefficients, row-major (what the scalar kernel and the tails use).
    rows: &'a [u8],
    width: usize,
    /// GFNI: an affine matrix per (input, output), input-major.
    matrices: Vec<u64>,
    /// PSHUFB: nibble tables per (input, output), input-major.
    tables: Vec<[u8; 32]>,
}

impl<'a> Prepared<'a> {
    fn new(kernel: Kernel, rows: &'a [u8], n: usize) -> Self {
        let width = rows.len() / n;
        let input_major = (0..n).flat_map(|i| (0..width).map(move |r| rows[r * n + i]));
        let (mut matrices, mut tables) = (Vec::new(), Vec::new());
        match kernel {
            Kernel::GfniAvx2 | Kernel::GfniAvx512 => {
                matrices = input_major.map(field::affine_matrix).collect();
            }
            Kernel::Avx2 | Kernel::Avx512Bw => {
                tables = input_major.map(field::nibble_tables).collect();
            }
            Kernel::Scalar => {}
        }
        Self {
            kernel,
            rows,
            width,
            matrices,
            tables,
        }
    }

    /// Computes bytes `start..end` of this group's outputs.
    fn run(&self, inputs: &[&[u8]], outputs: &mut [&mut [u8]], start: usize, end: usize) {
        debug_assert_eq!(outputs.len(), self.width);
        let done = match self.kernel {
            Kernel::Scalar => start,
            #[cfg(target_arch = "x86_64")]
            Kernel::GfniAvx512 => match self.width {
                // SAFETY: `dot` only chooses a kernel that `is_available` on this CPU, so
                // the target features these functions are compiled for are present.
                1 => unsafe { x86::gfni512::<1>(&self.matrices, inputs, outputs, start, end) },
                // SAFETY: as above.
                2 => unsafe { x86::gfni512::<2>(&self.matrices, inputs, outputs, start, end) },
                // SAFETY: as above.
                3 => unsafe { x86::gfni512::<3>(&self.matrices, inputs, outputs, start, end) },
                // SAFETY: as above.
                _ => unsafe { x86::gfni512::<4>(&self.matrices, inputs, outputs, start, end) },
            },
            #[cfg(target_arch = "x86_64")]
            Kernel::GfniAvx2 => match self.width {
                // SAFETY: as above.
                1 => unsafe { x86::gfni256::<1>(&self.matrices, inputs, outputs, start, end) },
                // SAFETY: as above.
                2 => unsafe { x86::gfni256::<2>(&self.matrices, inputs, outputs, start, end) },
                // SAFETY: as above.
                3 => unsafe { x86::gfni256::<3>(&self.matrices, inputs, outputs, start, end) },
                // SAFETY: as above.
                _ => unsafe { x86::gfni256::<4>(&self.matrices, inputs, outputs, start, end) },
            },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bw => match self.width {
                // SAFETY: as above.
                1 => unsafe { x86::pshufb512::<1>(&self.tables, inputs, outputs, start, end) },
                // SAFETY: as above.
                2 => unsafe { x86::pshufb512::<2>(&self.tables, inputs, outputs, start, end) },
                // SAFETY: as above.
                3 => unsafe { x86::pshufb512::<3>(&self.tables, inputs, outputs, start, end) },
                // SAFETY: as above.
                _ => unsafe { x86::pshufb512::<4>(&self.tables, inputs, outputs, start, end) },
            },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => match self.width {
                // SAFETY: as above.
                1 => unsafe { x86::pshufb256::<1>(&self.tables, inputs, outputs, start, end) },
                // SAFETY: as above.
                2 => unsafe { x86::pshufb256::<2>(&self.tables, inputs, outputs, start, end) },
                // SAFETY: as above.
                3 => unsafe { x86::pshufb256::<3>(&self.tables, inputs, outputs, start, end) },
                // SAFETY: as above.
                _ => unsafe { x86::pshufb256::<4>(&self.tables, inputs, outputs, start, end) },
            },
            #[cfg(not(target_arch = "x86_64"))]
            _ => start,
        };
        // The vector kernels stop at the last whole vector; the scalar kernel does the rest
        // (all of it for Kernel::Scalar).
        if done < end {
            scalar(self.rows, inputs, outputs, done, end);
        }
    }
}

/// The portable kernel: bytes `start..end` of every output.
fn scalar(rows: &[u8], inputs: &[&[u8]], outputs: &mut [&mut [u8]], start: usize, end: usize) {
    let n = inputs.len();
    for (r, output) in outputs.iter_mut().enumerate() {
        let out = &mut output[start..end];
        out.fill(0);
        for (input, &c) in inputs.iter().zip(&rows[r * n..(r + 1) * n]) {
            let row = &field::MUL[usize::from(c)];
            for (o, &x) in out.iter_mut().zip(&input[start..end]) {
                *o ^= row[usize::from(x)];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The vector kernels. Each is a safe function compiled for its target features; the
    //! caller proves the features are present. Each computes whole vectors from `start`
    //! while they fit before `end` and returns where it stopped. Loads and stores go
    //! through bounds-checked subslices of exactly one vector, so the only unsafe
    //! operation is the unaligned load or store the intrinsic takes a pointer for.

    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,gfni")]
    pub(super) fn gfni512<const R: usize>(
        matrices: &[u64],
        inputs: &[&[u8]],
        outputs: &mut [&mut [u8]],
        start: usize,
        end: usize,
    ) -> usize {
        const W: usize = 64;
        let (matrices, _) = matrices.as_chunks::<R>();
        assert!(matrices.len() == inputs.len() && outputs.len() == R);
        let mut off = start;
        while off + W <= end {
            let mut acc = [_mm512_setzero_si512(); R];
            for (input, m) in inputs.iter().zip(matrices) {
                let src = &input[off..off + W];
                // SAFETY: `src` is W readable bytes; loadu has no alignment requirement.
                let x = unsafe { _mm512_loadu_si512(src.as_ptr().cast()) };
                for r in 0..R {
                    let a = _mm512_set1_epi64(m[r] as i64);
                    acc[r] = _mm512_xor_si512(acc[r], _mm512_gf2p8affine_epi64_epi8::<0>(x, a));
                }
            }
            for (output, value) in outputs.iter_mut().zip(acc) {
                let dst = &mut output[off..off + W];
                // SAFETY: `dst` is W writable bytes; storeu has no alignment requirement.
                unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), value) };
            }
            off += W;
        }
        off
    }

    #[target_feature(enable = "avx2,gfni")]
    pub(super) fn gfni256<const R: usize>(
        matrices: &[u64],
        inputs: &[&[u8]],
        outputs: &mut [&mut [u8]],
        start: usize,
        end: usize,
    ) -> usize {
        const W: usize = 32;
        let (matrices, _) = matrices.as_chunks::<R>();
        assert!(matrices.len() == inputs.len() && outputs.len() == R);
        let mut off = start;
        while off + W <= end {
            let mut acc = [_mm256_setzero_si256(); R];
            for (input, m) in inputs.iter().zip(matrices) {
                let src = &input[off..off + W];
                // SAFETY: `src` is W readable bytes; loadu has no alignment requirement.
                let x = unsafe { _mm256_loadu_si256(src.as_ptr().cast()) };
                for r in 0..R {
                    let a = _mm256_set1_epi64x(m[r] as i64);
                    acc[r] = _mm256_xor_si256(acc[r], _mm256_gf2p8affine_epi64_epi8::<0>(x, a));
                }
            }
            for (output, value) in outputs.iter_mut().zip(acc) {
                let dst = &mut output[off..off + W];
                // SAFETY: `dst` is W writable bytes; storeu has no alignment requirement.
                unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), value) };
            }
            off += W;
        }
        off
    }

    /// The low and high nibble tables of one coefficient, each repeated in every 128-bit
    /// lane (PSHUFB looks up within lanes).
    #[target_feature(enable = "avx512f")]
    fn tables512(t: &[u8; 32]) -> (__m512i, __m512i) {
        // SAFETY: `t` is 32 readable bytes, two 16-byte loads without alignment needs.
        let lo = unsafe { _mm_loadu_si128(t.as_ptr().cast()) };
        // SAFETY: as above, bytes 16..32.
        let hi = unsafe { _mm_loadu_si128(t[16..].as_ptr().cast()) };
        (_mm512_broadcast_i32x4(lo), _mm512_broadcast_i32x4(hi))
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn pshufb512<const R: usize>(
        tables: &[[u8; 32]],
        inputs: &[&[u8]],
        outputs: &mut [&mut [u8]],
        start: usize,
        end: usize,
    ) -> usize {
        const W: usize = 64;
        let (tables, _) = tables.as_chunks::<R>();
        assert!(tables.len() == inputs.len() && outputs.len() == R);
        let nibble = _mm512_set1_epi8(0x0f);
        let mut off = start;
        while off + W <= end {
            let mut acc = [_mm512_setzero_si512(); R];
            for (input, t) in inputs.iter().zip(tables) {
                let src = &input[off..off + W];
                // SAFETY: `src` is W readable bytes; loadu has no alignment requirement.
                let x = unsafe { _mm512_loadu_si512(src.as_ptr().cast()) };
                let lo = _mm512_and_si512(x, nibble);
                let hi = _mm512_and_si512(_mm512_srli_epi64::<4>(x), nibble);
                for r in 0..R {
                    let (tlo, thi) = tables512(&t[r]);
                    // 0x96 is the truth table of a ^ b ^ c.
                    acc[r] = _mm512_ternarylogic_epi64::<0x96>(
                        acc[r],
                        _mm512_shuffle_epi8(tlo, lo),
                        _mm512_shuffle_epi8(thi, hi),
                    );
                }
            }
            for (output, value) in outputs.iter_mut().zip(acc) {
                let dst = &mut output[off..off + W];
                // SAFETY: `dst` is W writable bytes; storeu has no alignment requirement.
                unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), value) };
            }
            off += W;
        }
        off
    }

    #[target_feature(enable = "avx2")]
    fn tables256(t: &[u8; 32]) -> (__m256i, __m256i) {
        // SAFETY: `t` is 32 readable bytes, two 16-byte loads without alignment needs.
        let lo = unsafe { _mm_loadu_si128(t.as_ptr().cast()) };
        // SAFETY: as above, bytes 16..32.
        let hi = unsafe { _mm_loadu_si128(t[16..].as_ptr().cast()) };
        (
            _mm256_broadcastsi128_si256(lo),
            _mm256_broadcastsi128_si256(hi),
        )
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn pshufb256<const R: usize>(
        tables: &[[u8; 32]],
        inputs: &[&[u8]],
        outputs: &mut [&mut [u8]],
        start: usize,
        end: usize,
    ) -> usize {
        const W: usize = 32;
        let (tables, _) = tables.as_chunks::<R>();
        assert!(tables.len() == inputs.len() && outputs.len() == R);
        let nibble = _mm256_set1_epi8(0x0f);
        let mut off = start;
        while off + W <= end {
            let mut acc = [_mm256_setzero_si256(); R];
            for (input, t) in inputs.iter().zip(tables) {
                let src = &input[off..off + W];
                // SAFETY: `src` is W readable bytes; loadu has no alignment requirement.
                let x = unsafe { _mm256_loadu_si256(src.as_ptr().cast()) };
                let lo = _mm256_and_si256(x, nibble);
                let hi = _mm256_and_si256(_mm256_srli_epi64::<4>(x), nibble);
                for r in 0..R {
                    let (tlo, thi) = tables256(&t[r]);
                    let product = _mm256_xor_si256(
                        _mm256_shuffle_epi8(tlo, lo),
                        _mm256_shuffle_epi8(thi, hi),
                    );
                    acc[r] = _mm256_xor_si256(acc[r], product);
                }
            }
            for (output, value) in outputs.iter_mut().zip(acc) {
                let dst = &mut output[off..off + W];
                // SAFETY: `dst` is W writable bytes; storeu has no alignment requirement.
                unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), value) };
            }
            off += W;
        }
        off
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The definition, byte by byte, with the field's shift-and-add multiplication.
    fn reference(coeffs: &[u8], inputs: &[Vec<u8>], len: usize) -> Vec<Vec<u8>> {
        let n = inputs.len();
        (0..coeffs.len().checked_div(n).unwrap_or(0))
            .map(|r| {
                (0..len)
                    .map(|b| {
                        (0..n).fold(0, |acc, i| {
                            acc ^ field::mul_slow(coeffs[r * n + i], inputs[i][b])
                        })
                    })
                    .collect()
            })
            .collect()
    }

    fn run(kernel: Kernel, coeffs: &[u8], inputs: &[Vec<u8>], len: usize) -> Vec<Vec<u8>> {
        let rows = coeffs.len() / inputs.len();
        // Outputs start as garbage: kernels must overwrite, not accumulate into them.
        let mut outputs = vec![vec![0xA5u8; len]; rows];
        let ins: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
        let mut outs: Vec<&mut [u8]> = outputs.iter_mut().map(Vec::as_mut_slice).collect();
        dot(kernel, coeffs, &ins, &mut outs);
        outputs
    }

    #[test]
    fn this_machine_runs_a_vector_kernel() {
        // Not an assertion about every machine: a record in the test log of what ran.
        eprintln!(
            "available kernels: {:?}, chosen: {:?}",
            Kernel::available(),
            Kernel::detect()
        );
    }

    #[test]
    fn all_coefficients_against_the_definition() {
        // Every coefficient, times every byte value, in every kernel: 256 outputs of one
        // input holding 0..=255 twice (512 bytes, so vectors and tails both run).
        let input: Vec<u8> = (0..512).map(|i| i as u8).collect();
        let coeffs: Vec<u8> = (0..=255).collect();
        for kernel in Kernel::available() {
            for group in coeffs.chunks(3) {
                let got = run(kernel, group, std::slice::from_ref(&input), input.len());
                let want = reference(group, std::slice::from_ref(&input), input.len());
                assert_eq!(got, want, "{kernel:?}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every available kernel equals the definition on random inputs of odd lengths,
        /// for 1 to 12 inputs and 1 to 9 outputs (so groups of 4 split unevenly), across
        /// stripe boundaries.
        #[test]
        fn kernels_equal_the_definition(
            n in 1usize..=12,
            rows in 1usize..=9,
            len in prop_oneof![0usize..200, 4000usize..9000],
            seed in any::<u64>(),
        ) {
            let mut state = seed | 1;
            let mut next = move || {
                // Marsaglia's xorshift64 (shifts 13, 7, 17): cheap, deterministic bytes.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            };
            let inputs: Vec<Vec<u8>> = (0..n).map(|_| (0..len).map(|_| next()).collect()).collect();
            let coeffs: Vec<u8> = (0..n * rows).map(|_| next()).collect();
            let want = reference(&coeffs, &inputs, len);
            for kernel in Kernel::available() {
                prop_assert_eq!(&run(kernel, &coeffs, &inputs, len), &want, "{:?}", kernel);
            }
        }
    }

    #[test]
    fn an_unavailable_kernel_falls_back_to_scalar() {
        let inputs = vec![vec![7u8; 100], vec![9u8; 100]];
        let coeffs = [3, 5, 1, 1];
        let want = reference(&coeffs, &inputs, 100);
        for kernel in Kernel::ALL {
            assert_eq!(run(kernel, &coeffs, &inputs, 100), want, "{kernel:?}");
        }
    }
}
