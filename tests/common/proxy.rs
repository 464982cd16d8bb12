//! A TCP proxy the test owns between a gateway and RabbitMQ, to cut the network without
//! touching the machine's broker: `cut` closes every proxied connection and refuses new ones
//! until `restore`. With a TLS acceptor it also terminates TLS, as a broker's TLS port would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    epoch: watch::Sender<u64>,
    accepted: Arc<AtomicUsize>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        Proxy::start_with(upstream, None).await
    }

    pub async fn start_with(upstream: SocketAddr, tls: Option<TlsAcceptor>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let cut = Arc::new(AtomicBool::new(false));
        let (epoch, _) = watch::channel(0u64);
        let accepted = Arc::new(AtomicUsize::new(0));
        let (c, e, a) = (cut.clone(), epoch.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if c.load(Ordering::Acquire) {
                    continue; // dropped: refused while cut
                }
                a.fetch_add(1, Ordering::Relaxed);
                let mut ended = e.subscribe();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let piped = async {
                        match tls {
                            Some(tls) => {
                                if let Ok(client) = tls.accept(client).await {
                                    pipe(client, server).await
                                }
                            }
                            None => pipe(client, server).await,
                        }
                    };
                    tokio::select! {
                        _ = piped => {}
                        _ = ended.changed() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            cut,
            epoch,
            accepted,
        }
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.epoch.send_modify(|e| *e += 1);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::Release);
    }

    /// Connections accepted (not refused) so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

async fn pipe(
    mut client: impl AsyncRead + AsyncWrite + Unpin,
    mut server: impl AsyncRead + AsyncWrite + Unpin,
) {
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

/// `amqp://` (or `amqps://`) URL of `vhost` through the proxy, with `host` as the name.
pub fn url_through(scheme: &str, host: &str, port: u16, vhost: &str) -> String {
    format!("{scheme}://guest:guest@{host}:{port}/{vhost}")
}

/// RabbitMQ's AMQP address under test (`rabbit::amqp_base`).
pub fn rabbitmq() -> SocketAddr {
    let base = reqwest::Url::parse(&super::rabbit::amqp_base()).expect("an AMQP URL");
    let host = base.host_str().unwrap_or("127.0.0.1");
    let port = base.port().unwrap_or(5672);
    format!("{host}:{port}")
        .parse()
        .expect("an IP address and port")
}
