//! Test failpoints: named steps at which the daemon blocks for good when the
//! `TOKEND_TEST_FAILPOINT` environment variable names them, so that a test can kill
//! the process at exactly that step. Release builds ignore the variable.

/// The environment variable that names the active failpoint.
pub const VARIABLE: &str = "TOKEND_TEST_FAILPOINT";

/// After Tiki returned new tokens for a refresh and before they are committed.
pub const REFRESH_BEFORE_COMMIT: &str = "refresh_before_commit";

/// Blocks forever if `name` is the active failpoint, in debug builds only.
pub async fn block_if_set(name: &str) {
    #[cfg(debug_assertions)]
    if is_active(name) {
        tracing::error!(
            failpoint = name,
            "test failpoint reached; blocking until the process is killed"
        );
        std::future::pending::<()>().await;
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

#[cfg(debug_assertions)]
fn is_active(name: &str) -> bool {
    static ACTIVE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ACTIVE
        .get_or_init(|| std::env::var(VARIABLE).ok())
        .as_deref()
        == Some(name)
}
