//! `umdevd` with the parent drivers umdev ships. A driver is one line here.

fn main() -> std::process::ExitCode {
    umdevd::Daemon::builder()
        .driver(umdev_mtty::MttyDriver)
        .driver(umdev_hello::HelloDriver)
        .driver(umdev_mnvme::MnvmeDriver)
        .driver(umdev_mbochs::MbochsDriver)
        .default_parent("mtty0", "mtty", serde_json::json!({}))
        .default_parent("mtty1", "mtty", serde_json::json!({}))
        .default_parent("hello0", "hello", serde_json::json!({}))
        .default_parent("mnvme0", "mnvme", serde_json::json!({ "capacity_gib": 4 }))
        .default_parent("mbochs0", "mbochs", serde_json::json!({}))
        .main()
}
