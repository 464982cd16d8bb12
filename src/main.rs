//! The `amqp-gateway` binary: flags → config → logging → run until SIGTERM/SIGINT; plus the
//! `token` and `openapi` subcommands. No logic beyond choosing what to run.

use std::process::ExitCode;
use std::time::Duration;

use amqp_gateway::auth;
use amqp_gateway::cli::{Cli, Command, TokenArgs};
use amqp_gateway::config::{self, Config, EngineKindConfig, LogFormat};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Per-thread caches: the glibc allocator took about 15 % of the gateway's samples under load
/// (docs/bench.md, the QoS 1 profile). The `system-allocator` feature leaves it out, so that
/// heaptrack (which sees only malloc) can say what the gateway holds.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps the process off transparent huge pages unless `MIMALLOC_ALLOW_THP` says otherwise.
/// mimalloc asks for them on its arenas (`madvise`, which the usual `madvise` setting of
/// `/sys/kernel/mm/transparent_hugepage/enabled` grants), so the heap is faulted in 2 MiB at a
/// time and a page that keeps one live block stays whole: 0.2–0.8 KiB more resident memory per
/// idle connection at 15,000 and 3–4 MiB more at start, for no throughput measured
/// (docs/bench.md).
/// The flag is the process's (all its threads), and holds for mappings made before it.
/// Returns why it could not be set, for the log.
#[cfg(all(target_os = "linux", not(feature = "system-allocator")))]
fn keep_off_huge_pages() -> Option<std::io::Error> {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return None; // the operator chose; mimalloc reads it itself
    }
    rustix::thread::disable_transparent_huge_pages(true)
        .err()
        .map(Into::into)
}

#[cfg(not(all(target_os = "linux", not(feature = "system-allocator"))))]
fn keep_off_huge_pages() -> Option<std::io::Error> {
    None
}

/// How long the `--dev` administrator token lives.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("amqp-gateway: {message}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let huge_pages = keep_off_huge_pages();
    let cli = Cli::parse();
    let loaded = match config::load(cli.config.as_deref(), std::env::vars(), cli.overrides()) {
        Ok(loaded) => loaded,
        Err(e) => return fail(2, format!("invalid configuration\n{e}")),
    };
    match &cli.command {
        Some(Command::Openapi) => {
            match serde_json::to_string_pretty(&amqp_gateway::protocol::rest::openapi()) {
                Ok(text) => println!("{text}"),
                Err(e) => return fail(1, e),
            }
            return ExitCode::SUCCESS;
        }
        Some(Command::Token(args)) => return token(&loaded.config, args),
        None => {}
    }
    let mut config = loaded.config;

    // An empty RUST_LOG would parse as "log nothing": treat it as unset.
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(v).ok(),
        _ => None,
    }
    .unwrap_or_else(|| EnvFilter::new(&config.log.level));
    // lapin logs every channel the broker closes at ERROR; the upstream engine closes pooled
    // channels by design (a passive declare of a missing queue) and reports what matters
    // itself. Shown only when RUST_LOG names lapin.
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if v.contains("lapin") => filter,
        _ => filter.add_directive("lapin::channel=off".parse().expect("a valid directive")),
    };
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log.format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    if let Some(e) = huge_pages {
        tracing::warn!(error = %e, "transparent huge pages stay on: idle connections cost more memory");
    }

    let dev_token = if cli.dev {
        match dev_mode(&mut config) {
            Ok(token) => token,
            Err(code) => return code,
        }
    } else {
        None
    };

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(async {
        // Before the listeners open: a TERM or HUP while starting must not meet the default
        // action (both end the process).
        let stop = amqp_gateway::shutdown::signal();
        let hangups = hangups();
        let gateway = amqp_gateway::start(config).await?;
        if let Some(token) = dev_token {
            // stdout, never the log: the token is a credential.
            println!(
                "\nAdministrator token (valid 24h; mint others with `amqp-gateway token`):\n{token}\n"
            );
        }
        reload_tls_until_stopped(&gateway, stop, hangups).await;
        gateway.shutdown().await;
        Ok::<(), amqp_gateway::StartError>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            fail(1, e)
        }
    }
}

