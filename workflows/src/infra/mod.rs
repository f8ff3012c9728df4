//! Infrastructure abstraction layer: machines to build clusters on.
//! (Being written: the `Provider` trait, the `pool` and `local` providers.)
