//! CONNECT: who the client is (its token, in the password or MQTT 5 enhanced authentication),
//! its client id, the takeover of a live session of the same (subject, client id), what the
//! gateway grants (session expiry, keep-alive, receive maximum), the session's queues, and the
//! CONNACK.

use super::*;

/// A refused CONNECT: the CONNACK reason and why (for the log line).
pub struct ConnectRejected {
    pub code: u8,
    pub why: String,
}

impl ConnectRejected {
    fn new(code: u8, why: impl Into<String>) -> ConnectRejected {
        ConnectRejected {
            code,
            why: why.into(),
        }
    }
}

/// The session key the session registry holds: (subject, client id).
pub(super) fn takeover_key(subject: &str, client_id: &str) -> Arc<str> {
    session_queue(subject, client_id, "").into()
}

/// The principal the CONNECT's token (or its absence) makes the client.
async fn authenticate(ctx: &Context, connect: &Connect) -> Result<Principal, ConnectRejected> {
    // MQTT 5 enhanced authentication carries the token in Authentication Data; only our
    // method is known ([MQTT-4.12.0-1]: otherwise 0x8C).
    let token_bytes = match connect.auth_method.as_deref() {
        Some(AUTH_METHOD) => connect.auth_data.as_ref(),
        Some(_) => {
            return Err(ConnectRejected::new(
                reason::BAD_AUTHENTICATION_METHOD,
                "unknown authentication method",
            ));
        }
        None => connect.password.as_ref(),
    };
    let bad =
        |e: &dyn std::fmt::Display| ConnectRejected::new(reason::BAD_CREDENTIALS, e.to_string());
    let principal = match token_bytes.filter(|p| !p.is_empty()) {
        None => ctx.auth.anonymous().map_err(|e| bad(&e))?,
        Some(pw) => {
            let token = std::str::from_utf8(pw).map_err(|_| bad(&"password is not a token"))?;
            ctx.auth.authenticate(token).await.map_err(|e| bad(&e))?
        }
    };
    if principal.permissions.is_empty() {
        return Err(ConnectRejected::new(
            reason::NOT_AUTHORIZED,
            "the token's scopes allow nothing",
        ));
    }
    Ok(principal)
}

/// The client id, and the one the CONNACK assigns when the client sent none (MQTT 5).
fn client_id(connect: &Connect) -> Result<(String, Option<String>), ConnectRejected> {
    if !connect.client_id.is_empty() {
        return Ok((connect.client_id.clone(), None));
    }
    // [MQTT-3.1.3-8]: 3.1.1 allows an empty id only with a clean session.
    if connect.version == Version::V3 && !connect.clean_start {
        return Err(ConnectRejected::new(
            reason::CLIENT_ID_NOT_VALID,
            "empty client id without clean session",
        ));
    }
    let id = crate::engine::names::generate("auto-");
    let assigned = (connect.version == Version::V5).then(|| id.clone());
    Ok((id, assigned))
}

/// Takes the session `key` over from a live connection (only within one subject: the key
/// includes it), then this connection's place under the connection limits, then holds the
/// session. The old connection stores the session's state and releases it first: wait for that
/// (woken by the release); the session queues are the fence besides (`fenced`).
async fn claim(
    ctx: &Context,
    conn: &Connection,
    key: &Arc<str>,
    subject: &str,
) -> Result<(crate::flow::Admitted, TakeoverReceiver), ConnectRejected> {
    let sessions = ctx.engine.sessions();
    if sessions.take_over(key).await
        && !sessions
            .wait_released(key, ctx.config.mqtt.takeover_timeout)
            .await
    {
        return Err(ConnectRejected::new(
            reason::SERVER_UNAVAILABLE,
            "the live session did not let go",
        ));
    }
    // After a takeover: the connection taken over gave its place back first.
    let admitted = ctx
        .flow
        .admission
        .admit(subject)
        .map_err(|full| ConnectRejected::new(reason::QUOTA_EXCEEDED, full.to_string()))?;
    let (takeover_tx, takeovers) = crate::engine::sessions::takeover_channel();
    sessions.hold(key.clone(), conn.id, takeover_tx);
    // A delayed will of this session's last connection is not published: it is back.
    sessions.cancel_will(key).await;
    Ok((admitted, takeovers))
}

