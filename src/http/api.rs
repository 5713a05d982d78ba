//! The JSON API under `/api/v1`, described by `openapi.json` beside this file (served at
//! `/api/v1/openapi.json`). Every request carries `Authorization: Bearer TOKEN`; every handler
//! asks [`auth::authorize`] before it shows or changes anything; a deal the user may not see is
//! answered 404 like a deal that does not exist. Errors are `{"error": {"code", "message",
//! "field"}}`; a body that is not JSON, names an unknown field or is too large is a 400 or 413.
//!
//! Edits go through [`crate::edit`], the same functions as `deals set` and `deals move`, so an API
//! change is a run in the history (source `api`, message "by USER") and reaches the files the
//! same way. This module must not clean values or write SQL itself.

use std::collections::HashSet;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, MethodRouter};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::auth::{self, authorize, Action, User};
use super::{with_store, ApiError, ClientAddress, SharedState};
use crate::config::Config;
use crate::deal::{normalize_label, Deal, DealId, Field};
use crate::edit::{self, EditError, Origin};
use crate::store::{CrmStore, DealFilter};

/// Every operation of the API: its method and path (as `openapi.json` spells them) and its
/// handler. The router is made from this list alone, so a test comparing [`operations`] with the
/// document compares the document with what is served.
fn endpoints() -> Vec<(&'static str, &'static str, MethodRouter<SharedState>)> {
    vec![
        ("get", "/openapi.json", get(openapi)),
        ("get", "/deals", get(list_deals)),
        ("post", "/deals", post(create_deal)),
        ("get", "/deals/{id}", get(get_deal)),
        ("patch", "/deals/{id}", patch(patch_deal)),
        ("post", "/deals/{id}/move", post(move_deal)),
        ("get", "/funnel", get(funnel)),
        ("get", "/stalled", get(stalled)),
        ("get", "/status", get(status)),
        ("get", "/errors", get(errors)),
        ("get", "/conflicts", get(conflicts)),
        ("get", "/history", get(history)),
        ("get", "/history/{run}", get(history_run)),
        ("post", "/history/{run}/undo", post(undo)),
        ("post", "/files/force", post(force_file)),
    ]
}

/// The method and path of every operation the router serves under `/api/v1`.
#[cfg(test)]
fn operations() -> Vec<(&'static str, &'static str)> {
    endpoints()
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect()
}

pub fn routes() -> Router<SharedState> {
    endpoints()
        .into_iter()
        .fold(Router::new(), |router, (_, path, handler)| {
            router.route(path, handler)
        })
        .fallback(|| async { ApiError::not_found("there is no such API path") })
}

/// Turns the plain-text errors of the layers and extractors (a path that is not a number, a body
/// over the limit, a timeout) into the API's JSON error shape, for API paths.
pub async fn json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let is_api = request.uri().path().starts_with("/api/");
    let response = next.run(request).await;
    if !is_api {
        return response;
    }
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        _ if status.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text.chars().take(300).collect()
    };
    let mut response = ApiError::new(status, code, message).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
    response
}

/// The user behind `Authorization: Bearer TOKEN`. Bad tokens count as failed logins.
pub struct ApiUser(pub std::sync::Arc<User>);

impl FromRequestParts<SharedState> for ApiUser {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        let Ok(ClientAddress(address)) = ClientAddress::from_request_parts(parts, state).await;
        let unauthorized = |message: &str| {
            let mut response =
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        };
        let Some(token) = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
        else {
            return Err(unauthorized(
                "send the token as `Authorization: Bearer TOKEN`",
            ));
        };
        // The token is looked up first: a valid one is never refused by the limiter, which
        // counts and refuses failures only.
        match state.users().by_token(token) {
            Some(user) => Ok(ApiUser(user)),
            None if state.limiter.failed(address) => {
                tracing::warn!(client = %address, "refused an API request with an unknown token from a limited address");
                Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_requests",
                    "too many failed logins from this address; wait a few minutes",
                )
                .into_response())
            }
            None => {
                tracing::warn!(client = %address, "refused an API request with an unknown token");
                Err(unauthorized("the token is not valid"))
            }
        }
    }
}

/// A JSON object from a request body: `Content-Type: application/json`, valid JSON, an object.
fn json_object(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let body = body.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "payload_too_large"
            } else {
                "bad_request"
            },
            rejection.body_text(),
        )
    })?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim_start().starts_with("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ));
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body must be a JSON object",
        )),
        Err(error) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not valid JSON: {error}"),
        )),
    }
}

