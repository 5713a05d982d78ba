//! The web pages: server-rendered HTML (maud, which escapes every value) for a phone on the way
//! to a meeting and for a desktop — the funnel as an SVG, the stalled deals, a searchable deal
//! list, a deal with its history, an edit form and a stage move, and (for admins) the files. A
//! browser logs in once with its token and keeps an `HttpOnly; SameSite=Strict` session cookie;
//! every form carries the session's CSRF token. English or Chinese, by `[http] language` or the
//! browser's `Accept-Language`. The style sheet and the small script are embedded in the binary.
//!
//! The pages read and change data through the same functions as the API (`api::query_deals`,
//! `api::load_deal`, `api::change_deal`, `api::load_funnel`), so the rules are the same; this
//! module only presents them.

use std::collections::HashMap;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::{html, Markup, DOCTYPE};

use super::api::{self, DealQuery, FunnelQuery};
use super::auth::{authorize, same_secret, Action, Session, User};
use super::{with_store, ApiError, ClientAddress, SharedState};
use crate::config::{Language, Role};
use crate::deal::{Deal, DealId, Field};
use crate::report::{days, money, percent};

const STYLE: &str = include_str!("assets/style.css");
const SCRIPT: &str = include_str!("assets/app.js");
const SESSION_COOKIE: &str = "funnelsync_session";

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/funnel") }))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/funnel", get(funnel_page))
        .route("/stalled", get(stalled_page))
        .route("/deals", get(deals_page))
        .route("/deals/{id}", get(deal_page).post(edit_deal))
        .route("/deals/{id}/move", post(move_deal))
        .route("/files", get(files_page))
        .route("/files/force", post(force_file))
        .route(
            "/assets/style.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE) }),
        )
        .route(
            "/assets/app.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    SCRIPT,
                )
            }),
        )
}

/// The text in the page's language.
fn tr(language: Language, english: &'static str, chinese: &'static str) -> &'static str {
    match language {
        Language::English => english,
        Language::Chinese => chinese,
    }
}

/// `[http] language`, else the browser's most preferred of English and Chinese.
fn language(state: &SharedState, headers: &HeaderMap) -> Language {
    if let Some(language) = state.config().http.as_ref().and_then(|http| http.language) {
        return language;
    }
    let accepted = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let mut best: Option<(f32, Language)> = None;
    for entry in accepted.split(',') {
        let mut parts = entry.split(';');
        let tag = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let quality = parts
            .find_map(|part| part.trim().strip_prefix("q="))
            .and_then(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        let language = if tag.starts_with("zh") {
            Language::Chinese
        } else if tag.starts_with("en") {
            Language::English
        } else {
            continue;
        };
        if best.is_none_or(|(best_quality, _)| quality > best_quality) {
            best = Some((quality, language));
        }
    }
    best.map(|(_, language)| language)
        .unwrap_or(Language::English)
}

fn field_label(language: Language, field: Field) -> &'static str {
    match field {
        Field::Company => tr(language, "Company", "公司"),
        Field::Contact => tr(language, "Contact", "联系人"),
        Field::Email => tr(language, "Email", "邮箱"),
        Field::Phone => tr(language, "Phone", "电话"),
        Field::Stage => tr(language, "Stage", "阶段"),
        Field::Amount => tr(language, "Amount", "金额"),
        Field::Currency => tr(language, "Currency", "币种"),
        Field::Owner => tr(language, "Owner", "负责人"),
        Field::NextStep => tr(language, "Next step", "下一步"),
        Field::LastContact => tr(language, "Last contact", "最近联系"),
        Field::ExpectedClose => tr(language, "Expected close", "预计成交"),
        Field::StageSince => tr(language, "In stage since", "进入阶段日期"),
        Field::CreatedOn => tr(language, "Created on", "创建日期"),
    }
}

/// A field's value as the pages show it and as the edit form holds it.
fn shown(deal: &Deal, field: Field) -> String {
    deal.fields
        .get(&field)
        .map(|value| value.to_string())
        .unwrap_or_default()
}

/// What names a deal on the pages: its company, when the user sees it, else its number.
fn title_of(user: &User, deal: &Deal) -> String {
    let company = shown(deal, Field::Company);
    if company.is_empty() || !user.sees(Field::Company) {
        format!("#{}", deal.id)
    } else {
        company
    }
}

