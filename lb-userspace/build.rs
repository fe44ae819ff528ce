//! Builds the XDP programs (`lb-ebpf`) for bpfel-unknown-none with the nightly toolchain and
//! bpf-linker; `cargo xtask setup` installs both.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest).join("..").join("lb-ebpf");
    let ebpf_dir =
        ebpf_dir.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