/// A body object as a typed request (unknown members are refused by the type).
fn typed<T: serde::de::DeserializeOwned>(object: Map<String, Value>) -> Result<T, ApiError> {
    serde_json::from_value(Value::Object(object))
        .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("{error}")))
}

/// The `extra` member of a body: values of unmapped columns by header (a string, or null to
/// remove one), such as a contract number an ERP pushes back.
fn extra_assignments(object: &Map<String, Value>) -> Result<edit::ExtraChanges, ApiError> {
    let invalid = |message: String| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_value", message).with_field("extra")
    };
    let Some(extra) = object.get("extra") else {
        return Ok(Vec::new());
    };
    let Value::Object(extra) = extra else {
        return Err(invalid(
            "extra: give an object of column names and values".to_string(),
        ));
    };
    let mut changes = Vec::new();
    for (key, value) in extra {
        if key.trim().is_empty() || key.chars().count() > 200 {
            return Err(invalid(
                "extra: a column name is 1 to 200 characters".to_string(),
            ));
        }
        match value {
            Value::String(text) if text.chars().count() <= 32_767 => {
                changes.push((key.trim().to_string(), Some(text.clone())))
            }
            Value::Null => changes.push((key.trim().to_string(), None)),
            _ => {
                return Err(invalid(format!(
                    "extra.{key}: give a string (at most 32767 characters) or null"
                )))
            }
        }
    }
    Ok(changes)
}

/// Field assignments from a JSON object: strings as written, numbers as their text, null clears.
fn assignments(object: &Map<String, Value>) -> Result<Vec<(Field, String)>, ApiError> {
    let mut pairs = Vec::new();
    for (name, value) in object.iter().filter(|(name, _)| *name != "extra") {
        let Some(field) = Field::from_name(name) else {
            let fields: Vec<&str> = Field::ALL.iter().map(|field| field.name()).collect();
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_field",
                format!("\"{name}\" is not a field ({})", fields.join(", ")),
            )
            .with_field(name.clone()));
        };
        let text = match value {
            Value::String(text) => text.clone(),
            Value::Number(number) => number.to_string(),
            Value::Null => String::new(),
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_value",
                    format!("{field}: give a string, a number or null"),
                )
                .with_field(field.name()))
            }
        };
        pairs.push((field, text));
    }
    Ok(pairs)
}

/// Asks [`authorize`] whether the user may set each field to its value.
fn may_set(user: &User, pairs: &[(Field, String)]) -> Result<(), ApiError> {
    for (field, text) in pairs {
        let value = Some(text.as_str()).filter(|text| !text.trim().is_empty());
        authorize(user, Action::SetField(*field, value)).map_err(|refusal| {
            ApiError::from_refusal(refusal, "such field").with_field(field.name())
        })?;
    }
    Ok(())
}

fn cleaned(config: &Config, pairs: &[(Field, String)]) -> Result<edit::Changes, ApiError> {
    edit::clean_assignments(
        config,
        pairs
            .iter()
            .map(|(field, text)| (field.name(), text.as_str())),
    )
    .map_err(invalid)
}

fn invalid(problems: Vec<edit::FieldProblem>) -> ApiError {
    let field = problems.first().and_then(|problem| problem.field.clone());
    let message = problems
        .iter()
        .map(|problem| problem.message.clone())
        .collect::<Vec<_>>()
        .join("; ");
    let error = ApiError::new(StatusCode::BAD_REQUEST, "invalid_value", message);
    match field {
        Some(field) => error.with_field(field),
        None => error,
    }
}

fn edit_error(error: EditError) -> ApiError {
    match error {
        EditError::NoSuchDeal(id) => ApiError::not_found(format!("there is no deal {id}")),
        EditError::Stale {
            id,
            expected,
            current,
        } => ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            format!("deal {id} changed since version {expected}; it is at version {current} now: read it again"),
        ),
        EditError::Refused(why) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", why),
        EditError::Invalid(problems) => invalid(problems),
        EditError::Store(error) => ApiError::internal(error),
    }
}

/// The version an `If-Match` header asks for: `"12"`, `W/"12"` or `12`; `*` or no header asks
/// for none.
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text == "*" {
        return Ok(None);
    }
    text.trim_start_matches("W/")
        .trim_matches('"')
        .parse::<i64>()
        .map(Some)
        .map_err(|_| {
            ApiError::bad_request(format!(
                "If-Match must be a deal's version such as \"12\" (its ETag), not {text:?}"
            ))
            .with_field("If-Match")
        })
}