fn stage_names(config: &crate::config::Config) -> Vec<String> {
    config
        .stages
        .names()
        .iter()
        .map(|name| name.to_string())
        .collect()
}

/// A logged-in browser: its user and session.
pub struct PageUser {
    user: std::sync::Arc<User>,
    session: Session,
    language: Language,
}

impl FromRequestParts<SharedState> for PageUser {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        let language = language(state, &parts.headers);
        let found = session_cookie(&parts.headers)
            .and_then(|cookie| state.sessions.find(&cookie))
            .and_then(|session| {
                state
                    .users()
                    .by_name(&session.user)
                    .map(|user| (user, session))
            });
        match found {
            Some((user, session)) => Ok(PageUser {
                user,
                session,
                language,
            }),
            None => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map(|path| path.as_str())
                    .unwrap_or("/");
                let target = format!("/login?next={}", encode_component(next));
                Err(Redirect::to(&target).into_response())
            }
        }
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_string())
}

/// Percent-encodes a query value.
fn encode_component(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Where to go after logging in: a path of this site only.
fn local_target(next: Option<&str>) -> String {
    match next {
        Some(next) if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') => {
            next.to_string()
        }
        _ => "/funnel".to_string(),
    }
}

fn layout(title: &str, page: &PageUser, current: &str, body: Markup) -> Markup {
    let language = page.language;
    let mut items = vec![
        ("/funnel", tr(language, "Funnel", "漏斗")),
        ("/stalled", tr(language, "Stalled", "停滞")),
        ("/deals", tr(language, "Deals", "商机")),
    ];
    if authorize(&page.user, Action::Administer).is_ok() {
        items.push(("/files", tr(language, "Files", "文件")));
    }
    document(
        title,
        language,
        html! {
            header.top {
                a.brand href="/funnel" { "funnelsync" }
                nav {
                    @for (href, label) in &items {
                        a href=(href) class=@if *href == current { "current" } { (label) }
                    }
                }
                form.logout method="post" action="/logout" {
                    input type="hidden" name="csrf" value=(page.session.csrf);
                    span.who { (page.user.name) }
                    button type="submit" { (tr(language, "Log out", "退出")) }
                }
            }
            main { (body) }
        },
    )
}

fn document(title: &str, language: Language, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang=(tr(language, "en", "zh-CN")) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · funnelsync" }
                link rel="stylesheet" href="/assets/style.css";
                script src="/assets/app.js" defer {}
            }
            body { (body) }
        }
    }
}

/// An error page (the API's error, in the page's words).
fn error_page(page: &PageUser, error: ApiError) -> Response {
    let language = page.language;
    let title = match error.status {
        StatusCode::NOT_FOUND => tr(language, "Not found", "未找到"),
        StatusCode::FORBIDDEN => tr(language, "Not allowed", "无权操作"),
        _ => tr(language, "Something went wrong", "出错了"),
    };
    let markup = layout(
        title,
        page,
        "",
        html! {
            h1 { (title) }
            p.error { (error.message) }
        },
    );
    (error.status, markup).into_response()
}

#[derive(Debug, Default, serde::Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

fn login_form(language: Language, next: &str, message: Option<&str>) -> Markup {
    document(
        tr(language, "Log in", "登录"),
        language,
        html! {
            main.login {
                h1 { "funnelsync" }
                form method="post" action="/login" {
                    @if let Some(message) = message {
                        p.error { (message) }
                    }
                    label for="token" { (tr(language, "Your access token", "访问令牌")) }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    input type="hidden" name="next" value=(next);
                    button type="submit" { (tr(language, "Log in", "登录")) }
                }
            }
        },
    )
}

async fn login_page(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Query(query): Query<LoginQuery>,
) -> Markup {
    let language = language(&state, &headers);
    login_form(language, &local_target(query.next.as_deref()), None)
}

