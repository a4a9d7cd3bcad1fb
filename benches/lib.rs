//! Benchmarks live in `benches/`; run them with `cargo bench -p slapshot-benches`.
//! Shell benchmarks that drive whole processes (`server-vs-nginx.sh`) sit beside them.
