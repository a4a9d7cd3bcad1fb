//! Arithmetic in GF(2^8) and the small matrices the GF(2^8) codec needs.
//!
//! The field is GF(2)[x] modulo x^8 + x^4 + x^3 + x^2 + 1 (0x11D), the polynomial of
//! ISA-L, Jerasure's defaults and reed-solomon-erasure; x (the byte 2) generates its
//! multiplicative group, which is what makes the log/exp tables below complete.
//! Addition is XOR. Every table is computed at compile time from `mul_slow`, the
//! shift-and-add definition, so there is no table to trust that the tests cannot check.

/// x^8 + x^4 + x^3 + x^2 + 1, the low byte of which reduces a product past bit 7.
pub(crate) const POLY: u16 = 0x11D;

/// Carry-less multiplication modulo `POLY`, one bit of `b` at a time: the definition the
/// tables and every SIMD kernel are checked against.
pub(crate) const fn mul_slow(a: u8, b: u8) -> u8 {
    let mut a = a as u16;
    let mut b = b;
    let mut product: u16 = 0;
    while b != 0 {
        if b & 1 != 0 {
            product ^= a;
        }
        a <<= 1;
        if a & 0x100 != 0 {
            a ^= POLY;
        }
        b >>= 1;
    }
    product as u8
}

/// EXP[i] = 2^i, doubled in length (510 entries used) so that `EXP[log a + log b]`
/// needs no reduction modulo 255.
const EXP: [u8; 512] = {
    let mut table = [0u8; 512];
    let mut value: u8 = 1;
    let mut i = 0;
    while i < 512 {
        table[i] = value;
        value = mul_slow(value, 2);
        i += 1;
    }
    table
};

