//! Why an MQTT connection ended: one value per cause. The connection logs it once and counts it
//! once in `gateway_connections_closed_total{protocol="mqtt",reason}`; when the gateway is the
//! one closing, an MQTT 5 client is first sent DISCONNECT with [`CloseReason::code`].

use super::session::reason;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    // ---- the client's doing, nothing wrong ----
    /// DISCONNECT (0x00): no will.
    ClientDisconnect,
    /// DISCONNECT with reason 0x04: closed as if unexpectedly, the will goes out.
    ClientDisconnectWithWill,
    /// The socket closed, or broke, without DISCONNECT.
    PeerClosed,

    // ---- before the session existed ----
    /// No CONNECT within `mqtt.connect_timeout`.
    ConnectTimeout,
    /// The first packet was not CONNECT, or CONNECT was malformed or named another protocol.
    BadConnect,
    /// CONNACK refused it (credentials, scopes, client id, connection limits).
    ConnectRefused,
    /// Too many connections waiting to authenticate (`limits.max_unauthenticated`).
    AdmissionFull,

    // ---- the client broke a rule ----
    ProtocolError,
    MalformedPacket,
    PacketTooLarge,
    TopicNameInvalid,
    TopicAliasInvalid,
    ReceiveMaximumExceeded,
    QosNotSupported,
    /// QoS 0 over the publish rate for longer than `limits.overrun_grace` (MQTT 5).
    MessageRateTooHigh,
    KeepAliveTimeout,

    // ---- policy and the gateway's side ----
    /// Its token expired, or an AUTH refresh was refused.
    NotAuthorized,
    TokenExpired,
    /// Another connection took the session over.
    SessionTakenOver,
    /// The client read nothing for `limits.write_timeout`, or writing failed.
    SlowConsumer,
    /// The engine refused a publish in a way the client must learn by reconnecting.
    EngineRefused,
    /// One of the session's queues went away under it.
    SessionQueueGone,
    ServerShuttingDown,
    /// Closed by an administrator (`DELETE /v1/connections/{id}`).
    AdministrativeAction,
}

impl CloseReason {
    /// The DISCONNECT reason code an MQTT 5 client is sent; `None` when the client closed.
    pub fn code(self) -> Option<u8> {
        use CloseReason::*;
        Some(match self {
            ClientDisconnect
            | ClientDisconnectWithWill
            | PeerClosed
            | ConnectTimeout
            | BadConnect
            | ConnectRefused
            | AdmissionFull
            | SlowConsumer => return None,
            ProtocolError => reason::PROTOCOL_ERROR,
            MalformedPacket => reason::MALFORMED_PACKET,
            PacketTooLarge => reason::PACKET_TOO_LARGE,
            TopicNameInvalid => reason::TOPIC_NAME_INVALID,
            TopicAliasInvalid => reason::TOPIC_ALIAS_INVALID,
            ReceiveMaximumExceeded => reason::RECEIVE_MAXIMUM_EXCEEDED,
            QosNotSupported => reason::QOS_NOT_SUPPORTED,
            MessageRateTooHigh => reason::MESSAGE_RATE_TOO_HIGH,
            KeepAliveTimeout => reason::KEEP_ALIVE_TIMEOUT,
            NotAuthorized => reason::NOT_AUTHORIZED,
            TokenExpired => reason::TOKEN_EXPIRED,
            SessionTakenOver => reason::SESSION_TAKEN_OVER,
            EngineRefused => reason::UNSPECIFIED,
            SessionQueueGone => reason::IMPLEMENTATION_SPECIFIC,
            ServerShuttingDown => reason::SERVER_SHUTTING_DOWN,
            AdministrativeAction => reason::ADMINISTRATIVE_ACTION,
        })
    }

    /// The client said DISCONNECT (0x00): the session ends without its will.
    pub fn is_graceful(self) -> bool {
        self == CloseReason::ClientDisconnect
    }

    /// The `reason` label of `gateway_connections_closed_total`.
    pub fn as_str(self) -> &'static str {
        use CloseReason::*;
        match self {
            ClientDisconnect => "client_disconnect",
            ClientDisconnectWithWill => "client_disconnect_with_will",
            PeerClosed => "peer_closed",
            ConnectTimeout => "connect_timeout",
            BadConnect => "bad_connect",
            ConnectRefused => "connect_refused",
            AdmissionFull => "admission_full",
            ProtocolError => "protocol_error",
            MalformedPacket => "malformed_packet",
            PacketTooLarge => "packet_too_large",
            TopicNameInvalid => "topic_name_invalid",
            TopicAliasInvalid => "topic_alias_invalid",
            ReceiveMaximumExceeded => "receive_maximum_exceeded",
            QosNotSupported => "qos_not_supported",
            MessageRateTooHigh => "message_rate_too_high",
            KeepAliveTimeout => "keep_alive_timeout",
            NotAuthorized => "not_authorized",
            TokenExpired => "token_expired",
            SessionTakenOver => "session_taken_over",
            SlowConsumer => "slow_consumer",
            EngineRefused => "engine_refused",
            SessionQueueGone => "session_queue_gone",
            ServerShuttingDown => "server_shutting_down",
            AdministrativeAction => "closed_by_admin",
        }
    }

    /// Whether the close is worth an info line (the rest are routine and logged at debug).
    pub fn is_notable(self) -> bool {
        !matches!(
            self,
            CloseReason::ClientDisconnect
                | CloseReason::ClientDisconnectWithWill
                | CloseReason::PeerClosed
                | CloseReason::ServerShuttingDown
        )
    }
}
