//! The Vagrantfile is valid for Vagrant (provider plugins aside: none is installed here).

use std::process::Command;

#[test]
fn vagrantfile_validates() {
    if !lb_tests::installed("vagrantfile_validates", "vagrant", "--version", "vagrant") {
        return;
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../vagrant");
    let dotfiles = std::env::temp_dir().join(format!("lb-vagrant-{}", std::process::id()));
    let out = Command::new("vagrant")
        .args(["validate", "--ignore-provider"])
        .current_dir(dir)
        // No update check (no traffic leaves the machine) and no state in the source tree.
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .env("VAGRANT_DOTFILE_PATH", &dotfiles)
        .output()
        .expect("run vagrant");
    let _ = std::fs::remove_dir_all(&dotfiles);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "vagrant validate failed:\n{text}");
    assert!(text.contains("Vagrantfile validated successfully"), "{text}");
}
