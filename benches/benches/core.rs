//! Core algorithms on 512 KiB chunks: erasure encode and decode, sealing, placement, and
//! memory bandwidth as the yardstick for all of them.
//!
//! Run: `cargo bench -p slapshot-benches` (add `-- --quick` for a fast pass).

use std::hint::black_box;

use aes::cipher::{KeyIvInit, StreamCipher};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sha2::{Digest, Sha256};
use slapshot_core::{
    CHUNK_SIZE, ChunkName, CodeParams, ErasureCodec, Member, Placement, Salt,
    chunk::{chunk_key, seal},
    erasure::{ErasureError, Gf256Codec, Kernel, ReedSolomonCodec, XorCodec},
};

fn chunk() -> Vec<u8> {
    let mut state = 0x1234_5678_u64;
    (0..CHUNK_SIZE)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect()
}

/// reed-solomon-erasure 6 with `simd-accel` (GF(2^8), its C kernels built with
/// -march=haswell), behind our trait so it is measured in the same run, on the same
/// shards, as our codec. Its decode wants every shard it reads mutable, so the parity
/// shards it reads are copied first (at most two 64-128 KiB copies here); data shards are
/// copied into the output and rebuilt in place, as ours are.
struct ReedSolomonErasure {
    params: CodeParams,
    rs: reed_solomon_erasure::galois_8::ReedSolomon,
}

impl ReedSolomonErasure {
    fn new(params: CodeParams) -> Self {
        Self {
            params,
            rs: reed_solomon_erasure::galois_8::ReedSolomon::new(params.data(), params.parity())
                .unwrap(),
        }
    }
}

impl ErasureCodec for ReedSolomonErasure {
    fn params(&self) -> CodeParams {
        self.params
    }

    fn encode(&self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, ErasureError> {
        let shard_len = self.params.shard_len(chunk.len());
        let mut shards: Vec<Vec<u8>> = (0..self.params.data())
            .map(|i| {
                let from = (i * shard_len).min(chunk.len());
                let to = ((i + 1) * shard_len).min(chunk.len());
                let mut shard = chunk[from..to].to_vec();
                shard.resize(shard_len, 0);
                shard
            })
            .collect();
        let mut parity = vec![vec![0u8; shard_len]; self.params.parity()];
        self.rs
            .encode_sep(&shards, &mut parity)
            .map_err(|e| ErasureError::ReedSolomon(e.to_string()))?;
        shards.extend(parity);
        Ok(shards)
    }

    fn decode(&self, chunk_len: usize, shards: &[(usize, &[u8])]) -> Result<Vec<u8>, ErasureError> {
        let (k, total) = (self.params.data(), self.params.total());
        let shard_len = self.params.shard_len(chunk_len);
        let mut slots: Vec<Option<&[u8]>> = vec![None; total];
        for &(i, s) in shards {
            slots[i] = Some(s);
        }
        let mut chunk = Vec::with_capacity(k * shard_len);
        for slot in &slots[..k] {
            match slot {
                Some(s) => chunk.extend_from_slice(s),
                None => chunk.resize(chunk.len() + shard_len, 0),
            }
        }
        if slots[..k].iter().any(Option::is_none) {
            let mut parity: Vec<Vec<u8>> = slots[k..]
                .iter()
                .map(|s| s.map(<[u8]>::to_vec).unwrap_or_default())
                .collect();
            let mut work: Vec<(&mut [u8], bool)> = chunk
                .chunks_exact_mut(shard_len)
                .zip(&slots[..k])
                .map(|(s, slot)| (s, slot.is_some()))
                .chain(
                    parity
                        .iter_mut()
                        .zip(&slots[k..])
                        .map(|(p, slot)| (p.as_mut_slice(), slot.is_some())),
                )
                .collect();
            self.rs
                .reconstruct_data(&mut work)
                .map_err(|e| ErasureError::ReedSolomon(e.to_string()))?;
        }
        chunk.truncate(chunk_len);
        Ok(chunk)
    }
}

fn codecs() -> Vec<(String, Box<dyn ErasureCodec>)> {
    let p = |k, m| CodeParams::new(k, m).unwrap();
    let mut codecs: Vec<(String, Box<dyn ErasureCodec>)> = vec![
        ("4-of-5 xor".into(), Box::new(XorCodec::new(p(4, 5)))),
        (
            "4-of-5 reed-solomon-simd".into(),
            Box::new(ReedSolomonCodec::new(p(4, 5))),
        ),
    ];
    for (k, m) in [(4, 6), (8, 10), (10, 14)] {
        codecs.push((
            format!("{k}-of-{m} gf256"),
            Box::new(Gf256Codec::new(p(k, m))),
        ));
        codecs.push((
            format!("{k}-of-{m} reed-solomon-simd"),
            Box::new(ReedSolomonCodec::new(p(k, m))),
        ));
        codecs.push((
            format!("{k}-of-{m} reed-solomon-erasure"),
            Box::new(ReedSolomonErasure::new(p(k, m))),
        ));
    }
    codecs
}

fn memory_bandwidth(c: &mut Criterion) {
    let src = chunk();
    let mut dst = vec![0u8; CHUNK_SIZE];
    let mut group = c.benchmark_group("memory");
    group.throughput(Throughput::Bytes(CHUNK_SIZE as u64));
    group.bench_function("memcpy 512 KiB", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });
    group.finish();

