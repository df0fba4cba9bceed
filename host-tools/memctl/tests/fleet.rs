//! `memctl --fleet`: the read-only views across several host services, one
//! that accepts connections and never answers, and one that is gone.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use memd_client::fleet::{Fleet, Member};
use memd_mm::HostMm;
use memd_service::host::{serve, HostService};
use serde_json::Value;

fn memctl(fleet: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_memctl"))
        .arg("--fleet")
        .arg(fleet)
        .args(args)
        .env_remove("MEMD_TOKEN")
        .env_remove("MEMD_ADDR")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn fleet_views_show_every_member_and_never_wait_for_a_silent_one() {
    let dir = std::env::temp_dir().join(format!("memctl-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "tok\n").unwrap();
    let member = |name: &str, addr: String| Member {
        name: name.into(),
        addr,
        token_file: token.clone(),
        operator_token_file: token.clone(),
    };
    let server = |mib: u64| {
        let mm = HostMm::three_zones(mib << 20, 0, "").unwrap();
        serve(HostService::shared(mm, "tok")).unwrap()
    };
    // Accepts, never answers: the view must not wait for it past --wait.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let fleet = Fleet {
        members: vec![
            member("big", server(64)),
            member("small", server(32)),
            member("silent", silent.local_addr().unwrap().to_string()),
            member("gone", gone.to_string()),
        ],
    };
    let path = dir.join("fleet.json");
    fleet.save(&path).unwrap();

    let t = Instant::now();
    let (code, out, err) = memctl(&path, &["--json", "--wait", "2", "status"]);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    let up: Vec<(&str, bool)> = rows
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["up"] == true))
        .collect();
    assert_eq!(
        up,
        [
            ("big", true),
            ("small", true),
            ("silent", false),
            ("gone", false)
        ]
    );

    let (code, out, err) = memctl(&path, &["--json", "--wait", "2", "meminfo"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let each: u64 = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["meminfo"]["total"].as_u64())
        .sum();
    assert!(each > 90 << 20, "{each}");
    assert_eq!(v["total"]["total"].as_u64(), Some(each), "summed");

    let (code, out, _) = memctl(&path, &["--wait", "1", "buddyinfo"]);
    assert_eq!(code, 0);
    assert!(out.contains("=== big") && out.contains("=== gone") && out.contains("down:"));
    let (code, _, err) = memctl(&path, &["--wait", "1", "watch", "--iterations", "1"]);
    assert_eq!(code, 0, "{err}");
    for op in [
        &["kmalloc", "64"][..],
        &["balloon", "1G"],
        &["session"],
        &["drop-caches"],
    ] {
        let (code, _, err) = memctl(&path, op);
        assert_eq!(code, 2, "{op:?} is not a view: {err}");
    }
    let down = Fleet {
        members: fleet.members[2..].to_vec(),
    };
    let down_path = dir.join("down.json");
    down.save(&down_path).unwrap();
    let (code, _, err) = memctl(&down_path, &["--wait", "1", "status"]);
    assert_eq!(code, 3, "no member answered: {err}");
    drop(silent);
    std::fs::remove_dir_all(&dir).unwrap();
}
