//! `umdevd` with the parent drivers umdev ships. A driver is one line here.

fn main() -> std::process::ExitCode {
    umdevd::Daemon::builder()
        .driver(umdev_mtty::MttyDriver)
        .driver(umdev_hello::HelloDriver)
        .default_parent("mtty0", "mtty", serde_json::json!({}))
        .default_parent("mtty1", "mtty", serde_json::json!({}))
        .default_parent("hello0", "hello", serde_json::json!({}))
        .main()
}