    // What the node's check of a shard read from flash costs: the buffer an O_DIRECT read
    // just filled is not in the CPU's caches, so its crc32 runs at the speed of memory,
    // not of the instructions. "from memory" walks 1 GiB, so that no buffer is cached.
    const SHARD: usize = 128 << 10;
    let mut group = c.benchmark_group("memory: crc32 of a shard");
    group.throughput(Throughput::Bytes(SHARD as u64));
    group.bench_function("128 KiB, cached", |b| {
        b.iter(|| crc32fast::hash(black_box(&src[..SHARD])))
    });
    let arena: Vec<u8> = (0..1usize << 30)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    group.bench_function("128 KiB, from memory", |b| {
        b.iter_custom(|iters| {
            let mut next = 0;
            let started = std::time::Instant::now();
            for _ in 0..iters {
                black_box(crc32fast::hash(&arena[next..next + SHARD]));
                next = (next + SHARD) % arena.len();
            }
            started.elapsed()
        })
    });
    group.finish();
}

/// The shards a read with the first `lost` data shards missing uses: the other data
/// shards and the first `lost` parity shards (what a late-binding read that lost the
/// race on `lost` data nodes gets).
fn without_data(shards: &[Vec<u8>], k: usize, lost: usize) -> Vec<(usize, &[u8])> {
    (lost..k + lost)
        .map(|i| (i, shards[i].as_slice()))
        .collect()
}

fn erasure(c: &mut Criterion) {
    let data = chunk();
    let mut group = c.benchmark_group("erasure");
    group.throughput(Throughput::Bytes(CHUNK_SIZE as u64));
    for (label, codec) in codecs() {
        let k = codec.params().data();
        let parity = codec.params().parity();
        group.bench_function(BenchmarkId::new("encode", &label), |b| {
            b.iter(|| codec.encode(black_box(&data)).unwrap())
        });
        let shards = codec.encode(&data).unwrap();
        // The normal read: the k data shards, no decoding.
        let data_only = without_data(&shards, k, 0);
        group.bench_function(BenchmarkId::new("decode data shards", &label), |b| {
            b.iter(|| codec.decode(CHUNK_SIZE, black_box(&data_only)).unwrap())
        });
        // Late binding's usual read (one data shard lost the race), two, and the worst
        // case: as many data shards lost as there is parity.
        let mut losses = vec![1, 2.min(parity), parity];
        losses.dedup();
        for lost in losses {
            let degraded = without_data(&shards, k, lost);
            assert_eq!(codec.decode(CHUNK_SIZE, &degraded).unwrap(), data);
            group.bench_function(
                BenchmarkId::new(format!("decode {lost} lost"), &label),
                |b| b.iter(|| codec.decode(CHUNK_SIZE, black_box(&degraded)).unwrap()),
            );
        }
        // What a fleet read does: the chunk in parts, the shards it received shared.
        for lost in [0, 1] {
            let owned: Vec<(usize, bytes::Bytes)> = without_data(&shards, k, lost)
                .into_iter()
                .map(|(i, s)| (i, bytes::Bytes::copy_from_slice(s)))
                .collect();
            assert_eq!(
                codec.decode_parts(CHUNK_SIZE, &owned).unwrap().concat(),
                data
            );
            group.bench_function(
                BenchmarkId::new(format!("decode_parts {lost} lost"), &label),
                |b| b.iter(|| codec.decode_parts(CHUNK_SIZE, black_box(&owned)).unwrap()),
            );
        }
    }
    group.finish();
}

