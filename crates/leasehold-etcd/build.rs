//! Nothing to build. `protoc-bin-vendored` is a build-dependency only so that cargo fetches the
//! protoc binary crates.io ships: `scripts/protoc`, which the workspace's `.cargo/config.toml`
//! hands to build scripts as `PROTOC`, runs it when etcd-client's build compiles etcd's
//! protobufs, so a machine with only Rust builds this crate.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
