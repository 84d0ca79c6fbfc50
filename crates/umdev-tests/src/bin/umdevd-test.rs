//! A daemon built the way a device author builds one: umdevd's library with the drivers
//! umdev ships plus two it does not know (the test device and the probe, from this crate),
//! each registered with one line. The tests run it as they would run `umdevd`.

fn main() -> std::process::ExitCode {
    umdevd::Daemon::builder()
        .driver(umdev_mtty::MttyDriver)
        .driver(umdev_hello::HelloDriver)
        .driver(umdev_mnvme::MnvmeDriver)
        .driver(umdev_mbochs::MbochsDriver)
        .driver(umdev_tests::drivers::TestDriver)
        .driver(umdev_tests::drivers::ProbeDriver)
        .main()
}
