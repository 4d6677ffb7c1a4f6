//! Builds the XDP program of the in-kernel deny list (`bpf/xdp_deny.c`)
//! when clang with the bpf target is installed; otherwise the stripped
//! object committed beside the source is used, so a machine without clang
//! builds the gateway all the same.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "bpf/xdp_deny.c";
const COMMITTED: &str = "bpf/xdp_deny.o";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed={COMMITTED}");
    let out_dir = std::env::var_os("OUT_DIR").map(PathBuf::from);
    let Some(out_dir) = out_dir else {
        panic!("cargo sets OUT_DIR for build scripts");
    };
    let out = out_dir.join("xdp_deny.o");
    if !compile(&out) {
        if let Err(e) = std::fs::copy(COMMITTED, &out) {
            panic!("neither clang nor the committed {COMMITTED} is available: {e}");
        }
    }
}

/// clang -O2 -g -target bpf, then the debug sections stripped (BTF stays).
fn compile(out: &Path) -> bool {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    // <asm/types.h> lives under the multiarch directory on Debian.
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let built = Command::new("clang")
        .args([
            "-O2", "-g", "-target", "bpf", "-I", &multiarch, "-c", SOURCE, "-o",
        ])
        .arg(out)
        .status()
        .is_ok_and(|s| s.success());
    if !built {
        println!(
            "cargo:warning=clang with the bpf target not usable; using the committed {COMMITTED}"
        );
        return false;
    }
    let stripped = Command::new("llvm-strip")
        .arg("-g")
        .arg(out)
        .status()
        .is_ok_and(|s| s.success());
    // An unstripped object loads the same; it is only larger.
    let _ = stripped;
    true
}