#[derive(Debug, serde::Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login(
    State(state): State<SharedState>,
    ClientAddress(address): ClientAddress,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let language = language(&state, &headers);
    let next = local_target(form.next.as_deref());
    // The token is looked up first: a valid one is never refused by the limiter.
    let Some(user) = state.users().by_token(&form.token) else {
        if state.limiter.failed(address) {
            tracing::warn!(client = %address, "failed login on the pages from a limited address");
            let message = tr(
                language,
                "Too many failed logins from here. Wait a few minutes.",
                "登录失败次数过多，请稍后再试。",
            );
            return (
                StatusCode::TOO_MANY_REQUESTS,
                login_form(language, &next, Some(message)),
            )
                .into_response();
        }
        tracing::warn!(client = %address, "failed login on the pages");
        let message = tr(language, "That token is not valid.", "令牌无效。");
        return (
            StatusCode::UNAUTHORIZED,
            login_form(language, &next, Some(message)),
        )
            .into_response();
    };
    let http = state.http();
    let (cookie, _) = match state.sessions.open(&user.name, http.session_ttl) {
        Ok(opened) => opened,
        Err(error) => return ApiError::internal(error).into_response(),
    };
    let cookie_header = format!(
        "{SESSION_COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        http.session_ttl.as_secs(),
        if http.secure_cookie { "; Secure" } else { "" }
    );
    tracing::info!(user = %user.name, "logged in on the pages");
    ([(header::SET_COOKIE, cookie_header)], Redirect::to(&next)).into_response()
}

/// Whether a posted form carries the session's CSRF token.
fn csrf_ok(page: &PageUser, form: &HashMap<String, String>) -> bool {
    form.get("csrf")
        .is_some_and(|token| same_secret(token, &page.session.csrf))
}

fn csrf_refused(page: &PageUser) -> Response {
    error_page(
        page,
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            tr(
                page.language,
                "This form has expired. Open the page again and retry.",
                "表单已过期，请重新打开页面再试。",
            ),
        ),
    )
}