/// A deal as the user may see it: every field they see (null when empty), `extra`, the times, and
/// its `version` (also its ETag).
pub fn deal_view(user: &User, deal: &Deal, version: i64) -> Value {
    let mut value = deal.to_json();
    if let Value::Object(object) = &mut value {
        for field in Field::ALL {
            if !user.sees(field) {
                object.remove(field.name());
            }
        }
        object.insert("version".to_string(), json!(version));
    }
    value
}

fn with_etag(version: i64, status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::ETAG, format!("\"{version}\""))],
        Json(body),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], super::OPENAPI).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DealQuery {
    pub stage: Option<String>,
    pub owner: Option<String>,
    pub stalled: Option<bool>,
    pub q: Option<String>,
    pub updated_since: Option<String>,
    pub include_archived: Option<bool>,
    pub limit: Option<usize>,
    pub offset: Option<usize>,
}

impl DealQuery {
    /// Every stalled deal the user sees, worst first.
    pub fn stalled() -> DealQuery {
        DealQuery {
            stage: None,
            owner: None,
            stalled: Some(true),
            q: None,
            updated_since: None,
            include_archived: None,
            limit: Some(1000),
            offset: None,
        }
    }
}

/// The deals a user sees for a query, worst stall first when `stalled`, with each stall's reason.
pub struct DealList {
    pub deals: Vec<(Deal, i64, Option<String>)>,
    pub total: usize,
}

fn parse_since(written: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(written)
        .map(|at| at.with_timezone(&chrono::Utc))
        .ok()
        .or_else(|| {
            chrono::NaiveDate::parse_from_str(written, "%Y-%m-%d")
                .ok()
                .map(|day| day.and_time(chrono::NaiveTime::MIN).and_utc())
        })
}

/// Lists the deals of a query that the user may see (shared by the API and the pages).
pub fn query_deals(
    store: &crate::store::Store,
    config: &Config,
    user: &User,
    query: &DealQuery,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<DealList, ApiError> {
    let stage = match query
        .stage
        .as_deref()
        .filter(|stage| !stage.trim().is_empty())
    {
        None => None,
        Some(written) => Some(
            config
                .stages
                .resolve(written)
                .map(|stage| stage.name.clone())
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "\"{written}\" is not a stage; the stages are {} (or their aliases)",
                        config.stages.names().join(", ")
                    ))
                    .with_field("stage")
                })?,
        ),
    };
    let updated_since = match query.updated_since.as_deref() {
        None => None,
        Some(written) => Some(parse_since(written).ok_or_else(|| {
            ApiError::bad_request(format!(
                "\"{written}\" is not a time such as 2026-11-28 or 2026-11-28T09:00:00Z"
            ))
            .with_field("updated_since")
        })?),
    };
    let owner = query.owner.clone().filter(|owner| !owner.trim().is_empty());
    // A filter on a field the user does not see would tell its values by what it lets through.
    for (field, asked) in [
        (Field::Stage, stage.is_some()),
        (Field::Owner, owner.is_some()),
    ] {
        if asked && !user.sees(field) {
            return Err(ApiError::bad_request(format!(
                "the field {field} is not shown to this user; it cannot filter by it"
            ))
            .with_field(field.name()));
        }
    }
    let crm = store.crm();
    let mut deals = crm.list_deals(&DealFilter {
        stage,
        owner,
        include_archived: query.include_archived.unwrap_or(false),
    })?;
    deals.retain(|deal| authorize(user, Action::ReadDeal(deal)).is_ok());
    if let Some(since) = updated_since {
        deals.retain(|deal| deal.updated_at >= since);
    }
    if let Some(words) = query
        .q
        .as_deref()
        .map(normalize_label)
        .filter(|q| !q.is_empty())
    {
        let searched = [
            Field::Company,
            Field::Contact,
            Field::Email,
            Field::Phone,
            Field::Owner,
            Field::NextStep,
        ];
        deals.retain(|deal| {
            searched.iter().any(|field| {
                user.sees(*field)
                    && deal
                        .fields
                        .get(field)
                        .is_some_and(|value| normalize_label(&value.to_string()).contains(&words))
            })
        });
    }
    let mut reasons = if query.stalled.unwrap_or(false) {
        crate::remind::keep_stalled(&mut deals, config, now)
    } else {
        Default::default()
    };
    // A stall's reason names the stage ("in Prospect for 12 days"): without the stage, only that
    // the deal is over its limit is said.
    if !user.sees(Field::Stage) {
        for reason in reasons.values_mut() {
            *reason = "over its stage's time limit".to_string();
        }
    }
    let total = deals.len();
    let offset = query.offset.unwrap_or(0);
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let page: Vec<Deal> = deals.into_iter().skip(offset).take(limit).collect();
    let ids: Vec<DealId> = page.iter().map(|deal| deal.id).collect();
    let versions = crm.deal_versions(&ids)?;
    Ok(DealList {
        total,
        deals: page
            .into_iter()
            .map(|deal| {
                let version = versions.get(&deal.id).copied().unwrap_or(0);
                let reason = reasons.remove(&deal.id);
                (deal, version, reason)
            })
            .collect(),
    })
}

