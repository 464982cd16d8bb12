//! Protocol adapters. Each depends on the engine seam, `auth`, `flow` and `json`, never on
//! another adapter.

pub mod mqtt;
pub mod rest;
pub mod ws;
