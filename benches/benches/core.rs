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
    erasure::{ReedSolomonCodec, XorCodec},
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

fn codecs() -> Vec<(&'static str, Box<dyn ErasureCodec>)> {
    let p = |k, m| CodeParams::new(k, m).unwrap();
    vec![
        (
            "4-of-5 xor",
            Box::new(XorCodec::new(p(4, 5))) as Box<dyn ErasureCodec>,
        ),
        (
            "4-of-5 reed-solomon",
            Box::new(ReedSolomonCodec::new(p(4, 5))),
        ),
        (
            "8-of-10 reed-solomon",
            Box::new(ReedSolomonCodec::new(p(8, 10))),
        ),
        (
            "10-of-14 reed-solomon",
            Box::new(ReedSolomonCodec::new(p(10, 14))),
        ),
    ]
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
}

fn erasure(c: &mut Criterion) {
    let data = chunk();
    let mut group = c.benchmark_group("erasure");
    group.throughput(Throughput::Bytes(CHUNK_SIZE as u64));
    for (label, codec) in codecs() {
        let k = codec.params().data();
        let total = codec.params().total();
        group.bench_function(BenchmarkId::new("encode", label), |b| {
            b.iter(|| codec.encode(black_box(&data)).unwrap())
        });
        let shards = codec.encode(&data).unwrap();
        // The normal read: the k data shards, no decoding.
        let data_only: Vec<(usize, &[u8])> = (0..k).map(|i| (i, shards[i].as_slice())).collect();
        group.bench_function(BenchmarkId::new("decode data shards", label), |b| {
            b.iter(|| codec.decode(CHUNK_SIZE, black_box(&data_only)).unwrap())
        });
        // The worst read: as many data shards lost as there is parity.
        let lost = total - k;
        let degraded: Vec<(usize, &[u8])> =
            (lost..total).map(|i| (i, shards[i].as_slice())).collect();
        group.bench_function(
            BenchmarkId::new(format!("decode {lost} lost"), label),
            |b| b.iter(|| codec.decode(CHUNK_SIZE, black_box(&degraded)).unwrap()),
        );
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

criterion_group!(benches, memory_bandwidth, erasure, sealing, placement);
criterion_main!(benches);
