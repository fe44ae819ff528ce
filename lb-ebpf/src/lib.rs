//! Stub library: the programs live in `main.rs`, built for `bpfel-unknown-none`.
#![no_std]
