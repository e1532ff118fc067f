// Compiles the CRI v1 subset in proto/ into a tonic client; containerd's own API comes from
// containerd-client.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/runtime/v1/api.proto");
    tonic_prost_build::configure()
        .build_server(false)
        // AuthConfig carries passwords: no derived Debug; src/runtime/cri.rs gives it a redacting one.
        .skip_debug(["runtime.v1.AuthConfig"])
        .compile_protos(&["proto/runtime/v1/api.proto"], &["proto"])?;
    Ok(())
}
