//! The pages in a real browser: Debian's Chromium driven through WebDriver (chromedriver on a free
//! port). Log in with a token, open the funnel, edit a deal through the form and see the change
//! in the workbook once the daemon has written it back. Screenshots at 375×812 (a phone) and
//! 1280×800 (a desktop) are saved under target/screenshots/ for review. In CI a missing Chromium
//! is a failure, not a skip (`.ci/run` installs it).

use std::path::PathBuf;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

use crate::harness::{free_port, read_xlsx, wait_until, TestDir, XlsxBuilder};

/// chromedriver on a free port; killed when dropped.
struct Driver {
    child: std::process::Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|folder| folder.join(name))
            .find(|path| path.is_file())
    })
}

fn start_driver() -> Driver {
    let port = free_port();
    let child = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver { child, port };
    wait_until(Duration::from_secs(20), "chromedriver to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    driver
}

/// A headless Chromium session with a viewport of exactly this size; `mobile` makes it a phone
/// (touch, a phone's user agent, twice the pixels).
async fn browser(
    driver: &Driver,
    chromium: &std::path::Path,
    profile: &std::path::Path,
    (width, height): (u32, u32),
    mobile: bool,
) -> Client {
    let mut options = serde_json::json!({
        "binary": chromium,
        "args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", "--lang=en-US",
            format!("--user-data-dir={}", profile.display()),
            "--window-size=1280,800",
        ],
    });
    options["mobileEmulation"] = serde_json::json!({
        "deviceMetrics": {"width": width, "height": height, "pixelRatio": if mobile { 2.0 } else { 1.0 },
                          "touch": mobile, "mobile": mobile},
    });
    if mobile {
        options["mobileEmulation"]["userAgent"] =
            serde_json::json!("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile");
    }
    // The WebDriver client speaks plain HTTP here, but its TLS stack wants a provider chosen.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("browserName".to_string(), serde_json::json!("chrome"));
    capabilities.insert("goog:chromeOptions".to_string(), options);
    ClientBuilder::rustls()
        .expect("a WebDriver client")
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a Chromium session")
}

async fn log_in(client: &Client, base: &str, token: &str) {
    client
        .goto(&format!("{base}/funnel"))
        .await
        .expect("open the funnel");
    // Not logged in yet: the login form.
    let field = client
        .wait()
        .for_element(Locator::Css("input[name=token]"))
        .await
        .expect("the login form");
    field.send_keys(token).await.expect("type the token");
    client
        .find(Locator::Css("main.login button[type=submit]"))
        .await
        .expect("the login button")
        .click()
        .await
        .expect("log in");
    client
        .wait()
        .for_element(Locator::Css("svg.funnel"))
        .await
        .expect("the funnel after logging in");
}

async fn screenshot(client: &Client, name: &str) {
    let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&folder).expect("screenshot folder");
    let png = client.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(folder.join(name), png).expect("save screenshot");
}

async fn inner_width(client: &Client) -> i64 {
    client
        .execute("return window.innerWidth", Vec::new())
        .await
        .expect("innerWidth")
        .as_i64()
        .unwrap_or(0)
}

/// How wide the page's content is, in CSS pixels: wider than the window means the page scrolls
/// sideways (or a phone zooms out to show it all).
async fn scroll_width(client: &Client) -> i64 {
    client
        .execute(
            "return Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)",
            Vec::new(),
        )
        .await
        .expect("scrollWidth")
        .as_i64()
        .unwrap_or(i64::MAX)
}

/// Asserts that the current page fits a 375-px-wide phone without horizontal scrolling.
async fn fits_the_phone(client: &Client, what: &str) {
    assert_eq!(inner_width(client).await, 375, "{what}: the window");
    let width = scroll_width(client).await;
    assert!(
        width <= 375,
        "{what} is {width} px wide on a 375-px phone: it scrolls sideways"
    );
}