/// LOG[a] = i with 2^i = a, for a != 0 (LOG[0] is unused and left 0).
const LOG: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 255 {
        table[EXP[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// MUL[a][b] = a * b: 64 KiB, used by the scalar kernel one 256-byte row at a time (the
/// row of a coefficient stays in L1 while a stripe is multiplied by it).
pub(crate) static MUL: [[u8; 256]; 256] = {
    let mut table = [[0u8; 256]; 256];
    let mut a = 1;
    while a < 256 {
        let mut b = 1;
        while b < 256 {
            table[a][b] = EXP[LOG[a] as usize + LOG[b] as usize];
            b += 1;
        }
        a += 1;
    }
    table
};

pub(crate) fn mul(a: u8, b: u8) -> u8 {
    MUL[usize::from(a)][usize::from(b)]
}

/// The multiplicative inverse; `None` for 0.
pub(crate) fn inv(a: u8) -> Option<u8> {
    (a != 0).then(|| EXP[255 - usize::from(LOG[usize::from(a)])])
}

/// The bit matrix of "multiply by `c`" in the layout of GF2P8AFFINEQB (Intel SDM: result
/// bit i = parity(matrix byte 7 - i AND source byte)). Multiplication by a constant is
/// linear over GF(2), so any field polynomial works with the instruction, not only its
/// built-in 0x11B: row i has bit j set when bit i of c * x^j is set.
pub(crate) fn affine_matrix(c: u8) -> u64 {
    let mut matrix = 0u64;
    for i in 0..8 {
        let mut row = 0u8;
        for j in 0..8 {
            if mul(c, 1 << j) >> i & 1 != 0 {
                row |= 1 << j;
            }
        }
        matrix |= u64::from(row) << (8 * (7 - i));
    }
    matrix
}

/// The split-nibble tables of "multiply by `c`" for PSHUFB: bytes 0..16 hold c * n and
/// bytes 16..32 hold c * (n << 4) for n in 0..16, so c * x = lo[x & 15] ^ hi[x >> 4].
pub(crate) fn nibble_tables(c: u8) -> [u8; 32] {
    let mut tables = [0u8; 32];
    for n in 0..16u8 {
        tables[usize::from(n)] = mul(c, n);
        tables[16 + usize::from(n)] = mul(c, n << 4);
    }
    tables
}

/// The parity rows of the systematic Cauchy code: row p, column j is 1 / ((k + p) ^ j),
/// ISA-L's `gf_gen_cauchy1_matrix`. Every square submatrix of a Cauchy matrix is
/// invertible, and so (by expanding along the identity rows) is every k x k submatrix of
/// [I; C]: any k of the M shards determine the data. x_p = k + p and y_j = j are distinct
/// field elements while M <= 256, so no denominator is zero.
pub(crate) fn cauchy_parity(data: usize, total: usize) -> Vec<u8> {
    assert!(
        total <= 256,
        "the Cauchy construction needs M distinct field elements"
    );
    let mut rows = Vec::with_capacity((total - data) * data);
    for p in data..total {
        for j in 0..data {
            rows.push(inv((p ^ j) as u8).expect("p != j, so p ^ j != 0"));
        }
    }
    rows
}

/// Inverts an n x n row-major matrix by Gauss-Jordan elimination; `None` if singular.
pub(crate) fn invert(matrix: &[u8], n: usize) -> Option<Vec<u8>> {
    assert_eq!(matrix.len(), n * n);
    let mut a = matrix.to_vec();
    let mut b = vec![0u8; n * n];
    for i in 0..n {
        b[i * n + i] = 1;
    }
    for col in 0..n {
        let pivot = (col..n).find(|&row| a[row * n + col] != 0)?;
        if pivot != col {
            for j in 0..n {
                a.swap(pivot * n + j, col * n + j);
                b.swap(pivot * n + j, col * n + j);
            }
        }
        let scale = inv(a[col * n + col]).expect("pivot is non-zero");
        for j in 0..n {
            a[col * n + j] = mul(a[col * n + j], scale);
            b[col * n + j] = mul(b[col * n + j], scale);
        }
        for row in 0..n {
            let factor = a[row * n + col];
            if row == col || factor == 0 {
                continue;
            }
            for j in 0..n {
                a[row * n + j] ^= mul(factor, a[col * n + j]);
                b[row * n + j] ^= mul(factor, b[col * n + j]);
            }
        }
    }
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_agree_with_the_definition() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(mul(a, b), mul_slow(a, b), "{a} * {b}");
            }
        }
    }

    #[test]
    fn the_field_axioms_hold() {
        // 2 generates the group: its powers visit all 255 non-zero elements.
        let mut seen = [false; 256];
        for &e in &EXP[..255] {
            assert!(!seen[usize::from(e)], "2 has order < 255 under 0x11D");
            seen[usize::from(e)] = true;
        }
        assert!(!seen[0]);
        assert_eq!(inv(0), None);
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a).unwrap()), 1, "inverse of {a}");
            assert_eq!(mul(a, 1), a);
            assert_eq!(mul(a, 0), 0);
        }
        // Distributivity on a sample: a * (b ^ c) = a * b ^ a * c.
        for a in (0..=255u8).step_by(7) {
            for b in (0..=255u8).step_by(5) {
                for c in (0..=255u8).step_by(3) {
                    assert_eq!(mul(a, b ^ c), mul(a, b) ^ mul(a, c));
                }
            }
        }
    }

    #[test]
    fn affine_matrix_and_nibble_tables_multiply() {
        // Evaluate the GF2P8AFFINEQB definition in software.
        fn affine(matrix: u64, x: u8) -> u8 {
            (0..8).fold(0u8, |out, i| {
                let row = (matrix >> (8 * (7 - i))) as u8;
                out | ((((row & x).count_ones() & 1) as u8) << i)
            })
        }
        for c in 0..=255u8 {
            let matrix = affine_matrix(c);
            let tables = nibble_tables(c);
            for x in 0..=255u8 {
                assert_eq!(affine(matrix, x), mul(c, x));
                let split = tables[usize::from(x & 15)] ^ tables[16 + usize::from(x >> 4)];
                assert_eq!(split, mul(c, x));
            }
        }
    }

    #[test]
    fn inversion_round_trips_and_detects_singular() {
        let (k, m) = (5, 9);
        let parity = cauchy_parity(k, m);
        // Rows 1, 3 of the identity and parity rows 0, 2, 3.
        let mut sub = vec![0u8; k * k];
        sub[1] = 1;
        sub[k + 3] = 1;
        for (r, p) in [0, 2, 3].into_iter().enumerate() {
            sub[(r + 2) * k..(r + 3) * k].copy_from_slice(&parity[p * k..(p + 1) * k]);
        }
        let inverse = invert(&sub, k).unwrap();
        for i in 0..k {
            for j in 0..k {
                let dot = (0..k).fold(0, |acc, t| acc ^ mul(sub[i * k + t], inverse[t * k + j]));
                assert_eq!(dot, u8::from(i == j));
            }
        }
        let mut singular = sub.clone();
        singular.copy_within(0..k, k);
        assert_eq!(invert(&singular, k), None);
    }
}
