//! Builds `crash/crashfs.c` into the LD_PRELOAD library the crash and slow-disk nemeses use
//! (see that file). The harness finds it at `CRASHFS_SO`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "crash/crashfs.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("libengram_crashfs.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(src)
        .args(["-ldl", "-lpthread"])
        .status()
        .unwrap_or_else(|e| panic!("running {cc} for {src}: {e}"));
    assert!(status.success(), "{cc} failed to build {src}");
    println!("cargo:rustc-env=CRASHFS_SO={}", out.display());
}
