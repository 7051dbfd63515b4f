//! Knowledge of image content that the agent and the coordinator share, so it is written
//! once: today the tar framing reader that bounds a layer's meta headers before the tar crate
//! reads them ([`tarframe`]); both the agent's applier and the coordinator's layer check read
//! layers through it.

pub mod tarframe;