/// The session expiry granted: none for a clean start (3.1.1, or MQTT 5 asking for 0), else
/// what was asked (3.1.1: for ever), capped by `mqtt.max_session_expiry`.
fn granted_expiry(ctx: &Context, connect: &Connect) -> Duration {
    if connect.clean_start && (connect.version == Version::V3 || connect.session_expiry == 0) {
        return Duration::ZERO;
    }
    let asked = match connect.version {
        Version::V5 => u64::from(connect.session_expiry),
        Version::V3 => u64::MAX,
    };
    Duration::from_secs(asked.min(ctx.config.mqtt.max_session_expiry.as_secs()))
}

/// Server Keep Alive ([MQTT-3.2.2-21]): a v5 client asking for more than the cap, or for none
/// while there is one, is told the cap and held to it. 3.1.1 cannot be told.
fn server_keep_alive(ctx: &Context, connect: &Connect) -> Option<u16> {
    let cap = u16::try_from(ctx.config.mqtt.max_keep_alive.as_secs()).unwrap_or(u16::MAX);
    (connect.version == Version::V5
        && cap > 0
        && (connect.keep_alive == 0 || connect.keep_alive > cap))
        .then_some(cap)
}

impl Session {
    /// Handles CONNECT: authenticates, takes the session over if it is live, opens its queues.
    /// Returns the session and its CONNACK.
    pub async fn connect(
        ctx: Context,
        conn: Arc<Connection>,
        connect: Connect,
        qos0_out: Pressure,
    ) -> Result<(Session, Outbound), ConnectRejected> {
        let principal = authenticate(&ctx, &connect).await?;
        let (id, assigned) = client_id(&connect)?;
        conn.channel(&ctx.engine)
            .await
            .map_err(|e| ConnectRejected::new(reason::SERVER_UNAVAILABLE, e.to_string()))?;
        let key = takeover_key(principal.shared_subject(), &id);
        let (admitted, takeovers) = claim(&ctx, &conn, &key, principal.shared_subject()).await?;
        let expiry = granted_expiry(&ctx, &connect);
        let server_keep_alive = server_keep_alive(&ctx, &connect);
        let inflight_max = connect
            .receive_max
            .unwrap_or(u16::MAX)
            .min(ctx.config.mqtt.max_inflight)
            .max(1);
        let mut session = Session {
            principal,
            client: Client {
                version: connect.version,
                id: id.into(),
                keep_alive: server_keep_alive.unwrap_or(connect.keep_alive),
                // `authenticate` refused any other method.
                enhanced_auth: connect.auth_method.is_some(),
                max_packet: connect.max_packet_size.and_then(NonZeroU32::new),
                alias_max: connect.topic_alias_max,
                requested_expiry: connect.session_expiry,
                clean: expiry.is_zero(),
            },
            life: Lifetime {
                expiry_ms: millis(expiry),
                will: connect.will.map(Box::new),
                key,
                admitted: Some(admitted),
            },
            out: VecDeque::new(),
            subs: Default::default(),
            registered: None,
            // Most sessions consume one queue: room for four is 250 bytes held idle.
            consumers: StreamMap::with_capacity(1),
            outflow: Outflow {
                inflight: Default::default(),
                next_packet_id: 1,
                inflight_max,
                aliases: None,
                qos0_out,
            },
            inflow: publish::Inflow::default(),
            stall: None,
            takeovers,
            ctx,
            conn,
        };
        let present = if connect.clean_start {
            session.discard_stored().await;
            false
        } else {
            session
                .resume()
                .await
                .map_err(|e| ConnectRejected::new(reason::SERVER_UNAVAILABLE, e.to_string()))?
        };
        // Written now so that a session without subscriptions is present next time too.
        session.save_stored().await;
        // MQTT 5: said only when it differs from what the client asked for.
        let granted = u32::try_from(session.life.expiry().as_secs()).unwrap_or(u32::MAX);
        let session_expiry = (connect.version == Version::V5 && granted != connect.session_expiry)
            .then_some(granted);
        let connack = Outbound::ConnAck {
            code: reason::SUCCESS,
            session_present: present,
            session_expiry,
            receive_max: session.ctx.config.mqtt.receive_maximum,
            max_packet_size: session.max_packet_size(),
            assigned_client_id: assigned,
            max_qos: session.max_qos(),
            auth_method: session.client.enhanced_auth.then(|| AUTH_METHOD.to_owned()),
            server_keep_alive,
        };
        Ok((session, connack))
    }
}