/// `--dev`: with no key configured, use (or create) the data dir's dev secret and mint an
/// administrator token.
fn dev_mode(config: &mut Config) -> Result<Option<String>, ExitCode> {
    let a = &config.auth;
    let has_key = a.hs256_secret.is_some()
        || !a.public_keys.is_empty()
        || a.jwks_url.is_some()
        || a.jwks_file.is_some();
    if has_key {
        tracing::warn!("--dev ignored: a token key is configured");
        return Ok(None);
    }
    if config.engine.kind != EngineKindConfig::Embedded {
        return Err(fail(2, "--dev is for the embedded engine only"));
    }
    let secret = auth::dev_secret(&config.engine.data_dir).map_err(|e| {
        fail(
            1,
            format!(
                "cannot keep the dev secret in {}: {e}",
                config.engine.data_dir.display()
            ),
        )
    })?;
    tracing::warn!(
        file = %auth::dev_secret_path(&config.engine.data_dir).display(),
        "development mode: tokens are signed with a local secret; do not use in production"
    );
    let token = auth::mint(
        &secret,
        "dev-admin",
        &format!("{}.tag:administrator", config.auth.resource_server_id),
        DEV_TOKEN_TTL,
        &config.auth.resource_server_id,
        config.auth.issuer.as_deref(),
    )
    .map_err(|e| fail(1, format!("cannot sign the dev token: {e}")))?;
    config.auth.hs256_secret = Some(secret);
    Ok(Some(token))
}

/// `amqp-gateway token`: prints one token.
fn token(config: &Config, args: &TokenArgs) -> ExitCode {
    let secret = match &config.auth.hs256_secret {
        Some(s) => s.clone(),
        None => match std::fs::read_to_string(auth::dev_secret_path(&config.engine.data_dir)) {
            Ok(s) => s.trim().to_owned(),
            Err(_) => {
                return fail(
                    2,
                    format!(
                        "no secret to sign with: set auth.hs256_secret, or start the gateway once \
                         with --dev (it keeps one in {})",
                        auth::dev_secret_path(&config.engine.data_dir).display()
                    ),
                );
            }
        },
    };
    match auth::mint(
        &secret,
        &args.sub,
        &args.scope,
        args.ttl.into(),
        &config.auth.resource_server_id,
        config.auth.issuer.as_deref(),
    ) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, format!("cannot sign the token: {e}")),
    }
}

#[cfg(unix)]
type Hangups = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangups = ();

/// SIGHUP's handler, installed when called.
fn hangups() -> std::io::Result<Hangups> {
    #[cfg(unix)]
    return tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    #[cfg(not(unix))]
    Ok(())
}

/// Runs until SIGTERM/SIGINT; on SIGHUP reads the TLS certificate and key again (a bad pair is
/// logged and the current one kept).
async fn reload_tls_until_stopped(
    gateway: &amqp_gateway::Gateway,
    stop: impl std::future::Future<Output = ()>,
    hangups: std::io::Result<Hangups>,
) {
    tokio::pin!(stop);
    #[cfg_attr(not(unix), allow(unused_variables, unused_mut))]
    let mut hangup = match hangups {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; certificates reload on restart only");
            stop.await;
            return;
        }
    };
    loop {
        #[cfg(unix)]
        let hup = hangup.recv();
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        tokio::select! {
            () = &mut stop => return,
            _ = hup => match gateway.reload_tls() {
                Ok(true) => tracing::info!("SIGHUP: TLS certificate reloaded; new connections use it"),
                Ok(false) => tracing::info!("SIGHUP: no TLS configured, nothing to reload"),
                Err(e) => tracing::error!("SIGHUP: TLS certificate not reloaded, the current one stays: {e}"),
            },
        }
    }
}