#[test]
fn a_manager_edits_a_deal_on_a_phone_and_the_workbook_follows() {
    let (Some(chromium), Some(_)) = (program("chromium"), program("chromedriver")) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have chromium and chromium-driver (.ci/run installs them)"
        );
        eprintln!("chromium or chromedriver is not installed; skipping the browser test");
        return;
    };
    let dir = TestDir::new();
    // Two deals idle for longer than their stage allows, so the stalled page has something.
    let days_ago = |days: i64| {
        (chrono::Utc::now().date_naive() - chrono::Duration::days(days))
            .format("%Y-%m-%d")
            .to_string()
    };
    let today = days_ago(0);
    XlsxBuilder::new()
        .sheet("Pipeline")
        .row(&[
            "Company",
            "Contact",
            "Email",
            "Stage",
            "Amount",
            "Owner",
            "Next Step",
            "Last Contact",
        ])
        .row(&[
            "Acme Robotics",
            "Ann",
            // Long words with no place to break must wrap rather than widen the phone's page.
            "ann.procurement.department.contact@acme-robotics-international.example",
            "Prospect",
            "12000",
            "Alice Wang",
            "Send proposal",
            &today,
        ])
        .row(&[
            "北京星辰科技",
            "刘洋",
            "liu@xc.example",
            "Lead",
            "8000",
            "李明",
            "电话跟进",
            &days_ago(12),
        ])
        .row(&[
            "Globex",
            "Gus",
            "gus@globex.example",
            "Opportunity",
            "30000",
            "Bob Li",
            "Demo",
            &days_ago(30),
        ])
        .row(&[
            "InitechInternationalHoldingsAndSubsidiariesLimited",
            "Ivy",
            "ivy@initech.example",
            "Won",
            "5000",
            "Bob Li",
            "",
            "",
        ])
        .save(&dir.path("pipeline.xlsx"));
    let manager = dir.token("mia", "manager", None);
    let port = dir.http_source("pipeline.xlsx", "", &[&manager]);
    dir.sync().assert_code(0);
    let (daemon, _http) = dir.start_serving(&["run"], port);
    daemon.wait_ready();
    // localhost is a secure context for Chromium, so the Secure session cookie is kept.
    let base = format!("http://localhost:{port}");
    let driver = start_driver();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let phone = browser(
            &driver,
            &chromium,
            &dir.path("profile-phone"),
            (375, 812),
            true,
        )
        .await;
        log_in(&phone, &base, &manager.token).await;
        screenshot(&phone, "funnel-375x812.png").await;
        // Nothing is wider than the phone (a wider page would make the phone zoom out).
        fits_the_phone(&phone, "the funnel").await;
        let page = phone.source().await.expect("page source");
        assert!(
            page.contains("Prospect") && page.contains("Sales funnel"),
            "{page}"
        );

        // Edit the deal through its form.
        phone
            .goto(&format!("{base}/deals?q=acme"))
            .await
            .expect("deals");
        phone
            .wait()
            .for_element(Locator::Css("ul.deals a"))
            .await
            .expect("the deal in the list")
            .click()
            .await
            .expect("open the deal");
        let next_step = phone
            .wait()
            .for_element(Locator::Css("#field-next_step"))
            .await
            .expect("the edit form");
        next_step.clear().await.expect("clear");
        next_step.send_keys("Visit on Friday").await.expect("type");
        phone
            .find(Locator::Css("form.edit button[type=submit]"))
            .await
            .expect("save button")
            .click()
            .await
            .expect("save");
        phone
            .wait()
            .for_element(Locator::Css("p.notice"))
            .await
            .expect("the saved notice");
        let value = phone
            .find(Locator::Css("#field-next_step"))
            .await
            .expect("field")
            .prop("value")
            .await
            .expect("value");
        assert_eq!(value.as_deref(), Some("Visit on Friday"));
        screenshot(&phone, "deal-375x812.png").await;
        fits_the_phone(&phone, "the deal").await;
        phone
            .goto(&format!("{base}/stalled"))
            .await
            .expect("stalled");
        let stalled = phone.source().await.expect("stalled page");
        let (globex, beijing) = (stalled.find("Globex"), stalled.find("北京星辰科技"));
        assert!(
            globex.is_some() && beijing.is_some() && globex < beijing,
            "worst first: {stalled}"
        );
        screenshot(&phone, "stalled-375x812.png").await;
        fits_the_phone(&phone, "the stalled deals").await;
        phone.goto(&format!("{base}/deals")).await.expect("deals");
        fits_the_phone(&phone, "the deal list").await;
        phone.close().await.expect("close");

        let desktop = browser(
            &driver,
            &chromium,
            &dir.path("profile-desktop"),
            (1280, 800),
            false,
        )
        .await;
        log_in(&desktop, &base, &manager.token).await;
        assert_eq!(inner_width(&desktop).await, 1280);
        screenshot(&desktop, "funnel-1280x800.png").await;
        desktop.goto(&format!("{base}/deals")).await.expect("deals");
        screenshot(&desktop, "deals-1280x800.png").await;
        desktop.close().await.expect("close");
    });

    // The daemon writes the edit into the workbook; the other rows stay as they were.
    let workbook = dir.path("pipeline.xlsx");
    wait_until(Duration::from_secs(30), "the edit in the workbook", || {
        read_xlsx(&workbook, "Pipeline")
            .column("Next Step")
            .first()
            .map(String::as_str)
            == Some("Visit on Friday")
    });
    let sheet = read_xlsx(&workbook, "Pipeline");
    assert_eq!(sheet.column("Next Step")[1], "电话跟进");
    let history = dir.run(&["history", "--source", "api", "--format", "json"]);
    assert_eq!(history.json()[0]["message"], "by mia");
}
