//! fwmark-trace: traces Linux packet marks (`skb->mark`) across tc, netfilter, routing and
//! sockets, and attributes every changed bit to its registered owner.
//!
//! The data path, one module per step:
//! kernel observers (`kernel`) → decode (`decode`: raw record → `event`) → where it happened
//! (`place`) → flows (`flows`) → attribution (`attribution`, with the owner `registry`) →
//! outputs (`output`: human lines, JSON, summary, metrics). `pipeline` runs a record through
//! decode and attribution.
//!
//! Beside it: the typed vocabulary (`mark`, `netstack`, `clock`), the node's facts that decide
//! what marks do (`nodestate`), who reads and writes marks on the node (`inventory`), why
//! replies die (`why`), the commands (`commands`, parsed by `cli`) and throwaway namespaces
//! (`lab`, `netns`), which the integration tests use too. Each layer imports only those below
//! it (README, "Layout"; checked by `cargo xtask layers`).

mod attribution;
mod cli;
mod clock;
mod commands;
mod decode;
mod event;
mod flows;
/// Entry points for the fuzz targets (fuzz/): not part of the library's interface.
#[doc(hidden)]
pub mod fuzzing;
mod inventory;
mod kernel;
pub mod lab;
mod mark;
pub mod netns;
mod netstack;
mod nodestate;
mod output;
mod pipeline;
mod place;
mod privileges;
mod recording;
mod registry;
mod why;

/// The benchmark and the soak test (`cargo xtask bench`, `cargo xtask soak`): compiled only with
/// the `bench` feature, so no user's binary carries them.
#[cfg(any(test, feature = "bench"))]
mod fixtures;
/// What the integration tests need from inside (the `testing` feature).
#[cfg(feature = "testing")]
pub mod test_support;

pub use cli::main;

/// Shared by the property tests: a fixed seed, so a gate gives the same verdict on every run
/// (a failure found once is reproduced, and CI cannot fail at random).
#[cfg(test)]
mod testing {
    pub(crate) fn fixed_seed() -> proptest::test_runner::Config {
        proptest::test_runner::Config {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x666d_6b74),
            cases: 512,
            ..Default::default()
        }
    }

    /// JSON documents of any shape whose object keys and strings come from `keys` and
    /// `strings` (the words a parser looks for), so that the parser goes deep.
    pub(crate) fn json_with(
        keys: &[&'static str],
        strings: &[&'static str],
    ) -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let key = prop::sample::select(keys.to_vec());
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u32>().prop_map(Value::from),
            prop::sample::select(strings.to_vec()).prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 80, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key.clone(), inner), 0..6).prop_map(|kv| {
                    Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }),
            ]
        })
    }
}
