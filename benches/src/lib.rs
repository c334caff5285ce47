//! tiersync's benchmarks. The criterion micro-benchmarks live in
//! `benches/micro.rs`; the end-to-end runner (real nodes on loopback) is
//! tracked in the benchmark issue.
