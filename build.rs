//! Compiles the TF Serving and TensorFlow messages in `proto/` with protox, a
//! pure-Rust protobuf compiler, so that building mltap never needs a system `protoc`;
//! records the git commit for `mltap_build_info` ("unknown" outside a checkout).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tensorflow_serving/apis/prediction_service.proto",
        "proto/tensorflow_serving/apis/model_service.proto",
        "proto/tensorflow/core/example/example.proto",
        "proto/tensorflow_serving/apis/prediction_log.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".tensorflow.TensorProto.tensor_content")
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    // `mltap_build_info{commit}`: the commit built, when built from a git checkout.
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=MLTAP_GIT_COMMIT={commit}");
    // Rebuilt when HEAD moves: HEAD itself and the branch it names.
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
        String::from_utf8(out.stdout).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    };
    let branch = git(&["rev-parse", "--symbolic-full-name", "HEAD"]).filter(|b| b.starts_with("refs/"));
    for reference in std::iter::once("HEAD".to_string()).chain(branch) {
        if let Some(path) = git(&["rev-parse", "--git-path", &reference]) {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    Ok(())
}
