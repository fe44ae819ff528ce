//! lbd's XDP attach modes where the driver has no native XDP (a Linux bridge): `auto` falls
//! back to generic mode and says why; `native` refuses and says so.

use lb_tests::{
    lbd::{Lbd, TempDir},
    netns::NetNs,
    privileged, unique_prefix,
};

#[test]
fn auto_falls_back_to_generic_with_a_logged_reason_and_native_refuses() {
    if !privileged("auto_falls_back_to_generic_with_a_logged_reason_and_native_refuses") {
        return;
    }
    let prefix = unique_prefix("lbt-mode");
    let ns = NetNs::new(&format!("{prefix}-lb"));
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let dir = TempDir::new(&prefix);
    let reg = dir.write("services.yaml", "version: 1\n");

    let native = Lbd::run_to_exit(&ns, &dir, &reg, "br0", &["--xdp-mode", "native"]);
    assert_eq!(native.status.code(), Some(1), "{}", native.log);
    assert!(native.log.contains("cannot attach XDP to `br0` in native mode"), "{}", native.log);

    let lbd = Lbd::start(&ns, &dir, &reg, "br0", &["--xdp-mode", "auto"]);
    let link = ns.ip_output(&["link", "show", "dev", "br0"]);
    assert!(link.contains(" xdpgeneric "), "auto must end in generic mode here:\n{link}");
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(
        stopped.log.contains("native XDP unavailable on this interface; using generic (skb) mode"),
        "the fallback must be logged with its reason:\n{}",
        stopped.log
    );
    assert!(!ns.ip_output(&["link", "show", "dev", "br0"]).contains("xdp"));
}