async fn list_deals(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
    query: Result<Query<DealQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    with_store(&state, move |store, config| {
        let list = query_deals(store, config, &user, &query, chrono::Utc::now())?;
        let deals: Vec<Value> = list
            .deals
            .iter()
            .map(|(deal, version, reason)| {
                let mut value = deal_view(&user, deal, *version);
                if let Some(reason) = reason {
                    value["stalled"] = json!(reason);
                }
                value
            })
            .collect();
        Ok(Json(json!({
            "deals": deals,
            "total": list.total,
            "offset": query.offset.unwrap_or(0),
            "limit": query.limit.unwrap_or(100).clamp(1, 1000),
        })))
    })
    .await
}

/// One deal with its stage history and the files that show it, as the user may see it.
pub struct DealDetail {
    pub deal: Deal,
    pub version: i64,
    pub history: Vec<crate::store::StageChange>,
    pub files: Vec<String>,
}

pub fn load_deal(
    store: &crate::store::Store,
    user: &User,
    id: DealId,
) -> Result<DealDetail, ApiError> {
    let crm = store.crm();
    let deal = crm
        .deals_by_ids(&[id])?
        .remove(&id)
        .ok_or_else(|| ApiError::not_found(format!("there is no deal {id}")))?;
    authorize(user, Action::ReadDeal(&deal))
        .map_err(|refusal| ApiError::from_refusal(refusal, &format!("deal {id}")))?;
    let version = crm.deal_versions(&[id])?.remove(&id).unwrap_or(0);
    let history = crm.stage_history(id)?;
    let mut files: Vec<String> = crate::store::mirror::files_holding(&store.db(), &[id])?
        .into_iter()
        .collect();
    files.sort();
    Ok(DealDetail {
        deal,
        version,
        history,
        files,
    })
}

async fn get_deal(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
    Path(id): Path<DealId>,
) -> Result<Response, ApiError> {
    with_store(&state, move |store, _| {
        let detail = load_deal(store, &user, id)?;
        let mut body = deal_view(&user, &detail.deal, detail.version);
        // The stage history is the stage field over time: hidden with it.
        if user.sees(Field::Stage) {
            body["stage_history"] = json!(detail.history);
        }
        body["files"] = json!(detail.files);
        Ok(with_etag(detail.version, StatusCode::OK, body))
    })
    .await
}

/// Applies cleaned changes to a deal as `user` (shared by the API and the pages' forms).
pub fn change_deal(
    store: &mut crate::store::Store,
    config: &Config,
    user: &User,
    id: DealId,
    request: edit::EditRequest,
) -> Result<edit::EditOutcome, ApiError> {
    edit::apply_changes(
        store,
        config,
        id,
        request,
        Origin {
            source: "api",
            user: Some(&user.name),
        },
        |deal| match authorize(user, Action::ChangeDeal(deal)) {
            Ok(()) => Ok(()),
            Err(auth::Refusal::NotFound) => Err(EditError::NoSuchDeal(id)),
            Err(auth::Refusal::Forbidden(why)) => Err(EditError::Refused(why)),
        },
        chrono::Utc::now(),
    )
    .map_err(edit_error)
}

fn edited(user: &User, outcome: edit::EditOutcome) -> Response {
    let mut body = deal_view(user, &outcome.deal, outcome.version);
    body["run_id"] = json!(outcome.run_id);
    with_etag(outcome.version, StatusCode::OK, body)
}

