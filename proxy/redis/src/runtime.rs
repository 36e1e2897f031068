//! The runtime Redis connections live on.

/// so callers on any runtime (Pingora's, a test's, none) can use them.
pub struct RedisRuntime(Option<tokio::runtime::Runtime>);

impl RedisRuntime {
    pub fn new() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-redis")
            .enable_all()
            .build()?;
        Ok(Self(Some(rt)))
    }

    /// Runs `fut` to completion from synchronous code, even when called
    /// from inside another runtime (on a scoped helper thread).
    pub fn block_on<F: std::future::Future + Send>(&self, fut: F) -> Option<F::Output>
    where
        F::Output: Send,
    {
        let rt = self.0.as_ref()?;
        std::thread::scope(|s| s.spawn(|| rt.block_on(fut)).join().ok())
    }

    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Some(rt) = &self.0 {
            rt.spawn(fut);
        }
    }
}

impl Drop for RedisRuntime {
    fn drop(&mut self) {
        // Safe from async contexts, unlike dropping a Runtime.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
