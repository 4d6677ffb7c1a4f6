//! Builds the XDP program of the in-kernel deny list (`bpf/xdp_deny.c`)
//! when clang with the bpf target is installed; otherwise the stripped
//! object committed beside the source is used, so a machine without clang
//! builds the gateway all the same. Also places the request path's code
//! together in the binary (see `order_hot_code`).

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "bpf/xdp_deny.c";
const COMMITTED: &str = "bpf/xdp_deny.o";
const HOT_CODE: &str = "hot-code.txt";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed={COMMITTED}");
    let out_dir = std::env::var_os("OUT_DIR").map(PathBuf::from);
    let Some(out_dir) = out_dir else {
        panic!("cargo sets OUT_DIR for build scripts");
    };
    order_hot_code();
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

/// Hands `hot-code.txt` (see bench/hot_code.py) to the linker, so the
/// functions that serve requests sit together at the start of the text
/// segment: the kernel maps code 64 KiB around each first touch, and the
/// request path spread over the whole segment kept 4.5 MiB or more of it
/// resident per process, against about 0.6 MiB packed.
///
/// Only when the link is known to be lld's, which reads the list (rustc's
/// own lld, the default on x86_64 Linux from Rust 1.90); any other linker
/// builds the same binary without the ordering.
fn order_hot_code() {
    println!("cargo:rerun-if-changed={HOT_CODE}");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    if !links_with_rust_lld() {
        return;
    }
    let Ok(dir) = std::env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    let list = Path::new(&dir).join(HOT_CODE);
    if !list.is_file() {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bin=ferrogate=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    // Names of functions that changed since the list was made are skipped.
    println!("cargo:rustc-link-arg-bin=ferrogate=-Wl,--no-warn-symbol-ordering");
}

/// True for the x86_64 GNU/Linux target with no linker of the user's and
/// a rustc that links with its own lld by default (1.90 and later).
fn links_with_rust_lld() -> bool {
    let target = std::env::var("TARGET").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu" || std::env::var_os("RUSTC_LINKER").is_some() {
        return false;
    }
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") || flags.contains("link-self-contained") {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&out.stdout);
    let minor = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok());
    minor.is_some_and(|m| m >= 90)
}