async fn patch_deal(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
    Path(id): Path<DealId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let object = json_object(&headers, body)?;
    let expected = if_match(&headers)?;
    let pairs = assignments(&object)?;
    let extra = extra_assignments(&object)?;
    if pairs.is_empty() && extra.is_empty() {
        return Err(ApiError::bad_request("give at least one field to change"));
    }
    may_set(&user, &pairs)?;
    let changes = cleaned(&state.config(), &pairs)?;
    let request = edit::EditRequest {
        changes,
        extra_changes: extra,
        expected_version: expected,
    };
    apply_edit(&state, user, id, request).await
}

/// Applies an edit as `user` on a blocking thread and answers with the deal.
async fn apply_edit(
    state: &SharedState,
    user: std::sync::Arc<User>,
    id: DealId,
    request: edit::EditRequest,
) -> Result<Response, ApiError> {
    with_store(state, move |store, config| {
        let outcome = change_deal(store, config, &user, id, request)?;
        Ok(edited(&user, outcome))
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveBody {
    stage: String,
}

async fn move_deal(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
    Path(id): Path<DealId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let object = json_object(&headers, body)?;
    let body: MoveBody = typed(object)?;
    let expected = if_match(&headers)?;
    may_set(&user, &[(Field::Stage, body.stage.clone())])?;
    let changes = edit::clean_stage(&state.config(), &body.stage)
        .map_err(|problem| invalid(vec![problem]))?;
    let request = edit::EditRequest {
        changes,
        expected_version: expected,
        ..edit::EditRequest::default()
    };
    apply_edit(&state, user, id, request).await
}

async fn create_deal(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let object = json_object(&headers, body)?;
    authorize(&user, Action::CreateDeal)
        .map_err(|refusal| ApiError::from_refusal(refusal, "deal"))?;
    if object.contains_key("extra") {
        return Err(ApiError::bad_request(
            "a new deal takes fields only; set extra values with PATCH",
        )
        .with_field("extra"));
    }
    let mut pairs = assignments(&object)?;
    // A rep's new deal is theirs.
    if let Some(rep) = &user.rep {
        if !pairs.iter().any(|(field, _)| *field == Field::Owner) {
            pairs.push((Field::Owner, rep.clone()));
        }
    }
    may_set(&user, &pairs)?;
    let changes = cleaned(&state.config(), &pairs)?;
    with_store(&state, move |store, config| {
        let outcome = edit::create_deal(
            store,
            config,
            changes,
            Origin {
                source: "api",
                user: Some(&user.name),
            },
            chrono::Utc::now(),
        )
        .map_err(edit_error)?;
        let id = outcome.deal.id;
        let mut response = edited(&user, outcome);
        *response.status_mut() = StatusCode::CREATED;
        if let Ok(location) = header::HeaderValue::from_str(&format!("/api/v1/deals/{id}")) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        Ok(response)
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelQuery {
    pub since: Option<chrono::NaiveDate>,
    pub until: Option<chrono::NaiveDate>,
    pub owner: Option<String>,
}

/// The funnel (the `funnel --format json` object) as the user may see it: a rep's own; amounts
/// left out (null) when the user does not see amounts; hidden fields of the listed deals too.
pub fn load_funnel(
    store: &crate::store::Store,
    config: &Config,
    user: &User,
    query: &FunnelQuery,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(crate::funnel::FunnelReport, Value), ApiError> {
    if let (Some(since), Some(until)) = (query.since, query.until) {
        if since > until {
            return Err(
                ApiError::bad_request(format!("since {since} is after until {until}"))
                    .with_field("since"),
            );
        }
    }
    let asked_owner = query.owner.clone().filter(|owner| !owner.trim().is_empty());
    if asked_owner.is_some() && !user.sees(Field::Owner) {
        return Err(ApiError::bad_request(
            "the field owner is not shown to this user; it cannot filter by it",
        )
        .with_field("owner"));
    }
    let owner = asked_owner.or_else(|| user.rep.clone());
    authorize(user, Action::ReadFunnel(owner.as_deref()))
        .map_err(|refusal| ApiError::from_refusal(refusal, "funnel"))?;
    let period = crate::funnel::Period::between(query.since, query.until, now);
    let mut report = crate::report::load(store, config, period, now, owner.as_deref())?;
    let deals = store.crm().deals_by_ids(
        &report
            .forecast
            .deals
            .iter()
            .map(|line| line.deal_id)
            .chain(report.stalled.iter().map(|line| line.deal_id))
            .collect::<Vec<_>>(),
    )?;
    let visible = |id: &DealId| {
        deals
            .get(id)
            .is_some_and(|deal| authorize(user, Action::ReadDeal(deal)).is_ok())
    };
    report.forecast.deals.retain(|line| visible(&line.deal_id));
    report.stalled.retain(|line| visible(&line.deal_id));
    if !user.sees(Field::Stage) {
        hide_stages(&mut report);
    }
    let mut value = serde_json::to_value(&report).map_err(ApiError::internal)?;
    redact(&mut value, user);
    Ok((report, value))
}

/// The funnel of a user who may not see stages: the totals (open, won and lost deals, their
/// amounts, the win rate), the forecast and the owners, without the per-stage figures and without
/// a stage's name, probability or win rate on any line.
fn hide_stages(report: &mut crate::funnel::FunnelReport) {
    report.stages.clear();
    for line in &mut report.forecast.deals {
        line.stage.clear();
        line.probability = 0.0;
        line.historical_win_rate = None;
    }
    for line in &mut report.stalled {
        line.stage.clear();
        line.reason.clear();
    }
}

/// Keys of a funnel line that tell its stage (besides `stage` itself).
const STAGE_KEYS: [&str; 3] = ["reason", "probability", "historical_win_rate"];

/// Keys of the funnel object that are amounts.
const AMOUNT_KEYS: [&str; 7] = [
    "open_amount",
    "weighted_amount",
    "won_amount",
    "weighted_pipeline",
    "history_based",
    "amount",
    "weighted",
];

/// Nulls what the user does not see: amounts when `amount` is hidden, stall reasons and what
/// else tells a stage ([`STAGE_KEYS`]) when `stage` is, and hidden fields by name.
fn redact(value: &mut Value, user: &User) {
    match value {
        Value::Object(object) => {
            for (key, inner) in object.iter_mut() {
                let hidden_field = Field::from_name(key).is_some_and(|field| !user.sees(field));
                let hidden_amount =
                    !user.sees(Field::Amount) && AMOUNT_KEYS.contains(&key.as_str());
                // A stall's reason names the deal's stage; a line's probability is its stage's.
                let hidden_reason = !user.sees(Field::Stage) && STAGE_KEYS.contains(&key.as_str());
                if hidden_field || hidden_amount || hidden_reason {
                    *inner = Value::Null;
                } else {
                    redact(inner, user);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| redact(item, user)),
        _ => {}
    }
}

async fn funnel(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
    query: Result<Query<FunnelQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    with_store(&state, move |store, config| {
        let (_, value) = load_funnel(store, config, &user, &query, chrono::Utc::now())?;
        Ok(Json(value))
    })
    .await
}

async fn stalled(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
) -> Result<Json<Value>, ApiError> {
    with_store(&state, move |store, config| {
        let query = DealQuery::stalled();
        let list = query_deals(store, config, &user, &query, chrono::Utc::now())?;
        let stalled: Vec<Value> = list
            .deals
            .iter()
            .map(|(deal, version, reason)| json!({"reason": reason, "deal": deal_view(&user, deal, *version)}))
            .collect();
        Ok(Json(json!(stalled)))
    })
    .await
}

fn administer(user: &User) -> Result<(), ApiError> {
    authorize(user, Action::Administer)
        .map_err(|refusal| ApiError::from_refusal(refusal, "such page"))
}

/// An admin-only read: authorised first, then `job` on the store, answered as JSON.
async fn admin_read<T: serde::Serialize + Send + 'static>(
    state: &SharedState,
    user: &User,
    job: impl FnOnce(&crate::store::Store) -> Result<T, ApiError> + Send + 'static,
) -> Result<Json<Value>, ApiError> {
    administer(user)?;
    with_store(state, move |store, _| Ok(Json(json!(job(store)?)))).await
}

async fn status(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
) -> Result<Json<Value>, ApiError> {
    admin_read(&state, &user, |store| {
        Ok(crate::store::files::file_overview(&store.db())?)
    })
    .await
}

async fn errors(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
) -> Result<Json<Value>, ApiError> {
    admin_read(&state, &user, |store| {
        Ok(crate::store::mirror::current_issues(&store.db())?)
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    limit: Option<usize>,
    source: Option<String>,
}

async fn conflicts(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
    query: Result<Query<LimitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    admin_read(&state, &user, move |store| {
        Ok(store
            .crm()
            .conflicts(query.limit.unwrap_or(50).min(10_000))?)
    })
    .await
}

async fn history(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
    query: Result<Query<LimitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    admin_read(&state, &user, move |store| {
        let mut runs = store.crm().last_runs(10_000)?;
        if let Some(source) = &query.source {
            runs.retain(|run| &run.source == source);
        }
        runs.truncate(query.limit.unwrap_or(20).min(10_000));
        Ok(runs)
    })
    .await
}

async fn history_run(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
    Path(run_id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    admin_read(&state, &user, move |store| {
        let crm = store.crm();
        let run = crm
            .run(run_id)?
            .ok_or_else(|| ApiError::not_found(format!("there is no run {run_id}")))?;
        let changes = crm.changes_of_run(run_id)?;
        Ok(json!({"run": run, "changes": changes}))
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UndoQuery {
    force: Option<bool>,
}

async fn undo(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
    Path(run_id): Path<i64>,
    query: Result<Query<UndoQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    authorize(&user, Action::Undo)
        .map_err(|refusal| ApiError::from_refusal(refusal, "such page"))?;
    with_store(&state, move |store, _| {
        match crate::history::undo(
            store,
            run_id,
            query.force.unwrap_or(false),
            chrono::Utc::now(),
        ) {
            Ok(report) => {
                // The undo's run names who asked for it, as an API edit's does. History's undo
                // knows no user, so the message is completed right after, in a statement of its
                // own: at worst a crash between the two leaves the run without the name.
                if let Some(undo_run) = report.run_id {
                    let crm = store.crm();
                    if let Some(run) = crm.run(undo_run)? {
                        let message = match run.message {
                            Some(message) => format!("{message}; by {}", user.name),
                            None => format!("by {}", user.name),
                        };
                        crm.note_on_run(undo_run, None, &message)?;
                    }
                }
                Ok(Json(json!(report)))
            }
            Err(crate::history::UndoError::NoSuchRun(run)) => {
                Err(ApiError::not_found(format!("there is no run {run}")))
            }
            Err(error) => Err(ApiError::internal(error)),
        }
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceBody {
    file: String,
}

/// Asks the daemon to apply a held file (the known files only; nothing else is synced).
pub async fn force(state: &SharedState, user: &User, file: &str) -> Result<(), ApiError> {
    authorize(user, Action::ForceFile)
        .map_err(|refusal| ApiError::from_refusal(refusal, "such page"))?;
    let file_owned = file.to_string();
    let known: HashSet<String> = with_store(state, |store, _| {
        Ok(crate::store::files::file_overview(&store.db())?
            .into_iter()
            .map(|file| file.file)
            .collect())
    })
    .await?;
    if !known.contains(&file_owned) {
        return Err(
            ApiError::not_found(format!("there is no file {file_owned}")).with_field("file"),
        );
    }
    match &state.daemon {
        Some(link) if (link.force_sync)(file_owned.clone()) => {
            tracing::info!(file = %file_owned, user = %user.name, "forced sync asked for through HTTP");
            Ok(())
        }
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_daemon",
            "only `funnelsync run` can apply a held file; on the server run `funnelsync sync --force FILE`",
        )),
    }
}

async fn force_file(
    State(state): State<SharedState>,
    ApiUser(user): ApiUser,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let object = json_object(&headers, body)?;
    let body: ForceBody = typed(object)?;
    force(&state, &user, &body.file).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"file": body.file, "status": "scheduled"})),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// The document and the router name the same operations: none served undocumented, none
    /// documented that is not served.
    #[test]
    fn the_openapi_document_lists_exactly_the_routes_served() {
        let document: serde_json::Value =
            serde_json::from_str(super::super::OPENAPI).expect("openapi.json is JSON");
        let mut documented = BTreeSet::new();
        for (path, operations) in document["paths"].as_object().expect("paths") {
            for method in operations.as_object().expect("operations").keys() {
                if ["get", "put", "post", "delete", "patch", "head", "options"]
                    .contains(&method.as_str())
                {
                    documented.insert((method.clone(), path.clone()));
                }
            }
        }
        let served: BTreeSet<(String, String)> = super::operations()
            .into_iter()
            .map(|(method, path)| (method.to_string(), path.to_string()))
            .collect();
        assert_eq!(
            served.difference(&documented).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "served but not documented"
        );
        assert_eq!(
            documented.difference(&served).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "documented but not served"
        );
    }
}
