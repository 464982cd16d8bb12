//! What goes wrong on an AMQP connection, typed by its scope: a channel error closes that
//! channel (`channel.close`), a connection error the whole connection (`connection.close`),
//! each with the reply code and the class and method that caused it (AMQP 0-9-1 §1.9, the
//! reply-code table). Engine errors and publish refusals become one here, once.

use amq_protocol::protocol::AMQPClass;

use crate::context::PublishRefused;
use crate::engine::EngineError;

pub const CONNECTION_FORCED: u16 = 320;
pub const ACCESS_REFUSED: u16 = 403;
pub const NOT_FOUND: u16 = 404;
pub const PRECONDITION_FAILED: u16 = 406;
pub const CONTENT_TOO_LARGE: u16 = 311;
pub const NO_ROUTE: u16 = 312;
pub const FRAME_ERROR: u16 = 501;
pub const COMMAND_INVALID: u16 = 503;
pub const CHANNEL_ERROR: u16 = 504;
pub const UNEXPECTED_FRAME: u16 = 505;
pub const NOT_ALLOWED: u16 = 530;
pub const NOT_IMPLEMENTED: u16 = 540;

/// The close a fault sends: code, text and what caused it (0, 0 when no method did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("channel error {}: {}", .0.code, .0.text)]
    Channel(Reply),
    #[error("connection error {}: {}", .0.code, .0.text)]
    Connection(Reply),
}

/// The class and method ids of `method`, for the close it causes.
pub fn ids(method: &AMQPClass) -> (u16, u16) {
    (method.get_amqp_class_id(), method.get_amqp_method_id())
}

impl Fault {
    pub fn channel(code: u16, text: impl Into<String>, (class_id, method_id): (u16, u16)) -> Self {
        Fault::Channel(Reply {
            code,
            text: text_of(code, text.into()),
            class_id,
            method_id,
        })
    }

    pub fn connection(
        code: u16,
        text: impl Into<String>,
        (class_id, method_id): (u16, u16),
    ) -> Self {
        Fault::Connection(Reply {
            code,
            text: text_of(code, text.into()),
            class_id,
            method_id,
        })
    }

    /// An engine error as AMQP answers it: hard codes (3xx, 5xx) close the connection, the
    /// rest the channel.
    pub fn engine(e: &EngineError, method: (u16, u16)) -> Self {
        let code = e.reply_code();
        if code == CONNECTION_FORCED || code >= 500 {
            Fault::connection(code, e.to_string(), method)
        } else {
            Fault::channel(code, e.to_string(), method)
        }
    }

    pub fn refused(r: &PublishRefused, method: (u16, u16)) -> Self {
        Fault::channel(ACCESS_REFUSED, r.to_string(), method)
    }

    pub fn forbidden(what: impl std::fmt::Display, method: (u16, u16)) -> Self {
        Fault::channel(ACCESS_REFUSED, format!("access refused: {what}"), method)
    }

    pub fn reply(&self) -> &Reply {
        match self {
            Fault::Channel(r) | Fault::Connection(r) => r,
        }
    }
}

/// RabbitMQ's form, which clients show as they get it: `NOT_FOUND - no queue 'q'`.
fn text_of(code: u16, text: String) -> String {
    let name = match code {
        311 => "CONTENT_TOO_LARGE",
        312 => "NO_ROUTE",
        320 => "CONNECTION_FORCED",
        403 => "ACCESS_REFUSED",
        404 => "NOT_FOUND",
        405 => "RESOURCE_LOCKED",
        406 => "PRECONDITION_FAILED",
        501 => "FRAME_ERROR",
        502 => "SYNTAX_ERROR",
        503 => "COMMAND_INVALID",
        504 => "CHANNEL_ERROR",
        505 => "UNEXPECTED_FRAME",
        506 => "RESOURCE_ERROR",
        530 => "NOT_ALLOWED",
        540 => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    };
    let mut full = format!("{name} - {text}");
    // A short string on the wire.
    if full.len() > 255 {
        let mut end = 255;
        while !full.is_char_boundary(end) {
            end -= 1;
        }
        full.truncate(end);
    }
    full
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ObjectKind;

    #[test]
    fn engine_errors_pick_their_scope() {
        let missing = EngineError::NotFound {
            kind: ObjectKind::Queue,
            name: "q".into(),
        };
        let f = Fault::engine(&missing, (50, 10));
        assert!(
            matches!(&f, Fault::Channel(r) if r.code == 404 && r.text == "NOT_FOUND - no queue 'q'")
        );
        let f = Fault::engine(&EngineError::NotSupported("x".into()), (40, 30));
        assert!(matches!(&f, Fault::Connection(r) if r.code == 540 && r.class_id == 40));
        assert!(
            Fault::channel(406, "é".repeat(200), (0, 0))
                .reply()
                .text
                .len()
                <= 255
        );
    }
}