async fn logout(
    State(state): State<SharedState>,
    page: PageUser,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf_ok(&page, &form) {
        return csrf_refused(&page);
    }
    if let Some(cookie) = session_cookie(&headers) {
        state.sessions.close(&cookie);
    }
    (
        [(
            header::SET_COOKIE,
            format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Redirect::to("/login"),
    )
        .into_response()
}

/// The funnel as an SVG: one centred bar per stage, as wide as the share of deals that reached
/// it in the period, with the stage's name and count.
fn funnel_svg(stages: &[crate::funnel::StageStats]) -> Markup {
    let width = 600.0;
    let bar_height = 44.0;
    let gap = 6.0;
    let most = stages
        .iter()
        .map(|stage| stage.entered)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let height = stages.len() as f64 * (bar_height + gap);
    html! {
        svg.funnel viewBox=(format!("0 0 {width} {height}")) role="img" aria-label="funnel" {
            @for (index, stage) in stages.iter().enumerate() {
                @let share = (stage.entered as f64 / most).max(0.08);
                @let bar = width * share;
                @let x = (width - bar) / 2.0;
                @let y = index as f64 * (bar_height + gap);
                rect x=(format!("{x:.1}")) y=(format!("{y:.1}")) width=(format!("{bar:.1}")) height=(bar_height) rx="6" class=(format!("stage-{}", index % 6)) {}
                text x=(width / 2.0) y=(format!("{:.1}", y + bar_height / 2.0 + 6.0)) text-anchor="middle" {
                    (stage.stage) " · " (stage.entered)
                }
            }
        }
    }
}

async fn funnel_page(
    State(state): State<SharedState>,
    page: PageUser,
    query: Result<Query<FunnelQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = query.map(|Query(query)| query).unwrap_or_default();
    let user = std::sync::Arc::clone(&page.user);
    let loaded = with_store(&state, move |store, config| {
        let (report, _) = api::load_funnel(store, config, &user, &query, chrono::Utc::now())?;
        let owners = if user.role == Role::Rep || !user.sees(Field::Owner) {
            Vec::new()
        } else {
            owners(store)?
        };
        Ok((report, owners, query))
    })
    .await;
    let (report, owners, query) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => return error_page(&page, error),
    };
    let language = page.language;
    let sees_amounts = page.user.sees(Field::Amount);
    // A user who may not see stages gets the totals without the funnel by stage (the API leaves
    // the stages out of the report for them too).
    let sees_stages = page.user.sees(Field::Stage) && !report.stages.is_empty();
    let body = html! {
        h1 { (tr(language, "Sales funnel", "销售漏斗")) }
        form.pickers method="get" action="/funnel" {
            label { (tr(language, "From", "从")) input type="date" name="since" value=(report.period.since.date_naive()); }
            label { (tr(language, "To", "到")) input type="date" name="until" value=(report.period.until.date_naive()); }
            @if !owners.is_empty() {
                label { (tr(language, "Owner", "负责人"))
                    select name="owner" data-autosubmit {
                        option value="" { (tr(language, "Everyone", "全部")) }
                        @for owner in &owners {
                            option value=(owner) selected[query.owner.as_deref() == Some(owner.as_str())] { (owner) }
                        }
                    }
                }
            }
            button type="submit" { (tr(language, "Show", "查看")) }
        }
        @if sees_stages {
            section.card {
                (funnel_svg(&report.stages))
            }
        }
        section.totals {
            div.figure { span.label { (tr(language, "Open deals", "在途商机")) } span.value { (report.totals.open_count) } }
            @if sees_amounts {
                div.figure { span.label { (tr(language, "Open amount", "在途金额")) } span.value { (money(report.totals.open_amount)) } }
            }
            div.figure { span.label { (tr(language, "Won", "赢单")) } span.value { (report.totals.won_count) } }
            @if sees_amounts {
                div.figure { span.label { (tr(language, "Won amount", "赢单金额")) } span.value { (money(report.totals.won_amount)) } }
                div.figure { span.label { (tr(language, "Weighted pipeline", "加权管道")) } span.value { (money(report.forecast.weighted_pipeline)) } }
                div.figure { span.label { (tr(language, "Forecast", "预测")) } span.value { (money(report.forecast.history_based)) } }
            }
            div.figure { span.label { (tr(language, "Lost", "输单")) } span.value { (report.totals.lost_count) } }
            @if sees_stages {
                div.figure { span.label { (tr(language, "Lead → won", "线索→赢单")) } span.value { (percent(report.totals.lead_to_won_rate)) } }
            } @else {
                div.figure { span.label { (tr(language, "Win rate", "赢单率")) } span.value { (percent(report.totals.lead_to_won_rate)) } }
            }
        }
        @if sees_stages {
            h2 { (tr(language, "By stage", "各阶段")) }
            div.stages {
                @for stage in &report.stages {
                    section.card.stage {
                        h3 { (stage.stage) }
                        dl {
                            dt { (tr(language, "Open deals", "在途商机")) } dd { (stage.open_count) }
                            @if sees_amounts {
                                dt { (tr(language, "Open amount", "在途金额")) } dd { (money(stage.open_amount)) }
                                dt { (tr(language, "Weighted", "加权金额")) } dd { (money(stage.weighted_amount)) }
                            }
                            dt { (tr(language, "Reached", "到达")) } dd { (stage.entered) }
                            dt { (tr(language, "Conversion", "转化率")) } dd { (percent(stage.conversion_rate)) }
                            dt { (tr(language, "Win rate", "赢单率")) } dd { (percent(stage.win_rate)) }
                            dt { (tr(language, "Median days", "停留中位天数")) } dd { (days(stage.median_days)) }
                            dt { (tr(language, "Stalled", "停滞")) } dd { (stage.n_stalled) }
                        }
                    }
                }
        }
        }
        @if !report.forecast.deals.is_empty() {
            h2 { (tr(language, "Forecast", "预测")) }
            div.scroll { table.list {
                thead { tr {
                    th { (tr(language, "Company", "公司")) }
                    @if page.user.sees(Field::Stage) { th { (tr(language, "Stage", "阶段")) } }
                    @if sees_amounts { th.number { (tr(language, "Weighted", "加权金额")) } }
                    th { (tr(language, "Expected close", "预计成交")) }
                } }
                tbody {
                    @for line in report.forecast.deals.iter().take(20) {
                        tr {
                            td { a href=(format!("/deals/{}", line.deal_id)) { (line.company.as_deref().filter(|_| page.user.sees(Field::Company)).unwrap_or("—")) } }
                            @if page.user.sees(Field::Stage) { td { (line.stage) } }
                            @if sees_amounts { td.number { (money(line.weighted)) } }
                            td { (line.expected_close.as_deref().unwrap_or("")) }
                        }
                    }
                }
            } }
        }
    };
    layout(tr(language, "Funnel", "漏斗"), &page, "/funnel", body).into_response()
}

/// The owners of live deals, for the owner picker.
fn owners(store: &crate::store::Store) -> Result<Vec<String>, ApiError> {
    use crate::store::CrmStore;
    store.crm().owners(false).map_err(ApiError::internal)
}

fn deal_rows(page: &PageUser, deals: &[(Deal, i64, Option<String>)], with_reason: bool) -> Markup {
    let language = page.language;
    let sees_amounts = page.user.sees(Field::Amount);
    html! {
        ul.deals {
            @for (deal, _, reason) in deals {
                li {
                    a href=(format!("/deals/{}", deal.id)) {
                        span.company { (title_of(&page.user, deal).chars().take(80).collect::<String>()) }
                        span.meta {
                            @if page.user.sees(Field::Stage) { span.stage { (shown(deal, Field::Stage)) } }
                            @if sees_amounts && deal.fields.contains_key(&Field::Amount) {
                                span.amount { (crate::text::group_thousands(&shown(deal, Field::Amount))) " " (shown(deal, Field::Currency)) }
                            }
                            @if page.user.sees(Field::Owner) { span.owner { (shown(deal, Field::Owner)) } }
                        }
                        @if with_reason {
                            @if let Some(reason) = reason { span.reason { (reason) } }
                        } @else if page.user.sees(Field::NextStep) && !shown(deal, Field::NextStep).is_empty() {
                            span.next { (tr(language, "Next: ", "下一步：")) (shown(deal, Field::NextStep)) }
                        }
                    }
                }
            }
        }
    }
}

async fn stalled_page(State(state): State<SharedState>, page: PageUser) -> Response {
    let user = std::sync::Arc::clone(&page.user);
    let query = DealQuery::stalled();
    let list = match with_store(&state, move |store, config| {
        api::query_deals(store, config, &user, &query, chrono::Utc::now())
    })
    .await
    {
        Ok(list) => list,
        Err(error) => return error_page(&page, error),
    };
    let language = page.language;
    let body = html! {
        h1 { (tr(language, "Stalled deals", "停滞商机")) }
        p.hint { (tr(language, "Worst first: the longest over their stage's limit.", "按超期时长排序，最严重的在前。")) }
        @if list.deals.is_empty() {
            p.empty { (tr(language, "Nothing is stalled.", "没有停滞的商机。")) }
        } @else {
            (deal_rows(&page, &list.deals, true))
        }
    };
    layout(tr(language, "Stalled", "停滞"), &page, "/stalled", body).into_response()
}

#[derive(Debug, Default, serde::Deserialize)]
struct DealsPageQuery {
    q: Option<String>,
    stage: Option<String>,
    owner: Option<String>,
    stalled: Option<String>,
    offset: Option<usize>,
}

/// How many deals the deals page lists at a time.
const DEALS_PER_PAGE: usize = 200;

/// A query value written into a link: every byte but the unreserved ones percent-escaped.
fn query_escape(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// The deals page with the same search and filters, from another offset.
fn deals_link(form: &DealsPageQuery, offset: usize) -> String {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for (key, value) in [
        ("q", &form.q),
        ("stage", &form.stage),
        ("owner", &form.owner),
        ("stalled", &form.stalled),
    ] {
        if let Some(value) = value.as_deref().filter(|value| !value.is_empty()) {
            pairs.push((key, value));
        }
    }
    let mut link = String::from("/deals?");
    for (key, value) in pairs {
        link.push_str(&format!("{key}={}&", query_escape(value)));
    }
    link.push_str(&format!("offset={offset}"));
    link
}

async fn deals_page(
    State(state): State<SharedState>,
    page: PageUser,
    query: Result<Query<DealsPageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let form = query.map(|Query(query)| query).unwrap_or_default();
    let user = std::sync::Arc::clone(&page.user);
    let query = DealQuery {
        stage: form.stage.clone(),
        owner: form.owner.clone(),
        stalled: Some(form.stalled.is_some()),
        q: form.q.clone(),
        updated_since: None,
        include_archived: None,
        limit: Some(DEALS_PER_PAGE),
        offset: form.offset,
    };
    let loaded = with_store(&state, move |store, config| {
        let list = api::query_deals(store, config, &user, &query, chrono::Utc::now())?;
        let stages = stage_names(config);
        Ok((list, stages))
    })
    .await;
    let (list, stages) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => return error_page(&page, error),
    };
    let language = page.language;
    let body = html! {
        h1 { (tr(language, "Deals", "商机")) }
        form.search method="get" action="/deals" {
            input type="search" name="q" value=(form.q.as_deref().unwrap_or("")) placeholder=(tr(language, "Search company, contact, email…", "搜索公司、联系人、邮箱…"));
            @if page.user.sees(Field::Stage) {
                select name="stage" {
                    option value="" { (tr(language, "All stages", "全部阶段")) }
                    @for stage in &stages {
                        option value=(stage) selected[form.stage.as_deref() == Some(stage.as_str())] { (stage) }
                    }
                }
            }
            label.check { input type="checkbox" name="stalled" value="1" checked[form.stalled.is_some()]; (tr(language, "Stalled", "停滞")) }
            button type="submit" { (tr(language, "Search", "搜索")) }
        }
        p.count { (list.total) " " (tr(language, "deal(s)", "个商机")) }
        (deal_rows(&page, &list.deals, form.stalled.is_some()))
        @let offset = form.offset.unwrap_or(0);
        @if offset > 0 || offset + list.deals.len() < list.total {
            nav.pager {
                @if offset > 0 {
                    a rel="prev" href=(deals_link(&form, offset.saturating_sub(DEALS_PER_PAGE))) { (tr(language, "← Previous", "← 上一页")) }
                }
                span { ((offset + 1).min(list.total)) "–" (offset + list.deals.len()) " / " (list.total) }
                @if offset + list.deals.len() < list.total {
                    a rel="next" href=(deals_link(&form, offset + DEALS_PER_PAGE)) { (tr(language, "Next →", "下一页 →")) }
                }
            }
        }
    };
    layout(tr(language, "Deals", "商机"), &page, "/deals", body).into_response()
}

#[derive(Debug, Default, serde::Deserialize)]
struct DealPageQuery {
    saved: Option<String>,
}

fn deal_markup(
    page: &PageUser,
    detail: &api::DealDetail,
    stages: &[String],
    saved: bool,
    error: Option<&str>,
) -> Markup {
    let language = page.language;
    let deal = &detail.deal;
    let may_change = authorize(&page.user, Action::ChangeDeal(deal)).is_ok()
        && authorize(&page.user, Action::SetField(Field::NextStep, None)).is_ok();
    let visible: Vec<Field> = Field::ALL
        .into_iter()
        .filter(|field| page.user.sees(*field))
        .collect();
    let may_move =
        may_change && authorize(&page.user, Action::SetField(Field::Stage, None)).is_ok();
    html! {
        p.back { a href="/deals" { "← " (tr(language, "Deals", "商机")) } }
        h1 { (title_of(&page.user, deal)) }
        @if saved {
            p.notice { (tr(language, "Saved. The spreadsheets are updated in a moment.", "已保存。表格稍后会同步更新。")) }
        }
        @if let Some(error) = error {
            p.error { (error) }
        }
        @if deal.archived_at.is_some() {
            p.notice { (tr(language, "This deal is archived.", "该商机已归档。")) }
        }
        @if may_move {
            form.card.move method="post" action=(format!("/deals/{}/move", deal.id)) {
                input type="hidden" name="csrf" value=(page.session.csrf);
                input type="hidden" name="version" value=(detail.version);
                label for="move-stage" { (tr(language, "Move to stage", "移动到阶段")) }
                div.row {
                    select #move-stage name="stage" {
                        @for stage in stages {
                            option value=(stage) selected[shown(deal, Field::Stage) == *stage] { (stage) }
                        }
                    }
                    button type="submit" { (tr(language, "Move", "移动")) }
                }
            }
        }
        @if may_change {
            form.card.edit method="post" action=(format!("/deals/{}", deal.id)) {
                h2 { (tr(language, "Details", "详情")) }
                input type="hidden" name="csrf" value=(page.session.csrf);
                input type="hidden" name="version" value=(detail.version);
                @for field in &visible {
                    @if *field != Field::Stage {
                        label for=(format!("field-{}", field.name())) { (field_label(language, *field)) }
                        input id=(format!("field-{}", field.name())) name=(field.name()) value=(shown(deal, *field))
                            type=(match field { Field::Email => "email", Field::Phone => "tel", _ => "text" });
                    }
                }
                button type="submit" { (tr(language, "Save", "保存")) }
            }
        } @else {
            section.card {
                dl {
                    @for field in &visible {
                        dt { (field_label(language, *field)) }
                        dd { (shown(deal, *field)) }
                    }
                }
            }
        }
        @if !deal.extra.is_empty() {
            section.card {
                h2 { (tr(language, "Other columns", "其他列")) }
                dl {
                    @for (name, value) in &deal.extra {
                        dt { (name) } dd { (value) }
                    }
                }
            }
        }
        @if page.user.sees(Field::Stage) { section.card {
            h2 { (tr(language, "Stage history", "阶段历史")) }
            ol.history {
                @for change in &detail.history {
                    li {
                        span.when { (change.at.format("%Y-%m-%d")) }
                        " "
                        @if let Some(from) = &change.from_stage { (from) " → " }
                        strong { (change.to_stage) }
                        span.source { " (" (change.source) ")" }
                    }
                }
            }
        } }
        section.card {
            h2 { (tr(language, "Shown in", "所在文件")) }
            @if detail.files.is_empty() {
                p.empty { (tr(language, "No file shows this deal.", "没有文件包含该商机。")) }
            }
            ul.files {
                @for file in &detail.files {
                    li { (std::path::Path::new(file).file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_else(|| file.clone())) }
                }
            }
        }
    }
}

