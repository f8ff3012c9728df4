//! The `orrery` command line against a real database: the first operator of
//! a fresh install is created with `orrery admin create-user`, and the key it
//! prints works on the API at once; mistakes are refused with a message that
//! says what to fix and write nothing.

mod support;

use std::process::{Command, Output};

use orrery_api::app::{App, ClusterWorkflows};
use support::TestEnv;
use tokio_util::sync::CancellationToken;

fn orrery(env: &TestEnv, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orrery"))
        .args(args)
        .env("ORRERY_DATABASE_URL", &env.db_url)
        .env("ORRERY_REDIS_URL", &env.redis_url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run orrery")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_operator_is_created_from_the_command_line_and_its_key_works_at_once() {
    let env = TestEnv::new("cli_admin").await;
    let out = orrery(&env, &["admin", "create-group", "data", "--quota", "12"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = orrery(
        &env,
        &[
            "admin",
            "create-user",
            "root",
            "--group",
            "data",
            "--operator",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    let key = printed
        .lines()
        .find_map(|l| l.strip_prefix("API key (shown once): "))
        .unwrap_or_else(|| panic!("no key printed: {printed}"))
        .trim()
        .to_owned();

    // Mistakes: each says what is wrong, exits non-zero, writes nothing.
    let users = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    for (args, says) in [
        (vec!["admin", "create-user", "root"], "root"),
        (vec!["admin", "create-user", "Bad Name"], "name"),
        (
            vec!["admin", "create-user", "eve", "--group", "nope"],
            "nope",
        ),
        (vec!["admin", "create-key", "nobody"], "nobody"),
    ] {
        let out = orrery(&env, &args);
        assert!(!out.status.success(), "{args:?} succeeded: {}", text(&out));
        assert!(
            text(&out).contains(says),
            "{args:?} should name {says:?}: {}",
            text(&out)
        );
    }
    assert_eq!(users().await, 1);

    // The printed key is an operator's on a running API.
    let redis = redis::Client::open(env.redis_url.as_str())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let config = orrery_api::ApiConfig {
        workflows: ClusterWorkflows::fake(),
        ..orrery_api::ApiConfig::default()
    };
    let app = App::new(env.rt.engine.clone(), redis, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(orrery_api::serve_app(app, listener, stop.clone()));
    let http = reqwest::Client::new();
    let account: serde_json::Value = http
        .get(format!("{base}/v1/account"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(account["name"], "root", "{account}");
    assert_eq!(account["is_operator"], true, "{account}");
    assert_eq!(account["quota"]["group_limit"], 12, "{account}");
    let runs = http
        .get(format!("{base}/v1/admin/runs"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(runs.status().as_u16(), 200);
    stop.cancel();
}
