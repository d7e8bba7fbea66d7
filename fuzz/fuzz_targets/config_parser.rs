//! Feeds arbitrary text to the config parser and the rollout flags parser.
//!
//! Neither may panic; an error names its origin; an accepted config can be used and
//! rendered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pitboss::config::Config;
use pitboss::rollout::Flags;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_sources("fuzz.toml", Some(text), Vec::<(String, String)>::new()) {
        Ok(cfg) => {
            let _ = cfg.to_toml();
            for role in ["legacy", "new"] {
                let backend = cfg.backend(role).expect("checked when the config was read");
                let _ = backend.effective.pool_config(role);
            }
        }
        Err(e) => assert!(e.to_string().starts_with("fuzz.toml"), "{e}"),
    }
    match Flags::parse("flags.toml", text) {
        Ok(flags) => {
            let _ = flags.to_toml();
        }
        Err(e) => assert!(e.to_string().starts_with("flags.toml"), "{e}"),
    }
});
