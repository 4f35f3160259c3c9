//! Host-side sampling profile of `bench train`'s timed steps (feature `host-profile`,
//! `QWEN3VL_HOST_PROFILE=FILE`): folded stacks (`thread;root;…;leaf count`, one per line, the
//! input of flamegraph tools) of where the CPU time of a launch-bound step goes.

/// A running profile, or nothing when the feature or the variable is off.
pub struct HostProfile {
    #[cfg(feature = "host-profile")]
    guard: Option<(pprof::ProfilerGuard<'static>, String)>,
}

impl HostProfile {
    /// Starts sampling (1 kHz) when `QWEN3VL_HOST_PROFILE` names a file.
    pub fn start() -> Self {
        #[cfg(feature = "host-profile")]
        {
            let guard = std::env::var("QWEN3VL_HOST_PROFILE").ok().and_then(|path| {
                let g = pprof::ProfilerGuardBuilder::default()
                    .frequency(1000)
                    .blocklist(&["libc", "libgcc", "pthread", "vdso"])
                    .build()
                    .map_err(|e| eprintln!("host profile not started: {e}"))
                    .ok()?;
                Some((g, path))
            });
            Self { guard }
        }
        #[cfg(not(feature = "host-profile"))]
        Self {}
    }

    /// Writes the folded stacks sampled so far.
    pub fn finish(self) {
        #[cfg(feature = "host-profile")]
        if let Some((guard, path)) = self.guard {
            let report = match guard.report().build() {
                Ok(r) => r,
                Err(e) => return eprintln!("host profile: {e}"),
            };
            let mut lines = Vec::new();
            for (frames, count) in &report.data {
                let mut names = vec![frames.thread_name.clone()];
                for frame in frames.frames.iter().rev() {
                    for symbol in frame.iter().rev() {
                        names.push(symbol.name().replace(';', ":"));
                    }
                }
                lines.push(format!("{} {count}", names.join(";")));
            }
            match std::fs::write(&path, lines.join("\n")) {
                Ok(()) => eprintln!("host profile: {} stacks written to {path}", lines.len()),
                Err(e) => eprintln!("host profile: cannot write {path}: {e}"),
            }
        }
    }
}