async fn render_deal(
    state: &SharedState,
    page: &PageUser,
    id: DealId,
    saved: bool,
    error: Option<(StatusCode, String)>,
) -> Response {
    let user = std::sync::Arc::clone(&page.user);
    let loaded = with_store(state, move |store, config| {
        let detail = api::load_deal(store, &user, id)?;
        let stages = stage_names(config);
        Ok((detail, stages))
    })
    .await;
    match loaded {
        Ok((detail, stages)) => {
            let title = title_of(&page.user, &detail.deal);
            let markup = layout(
                &title,
                page,
                "/deals",
                deal_markup(
                    page,
                    &detail,
                    &stages,
                    saved,
                    error.as_ref().map(|(_, message)| message.as_str()),
                ),
            );
            let status = error.map(|(status, _)| status).unwrap_or(StatusCode::OK);
            (status, markup).into_response()
        }
        Err(error) => error_page(page, error),
    }
}

async fn deal_page(
    State(state): State<SharedState>,
    page: PageUser,
    Path(id): Path<DealId>,
    Query(query): Query<DealPageQuery>,
) -> Response {
    render_deal(&state, &page, id, query.saved.is_some(), None).await
}

async fn submit_edit(
    state: SharedState,
    page: PageUser,
    id: DealId,
    form: HashMap<String, String>,
    stage_move: bool,
) -> Response {
    if !csrf_ok(&page, &form) {
        return csrf_refused(&page);
    }
    let version = form
        .get("version")
        .and_then(|text| text.parse::<i64>().ok());
    let user = std::sync::Arc::clone(&page.user);
    let language = page.language;
    let result = with_store(&state, move |store, config| {
        let detail = api::load_deal(store, &user, id)?;
        let pairs: Vec<(Field, String)> = if stage_move {
            vec![(Field::Stage, form.get("stage").cloned().unwrap_or_default())]
        } else {
            form_changes_for(&user, &detail.deal, &form)
        };
        for (field, text) in &pairs {
            let value = Some(text.as_str()).filter(|text| !text.trim().is_empty());
            authorize(&user, Action::SetField(*field, value)).map_err(|refusal| {
                ApiError::from_refusal(refusal, "such field").with_field(field.name())
            })?;
        }
        let changes = if stage_move {
            crate::edit::clean_stage(config, &pairs[0].1).map_err(|problem| {
                ApiError::bad_request(problem.message).with_field(Field::Stage.name())
            })?
        } else {
            crate::edit::clean_assignments(
                config,
                pairs
                    .iter()
                    .map(|(field, text)| (field.name(), text.as_str())),
            )
            .map_err(|problems| {
                ApiError::bad_request(
                    problems
                        .iter()
                        .map(|problem| problem.message.clone())
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            })?
        };
        api::change_deal(
            store,
            config,
            &user,
            id,
            crate::edit::EditRequest {
                changes,
                expected_version: version,
                ..Default::default()
            },
        )
    })
    .await;
    match result {
        Ok(_) => Redirect::to(&format!("/deals/{id}?saved=1")).into_response(),
        Err(error) if error.status == StatusCode::PRECONDITION_FAILED => {
            let message = tr(
                language,
                "Someone changed this deal since you opened it. Here it is as it is now; make your change again.",
                "您打开后该商机已被他人修改。以下是最新内容，请重新修改。",
            );
            render_deal(
                &state,
                &page,
                id,
                false,
                Some((StatusCode::CONFLICT, message.to_string())),
            )
            .await
        }
        Err(error) if error.status == StatusCode::BAD_REQUEST => {
            render_deal(
                &state,
                &page,
                id,
                false,
                Some((StatusCode::BAD_REQUEST, error.message)),
            )
            .await
        }
        Err(error) => error_page(&page, error),
    }
}

/// The changes a form asks for: the fields whose text differs from what the page showed.
fn form_changes_for(
    user: &User,
    deal: &Deal,
    form: &HashMap<String, String>,
) -> Vec<(Field, String)> {
    Field::ALL
        .into_iter()
        .filter(|field| user.sees(*field) && *field != Field::Stage)
        .filter_map(|field| {
            let posted = form.get(field.name())?;
            (posted.trim() != shown(deal, field).trim()).then(|| (field, posted.clone()))
        })
        .collect()
}

async fn edit_deal(
    State(state): State<SharedState>,
    page: PageUser,
    Path(id): Path<DealId>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    submit_edit(state, page, id, form, false).await
}

async fn move_deal(
    State(state): State<SharedState>,
    page: PageUser,
    Path(id): Path<DealId>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    submit_edit(state, page, id, form, true).await
}

async fn files_page(State(state): State<SharedState>, page: PageUser) -> Response {
    if let Err(refusal) = authorize(&page.user, Action::Administer) {
        return error_page(&page, ApiError::from_refusal(refusal, "such page"));
    }
    let loaded = with_store(&state, |store, _| {
        Ok((
            crate::store::files::file_overview(&store.db())?,
            crate::store::mirror::current_issues(&store.db())?,
        ))
    })
    .await;
    let (files, issues) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => return error_page(&page, error),
    };
    let language = page.language;
    let name_of = |file: &str| {
        std::path::Path::new(file)
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.to_string())
    };
    let body = html! {
        h1 { (tr(language, "Files", "文件")) }
        ul.files-state {
            @for file in &files {
                @let state_name = file.state.map(|state| state.name()).unwrap_or("not running");
                @let deferred = file.write_back.as_ref().is_some_and(|write_back| write_back.status == "deferred");
                li class=(format!("state-{state_name}")) {
                    div.file-name { (name_of(&file.file)) }
                    div.meta {
                        span.badge { (if deferred { "deferred" } else { state_name }) }
                        span { (file.source) }
                        span { (file.n_rows) " " (tr(language, "rows", "行")) }
                        @if file.n_row_errors > 0 { span.bad { (file.n_row_errors) " " (tr(language, "errors", "错误")) } }
                        @if let Some(at) = file.last_checked_at { span { (at.format("%Y-%m-%d %H:%M")) } }
                    }
                    @if let Some(message) = &file.last_message {
                        p.reason { (message) }
                    }
                    @if let Some(message) = file.write_back.as_ref().and_then(|write_back| write_back.message.as_ref()) {
                        p.reason { (message) }
                    }
                    @if file.state == Some(crate::store::files::FileState::Held) {
                        form method="post" action="/files/force" data-confirm=(tr(language, "Apply this file's changes, removals included?", "确定应用该文件的更改（包括删除）？")) {
                            input type="hidden" name="csrf" value=(page.session.csrf);
                            input type="hidden" name="file" value=(file.file);
                            button.danger type="submit" { (tr(language, "Force", "强制应用")) }
                        }
                    }
                }
            }
        }
        @if !issues.is_empty() {
            h2 { (tr(language, "Row errors", "行错误")) }
            ul.issues {
                @for stored in &issues {
                    li { span.file { (name_of(&stored.file)) } " " (stored.issue.to_string()) }
                }
            }
        }
    };
    layout(tr(language, "Files", "文件"), &page, "/files", body).into_response()
}

async fn force_file(
    State(state): State<SharedState>,
    page: PageUser,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf_ok(&page, &form) {
        return csrf_refused(&page);
    }
    let file = form.get("file").cloned().unwrap_or_default();
    match api::force(&state, &page.user, &file).await {
        Ok(()) => Redirect::to("/files").into_response(),
        Err(error) => error_page(&page, error),
    }
}
