//! The operator's view of this instance's client connections (`/v1/connections`): list them
//! (paged, filtered), look at one, close one with a reason its client sees — MQTT 5 DISCONNECT
//! 0x98 (3.1.1: the socket closes), WebSocket close 4010, SSE `close` event 4010. Reading needs
//! `gateway.tag:monitoring` or administrator; closing needs administrator. In upstream mode
//! these are this instance's clients only.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;

use super::RestState;
use super::extract::{ApiPath, ApiQuery, Caller};
use super::problem::{ApiError, Problem};
use super::topology::{Page, PageParams, cursor_of};
use crate::auth::Principal;
use crate::context::registry::ConnectionView;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConnectionsQuery {
    /// Items per page, 1–1000 (default 100).
    page_size: Option<usize>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Only this protocol: `mqtt`, `ws`, `sse` or `amqp`.
    protocol: Option<String>,
    /// Only this token subject.
    subject: Option<String>,
    /// Only this MQTT client id.
    client_id: Option<String>,
}

fn may_monitor(principal: &Principal) -> Result<(), ApiError> {
    if principal.permissions.can_monitor() {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "connections need gateway.tag:monitoring or administrator",
        ))
    }
}

fn not_found(id: u64) -> ApiError {
    ApiError::not_found(format!("no connection {id} on this instance"))
}

/// List this instance's client connections.
#[utoipa::path(get, path = "/v1/connections", tag = "operations", params(ConnectionsQuery),
    responses((status = 200, body = Page<ConnectionView>),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs gateway.tag:monitoring or administrator", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list_connections(
    State(st): State<RestState>,
    Caller(principal): Caller,
    ApiQuery(q): ApiQuery<ConnectionsQuery>,
) -> Result<axum::Json<Page<ConnectionView>>, ApiError> {
    may_monitor(&principal)?;
    let page = PageParams {
        page_size: q.page_size,
        cursor: q.cursor.clone(),
    };
    let size = page.size()?;
    let after = page
        .after()?
        .map(|a| a.parse::<u64>())
        .transpose()
        .map_err(|_| ApiError::bad_request("cursor is not one this API returned"))?;
    let keep = |v: &ConnectionView| {
        q.protocol.as_ref().is_none_or(|p| *p == v.protocol)
            && q.subject.as_ref().is_none_or(|s| *s == v.subject)
            && q.client_id
                .as_ref()
                .is_none_or(|c| v.client_id.as_ref() == Some(c))
    };
    let mut items = st.ctx.registry.list(after, size + 1, keep);
    let next_cursor = if items.len() > size {
        items.truncate(size);
        items.last().map(|v| cursor_of(&v.id.to_string()))
    } else {
        None
    };
    Ok(axum::Json(Page { items, next_cursor }))
}

/// One connection: who, over what, since when, its subscriptions and buffer.
#[utoipa::path(get, path = "/v1/connections/{id}", tag = "operations",
    params(("id" = u64, Path, description = "Connection id")),
    responses((status = 200, body = ConnectionView),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get_connection(
    State(st): State<RestState>,
    Caller(principal): Caller,
    ApiPath(id): ApiPath<u64>,
) -> Result<axum::Json<ConnectionView>, ApiError> {
    may_monitor(&principal)?;
    st.ctx
        .registry
        .get(id)
        .map(axum::Json)
        .ok_or_else(|| not_found(id))
}

/// Close a connection; its client is told an administrator closed it.
#[utoipa::path(delete, path = "/v1/connections/{id}", tag = "operations",
    params(("id" = u64, Path, description = "Connection id")),
    responses((status = 204, description = "Closing"),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn close_connection(
    State(st): State<RestState>,
    Caller(principal): Caller,
    ApiPath(id): ApiPath<u64>,
) -> Result<StatusCode, ApiError> {
    if !principal.permissions.is_administrator() {
        return Err(ApiError::forbidden(
            "closing a connection needs administrator",
        ));
    }
    if st.ctx.registry.close(id) {
        tracing::info!(connection = id, by = %principal.subject, "connection closed by an administrator");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(id))
    }
}