/// The GF(2^8) codec with each multiply-accumulate kernel this CPU runs, on 8-of-10 with
/// two data shards lost (the decode) and on its encode. The group name starts with
/// "erasure" so that `-- erasure` selects it with the codecs.
fn gf256_kernels(c: &mut Criterion) {
    let data = chunk();
    let params = CodeParams::new(8, 10).unwrap();
    let mut group = c.benchmark_group("erasure gf256 kernels 8-of-10");
    group.throughput(Throughput::Bytes(CHUNK_SIZE as u64));
    for kernel in Kernel::available() {
        let codec = Gf256Codec::with_kernel(params, kernel);
        let shards = codec.encode(&data).unwrap();
        let degraded = without_data(&shards, 8, 2);
        group.bench_function(BenchmarkId::new("decode 2 lost", kernel.name()), |b| {
            b.iter(|| codec.decode(CHUNK_SIZE, black_box(&degraded)).unwrap())
        });
        group.bench_function(BenchmarkId::new("encode", kernel.name()), |b| {
            b.iter(|| codec.encode(black_box(&data)).unwrap())
        });
    }
    group.finish();
}

fn sealing(c: &mut Criterion) {
    let data = chunk();
    let mut group = c.benchmark_group("sealing");
    group.throughput(Throughput::Bytes(CHUNK_SIZE as u64));
    let salt = Salt::new(b"salt");
    // The seal as it is: BLAKE3 keyed hash, AES-256-CTR, BLAKE3 name (the copy is the
    // caller's plaintext buffer being handed over, as the flattener does).
    group.bench_function("seal: blake3 key + aes-256-ctr + blake3 name", |b| {
        b.iter(|| seal(&salt, black_box(data.clone())))
    });
    // The seal it replaced, rebuilt here from the same cipher: SHA-256 key, AES-256-CTR,
    // SHA-256 name.
    group.bench_function(
        "seal: sha-256 key + aes-256-ctr + sha-256 name (old)",
        |b| {
            b.iter(|| {
                let mut buf = black_box(data.clone());
                let key: [u8; 32] = Sha256::new()
                    .chain_update(4u32.to_le_bytes())
                    .chain_update(b"salt")
                    .chain_update(&buf)
                    .finalize()
                    .into();
                let mut cipher = ctr::Ctr128BE::<aes::Aes256>::new(&key.into(), &[0u8; 16].into());
                cipher.apply_keystream(&mut buf);
                let name: [u8; 32] = Sha256::digest(&buf).into();
                (buf, name)
            })
        },
    );
    group.bench_function("copy alone (baseline of the seals)", |b| {
        b.iter(|| black_box(data.clone()))
    });
    group.bench_function("verify: blake3 (chunk name)", |b| {
        let name = ChunkName::of(&data);
        b.iter(|| assert!(name.matches(black_box(&data))))
    });
    group.bench_function("verify: sha-256 (old chunk name)", |b| {
        let name: [u8; 32] = Sha256::digest(&data).into();
        b.iter(|| assert_eq!(<[u8; 32]>::from(Sha256::digest(black_box(&data))), name))
    });
    group.bench_function("convergent key: blake3 keyed hash", |b| {
        b.iter(|| chunk_key(&salt, black_box(&data)))
    });
    group.finish();
}

fn placement(c: &mut Criterion) {
    let names: Vec<ChunkName> = (0..1024u32)
        .map(|i| ChunkName::of(&i.to_le_bytes()))
        .collect();
    let mut group = c.benchmark_group("placement: top 5 of N");
    for nodes in [5, 50, 500] {
        let members: Vec<Member> = (0..nodes)
            .map(|i| Member::new(format!("node-{i}")))
            .collect();
        let placement = Placement::new(&members).unwrap();
        let mut i = 0;
        group.bench_function(BenchmarkId::from_parameter(nodes), |b| {
            b.iter(|| {
                i = (i + 1) % names.len();
                placement.rank(black_box(&names[i]), 5)
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    memory_bandwidth,
    erasure,
    gf256_kernels,
    sealing,
    placement
);
criterion_main!(benches);
