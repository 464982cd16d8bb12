//! Why a WebSocket connection ended: one value per cause, with the close frame it sends (code
//! and reason text) when the gateway is the one closing. The connection logs it once and
//! counts it once in `gateway_connections_closed_total{protocol="ws",reason}`.

use super::frames::close;
use crate::flow::Full;
use crate::protocol::outbound::Closing;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame, or the socket ended.
    ClientClosed,
    /// No `auth` frame within `ws.auth_timeout`.
    AuthTimeout,
    /// The first frame was not `auth` (and anonymous clients are not allowed).
    AuthExpected,
    /// The `auth` frame's token was refused.
    AuthFailed,
    /// The connection's token expired.
    TokenExpired,
    /// A connection limit of DESIGN.md §7 is reached.
    Full(Full),
    /// A frame over the frame limit.
    TooBig,
    /// Not WebSocket as RFC 6455 has it.
    ProtocolError,
    /// A no-ack subscription with `overflow: disconnect` filled the outbound buffer.
    SlowConsumer,
    /// The client accepted nothing for `limits.write_timeout`, or writing failed.
    WriteStalled,
    /// The engine gave the connection no channel.
    EngineUnavailable,
    Shutdown,
    /// Closed by an administrator (`DELETE /v1/connections/{id}`).
    ClosedByAdmin,
}

impl Closing for CloseReason {
    /// The close frame the gateway sends; `None` when the client cannot be written to.
    fn frame(self) -> Option<(u16, &'static str)> {
        use CloseReason::*;
        Some(match self {
            WriteStalled => return None,
            // The closing handshake's answer.
            ClientClosed => (1000, ""),
            AuthTimeout => (
                close::UNAUTHENTICATED,
                "no auth frame within ws.auth_timeout",
            ),
            AuthExpected => (close::UNAUTHENTICATED, "the first frame must be auth"),
            AuthFailed => (close::UNAUTHENTICATED, "invalid token"),
            TokenExpired => (close::UNAUTHENTICATED, "token expired"),
            Full(full) => (close::TRY_AGAIN_LATER, full.as_str()),
            TooBig => (close::TOO_BIG, "frame larger than the frame limit"),
            ProtocolError => (1002, "protocol error"),
            SlowConsumer => (close::SLOW_CONSUMER, "slow consumer: outbound buffer full"),
            EngineUnavailable => (1011, "engine unavailable"),
            Shutdown => (close::SHUTDOWN, "gateway shutting down"),
            ClosedByAdmin => (close::CLOSED_BY_ADMIN, "closed by an administrator"),
        })
    }

    /// Whether the close frame goes out at once, ahead of what is still buffered (the buffer is
    /// the problem), rather than after it.
    fn is_urgent(self) -> bool {
        matches!(
            self,
            CloseReason::SlowConsumer
                | CloseReason::Full(_)
                | CloseReason::EngineUnavailable
                | CloseReason::ClientClosed
                | CloseReason::WriteStalled
        )
    }
}

impl CloseReason {
    /// The `reason` label of `gateway_connections_closed_total`.
    pub fn as_str(self) -> &'static str {
        use CloseReason::*;
        match self {
            ClientClosed => "client_closed",
            AuthTimeout => "auth_timeout",
            AuthExpected => "auth_expected",
            AuthFailed => "auth_failed",
            TokenExpired => "token_expired",
            Full(full) => full.as_str(),
            TooBig => "too_big",
            ProtocolError => "protocol_error",
            SlowConsumer => "slow_consumer",
            WriteStalled => "write_stalled",
            EngineUnavailable => "engine_unavailable",
            Shutdown => "server_shutting_down",
            ClosedByAdmin => "closed_by_admin",
        }
    }

    /// Whether the close is worth an info line (the rest are routine and logged at debug).
    pub fn is_notable(self) -> bool {
        !matches!(self, CloseReason::ClientClosed | CloseReason::Shutdown)
    }
}
