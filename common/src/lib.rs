//! What both migration agents share: the wire protocol and its state machine,
//! the QUIC/TLS transport, bulk transfer, wrappers around the external tools
//! (criu, runc, ip) and the kernel's mount calls, and rootfs handling.
//!
//! Follow one migration from `migrate-src/src/main.rs`: each phase there is a
//! file that calls into these modules; `migrate-dst/src/session.rs` is the
//! other end of [`protocol`].

// Corrupting data on purpose is for the end-to-end tests' builds only.
#[cfg(all(feature = "fault-injection", not(debug_assertions)))]
compile_error!("the fault-injection feature is for test builds, never release builds");

pub mod bundle;
pub mod certs;
pub mod criu;
pub mod hook;
pub mod json;
pub mod mount;
pub mod netns;
pub mod policy;
pub mod process;
pub mod protocol;
pub mod record;
pub mod rootfs;
pub mod runc;
pub mod transfer;
pub mod transport;
pub mod tunnel;

/// Whether `id` is a container id runc accepts; ids name directories on
/// both hosts, so this is checked before any path is built from one.
pub fn valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    #[test]
    fn container_ids() {
        for ok in ["web1", "a.b-c_d+e", "0123"] {
            assert!(super::valid_container_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "é"] {
            assert!(!super::valid_container_id(bad), "{bad}");
        }
    }
}
