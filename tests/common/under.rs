//! Which engine a matrix case runs on: the embedded one, or the upstream one on a RabbitMQ
//! vhost of the case's own (DESIGN.md §1: both engines pass the same adapter cases, with the
//! differences marked where the cases live).

use std::sync::OnceLock;

use amqp_gateway::config::{Config, EngineKindConfig};

use super::rabbit::Vhost;
use super::{TestGateway, start_gateway};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Embedded,
    Upstream,
}

/// Set once per test process by the matrix (nextest runs each test in its own process).
pub static ENGINE: OnceLock<Engine> = OnceLock::new();

pub fn engine() -> Engine {
    *ENGINE.get().unwrap_or(&Engine::Embedded)
}

pub fn upstream() -> bool {
    engine() == Engine::Upstream
}

/// A gateway on the engine under test; for upstream, its vhost lives as long as it does.
pub struct Gw {
    pub gw: TestGateway,
    _vhost: Option<Vhost>,
}

impl std::ops::Deref for Gw {
    type Target = TestGateway;
    fn deref(&self) -> &TestGateway {
        &self.gw
    }
}

/// Points `c` at `vhost` as an upstream gateway.
pub fn on_vhost(c: &mut Config, vhost: &Vhost) {
    c.engine.kind = EngineKindConfig::Upstream;
    c.engine.upstream.url = Some(vhost.amqp_url());
    c.engine.upstream.management_url = Some(vhost.management_url());
}

pub async fn gateway(tweak: impl FnOnce(&mut Config)) -> Gw {
    match engine() {
        Engine::Embedded => Gw {
            gw: start_gateway(tweak).await,
            _vhost: None,
        },
        Engine::Upstream => {
            let vhost = Vhost::create().await;
            let gw = start_gateway(|c| {
                tweak(c);
                on_vhost(c, &vhost);
            })
            .await;
            Gw {
                gw,
                _vhost: Some(vhost),
            }
        }
    }
}

/// Where a gateway that restarts keeps its state: a data directory (embedded) or a vhost
/// (upstream), the same for every start.
pub struct Place {
    dir: std::path::PathBuf,
    vhost: Option<Vhost>,
}

impl Place {
    pub async fn new() -> Place {
        Place {
            dir: super::scratch::dir("data-"),
            vhost: match upstream() {
                true => Some(Vhost::create().await),
                false => None,
            },
        }
    }

    /// A gateway on the engine under test, on this place's state.
    pub async fn start(&self) -> TestGateway {
        start_gateway(|c| {
            c.engine.data_dir = self.dir.clone();
            if let Some(vhost) = &self.vhost {
                on_vhost(c, vhost);
            }
        })
        .await
    }
}
